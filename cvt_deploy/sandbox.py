"""A bundle is a sandbox: every file name its own files chose stays inside its folder.

A bundle may come from someone else (a colleague's copy, a download). The names in its manifest,
sidecars and graphs' external data are checked here before anything is opened, so that reading
it (or a re-export cleaning it) never touches a file outside the folder. Torch-free.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CvtDeployError


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside the bundle folder (by its text)."""
    return isinstance(name, str) and bool(name) and "\0" not in name and not Path(name).is_absolute() \
        and ".." not in Path(name).parts


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


def check_external_data(root: Path, graph: Path) -> None:
    """Refuse an ONNX graph whose external-data locations lead out of the bundle.

    ONNX Runtime and OpenVINO open whatever path a tensor's ``location`` names, so a graph from
    someone else could make them read any file; the graph itself is parsed without its weights.
    """
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # not parseable: the runtime that opens it says so in its own words
        return
    seen: set[str] = set()
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location in seen:
            continue
        seen.add(str(location))
        folder = graph.parent.relative_to(root) if graph.parent != root else Path()
        inside_path(root, str(folder / location) if location and plain_name(location) else location,
                    f"{graph.name}: the external data of tensor {tensor.name!r}, at")
