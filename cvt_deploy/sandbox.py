"""A bundle is a sandbox: every file name its own files chose stays inside its folder.

A bundle may come from someone else (a colleague's copy, a download). The names in its manifest,
sidecars and graphs' external data are checked here before anything is opened, so that reading
it (or a re-export cleaning it) never touches a file outside the folder. Torch-free.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import CvtDeployError


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside the bundle folder (by its text)."""
    # '.' and './' have no parts: they name the folder itself, which a caller would remove or
    # read as if it were one of the files in it.
    return isinstance(name, str) and bool(name) and "\0" not in name and not Path(name).is_absolute() \
        and bool(Path(name).parts) and ".." not in Path(name).parts


def own_files(root: Path, names: Iterable[Any], odd: list[str] | None = None) -> set[str]:
    """The names among ``names`` (a bundle's record of its own files) that replacing the bundle in
    ``root`` may overwrite or remove: file names directly in ``root``, spelt as cvt-export writes
    them, that are not a folder there. The rest claim nothing (their reprs go to ``odd``).

    The record may be hand-edited: a name for the folder itself, a place outside it, a user's
    folder, a file deeper down, or another spelling of a file the new bundle writes ('./model.onnx')
    would make the replacement remove the folder, the user's files or the new bundle's own.
    """
    found: set[str] = set()
    for name in names:
        path = root / name if plain_name(name) else None
        if path is not None and path.name == name and not (os.path.isdir(path) and not os.path.islink(path)):
            found.add(name)
        elif name is not None and odd is not None:
            odd.append(repr(name))
    return found


SANDBOX_RULE = "a file name inside the bundle folder (relative, no '..', no symlink leading out of it)"


def inside_path(root: Path, name: Any, what: str) -> Path:
    """``root / name`` for a file name that a bundle's own files chose (manifest, sidecar, graph).

    A bundle may come from someone else: a name that is absolute, climbs with ``..`` or passes
    through a symlink out of ``root`` would make us read (or a re-export delete) a file outside
    it, so it is refused before anything is opened. Symlinks inside the folder are fine, and so
    is a bundle folder that is itself reached through a symlink: copying or moving it keeps it valid.
    """
    if not plain_name(name):
        raise CvtDeployError(f"{what} {name!r} is not {SANDBOX_RULE}",
                             "the bundle was edited or built by something else: re-export it with cvt-export")
    path = root / name
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise CvtDeployError(f"{what} {name!r} leads out of the bundle folder {root} (to {real}); "
                             f"it must be {SANDBOX_RULE}",
                             "copy the file itself into the bundle (not a symlink to it), or re-export the bundle")
    return path


def check_external_data(root: Path, graph: Path, data: bytes | None = None) -> bool:
    """Refuse an ONNX graph whose external-data locations lead out of the bundle.

    ONNX Runtime and OpenVINO open whatever path a tensor's ``location`` names, so a graph from
    someone else could make them read any file; the graph's bytes are scanned for the locations
    before any runtime sees it (``data``: its bytes, when the caller has read them). Returns whether
    the graph has external data at all.
    """
    folder = graph.parent.relative_to(root) if graph.parent != root else Path()
    locations = _external_locations(graph) if data is None else _scanned_locations(data)
    for location in sorted(locations, key=str):
        inside_path(root, str(folder / location) if plain_name(location) else location,
                    f"{graph.name}: the external data of one of its tensors is at")
    return bool(locations)


def _external_locations(graph: Path) -> set[Any]:
    # A scan, not onnx.load: an edge runtime has ONNX Runtime without the onnx package, and a
    # memory map reads a graph of any size without holding it.
    try:
        with open(graph, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scanned_locations(data)
    except (OSError, ValueError):  # unreadable or empty: the runtime that opens it says so in its own words
        return set()


_KEY = b"\x0a\x08location"  # StringStringEntryProto field 1 (key) = "location"


def _varint(data: bytes | mmap.mmap, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift < 35:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at
    return -1, at


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _scanned_locations(data: bytes | mmap.mmap) -> set[Any]:
    """The values of every (key "location", value) entry of a tensor's ``external_data`` in a
    serialized ONNX graph, whichever order the entry's two fields come in. An entry counts only
    inside its enclosing field (TensorProto field 13, tag 0x6A, with the entry's exact length),
    so a node input that happens to be named "location" is not read as one."""
    found: set[Any] = set()

    def enclosed(start: int, length: int) -> bool:
        head = b"\x6a" + _encode_varint(length)
        return start >= len(head) and data[start - len(head):start] == head

    at = data.find(_KEY)
    while at >= 0:
        end = at + len(_KEY)
        if end < len(data) and data[end] == 0x12:  # key, then value: how protobuf writes it
            n, start = _varint(data, end + 1)
            if n >= 0 and enclosed(at, start + n - at):
                found.add(data[start:start + n].decode("utf-8", "replace"))
        for n in range(1, min(at, 4096)):  # value, then key: legal too, and a parser reads it
            head = b"\x12" + _encode_varint(n)
            start = at - n - len(head)
            if start >= 0 and data[start:at - n] == head and enclosed(start, end - start):
                found.add(data[at - n:at].decode("utf-8", "replace"))
        at = data.find(_KEY, end)
    return found
