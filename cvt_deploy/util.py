"""The ground floor: plumbing every layer shares, importing nothing of cvt-deploy but errors.

Precision names, batch ranges, the ``cvt_deploy.*`` metadata keys (safetensors metadata and
ONNX ``metadata_props``) and their encoding, atomic file writes, hashing and tool versions.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .artifacts import PRECISIONS, check_precision  # noqa: F401  (re-exported: they were defined here)
from .errors import CvtDeployError
from .interrupt import signals_held

VERSION = "0.1.0"  # cvt_deploy.__version__; keep in step with pyproject.toml

# Metadata keys. Graphs and our safetensors carry the model config under CONFIG_KEY; graphs
# also say their precision under PRECISION_KEY.
META_PREFIX = "cvt_deploy."
CONFIG_KEY = META_PREFIX + "config"
PRECISION_KEY = META_PREFIX + "precision"
INPUT_FORMAT_KEY = META_PREFIX + "input_format"
OUTPUT_KIND_KEY = META_PREFIX + "output_kind"

# What a graph takes and gives. "float" is the normalised NCHW batch of preprocess.py; the
# others are RGB pixels at the model's input size that the graph normalises itself
# (export/rawpixel.py): float32 0..255 NCHW (what DeepStream's nvinfer hands an engine with
# net-scale-factor=1, offsets=0) or uint8 in either layout. "probs" graphs end in a Softmax.
INPUT_FORMATS = ("float", "float-pixels", "uint8-nchw", "uint8-nhwc")
OUTPUT_KINDS = ("logits", "probs")


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else an error naming it and them."""
    if value not in choices:
        raise CvtDeployError(f"unknown {what} {value!r}", f"use one of {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class BatchRange:
    """Batch sizes an artifact accepts: fixed when min == max (TensorRT profile min/opt/max)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise CvtDeployError(f"batch range min={self.min} opt={self.opt} max={self.max} is not 1 <= min <= opt <= max",
                                 "pass --batch-range N for a fixed batch or --batch-range MIN:OPT:MAX")

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'8' (fixed), '1:32' (opt = max), '1:8:32'."""
        try:
            parts = [parse_whole(p) for p in str(text).split(":")]
        except ValueError:
            raise CvtDeployError(f"--batch-range {text!r} is not a number or range", "use e.g. 8, 1:32 or 1:8:32") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], min(max(8, parts[0]), parts[1]), parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise CvtDeployError(f"--batch-range {text!r} has too many parts", "use e.g. 8, 1:32 or 1:8:32")

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> BatchRange:
        values = [d[k] for k in ("min", "opt", "max")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"batch range {d!r} does not hold three integers")
        return cls(*values)


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` entries for ``values``: our key prefix, non-strings as JSON."""
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def decode_metadata(props: Mapping[str, str]) -> dict[str, str]:
    """Our entries of a metadata mapping, keys without the prefix (values stay strings)."""
    return {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}


def tool_versions(dists: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript")) -> dict[str, str]:
    """Versions of cvt-deploy and of the installed ``dists``, for provenance records."""
    from importlib import metadata

    out = {"cvt_deploy": VERSION}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# Temporary names carry the writer's pid, so that the next run can tell the leftovers of a
# killed one (SIGKILL, power loss) from the work of a run still going.
PARTIAL_SUFFIX = ".partial"
# errno -> (what happened, how to fix it) for writes that cannot complete.
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another location"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or choose another location"),
    errno.EFBIG: ("the file is too large for that file system", "choose another location"),
    errno.EROFS: ("the file system is read-only", "choose a writable location (or remount it read-write)"),
    errno.EACCES: ("permission denied", "choose a location you can write to"),
    errno.EPERM: ("the operation is not permitted (an immutable folder, chattr +i?)",
                  "choose another location, or lift the restriction (chattr -i)"),
    errno.EBUSY: ("it is busy (a mount point, or in use by another program)", "choose another location"),
    errno.EXDEV: ("it would move a file across file systems", "choose a location on one file system"),
}


class WriteError(CvtDeployError):
    """The operating system refused a write (``errno`` says why); callers that wrote into a
    temporary place re-raise it naming the place the user asked for."""

    def __init__(self, message: str, hint: str, errno: int) -> None:
        super().__init__(message, hint)
        self.errno = errno


def partial_name(name: str) -> str:
    """Prefix for a temporary sibling of ``name``: ``.NAME.PID.``; mkstemp adds a random part."""
    return f".{name}.{os.getpid()}."


def _device_full(path: Path) -> bool:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize < (1 << 20)
    return False


# What only a write can cause: inside a block that also reads inputs, EACCES/EPERM may be
# about an input file, so only these are blamed on the output there.
_WRITE_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_failure(exc: BaseException, path: str | os.PathLike[str],
                  codes: Sequence[int] = tuple(_WRITE_ERRORS)) -> WriteError | None:
    """The clear error for a write to ``path`` that the operating system refused, else None.

    Libraries report a full disk in their own words (torch: "file write failed", safetensors:
    "IoError ... StorageFull"); a device with less than 1 MiB free is taken as the cause.
    """
    if isinstance(exc, WriteError):
        exc = OSError(exc.errno, os.strerror(exc.errno))  # said again for ``path``
    elif isinstance(exc, CvtDeployError):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in codes and _device_full(Path(path)):
        code = errno.ENOSPC
    if code is None or code not in codes:
        return None
    what, fix = _WRITE_ERRORS[code]
    return WriteError(f"cannot write {path}: {what}; nothing was left behind", fix, code)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str], any_cause: bool = False) -> Iterator[None]:
    """Turn a refused write inside the block into :func:`write_failure`'s error for ``path``.

    ``any_cause``: the block only writes, so permission errors are the output's too.
    """
    try:
        yield
    except Exception as e:
        err = write_failure(e, path, tuple(_WRITE_ERRORS) if any_cause else _WRITE_ONLY)
        if err is None:
            raise
        raise err from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(folder: Path, name: str = "") -> tuple[list[Path], list[Path]]:
    """Temporary files/folders in ``folder`` (for ``name``, or any) left by writers that are gone.

    Returns (stale: whose writer's pid no longer runs, unknown: without a pid, e.g. from an
    older cvt-deploy, or whose pid runs again). Only stale ones are safe to delete.
    """
    stale: list[Path] = []
    unknown: list[Path] = []
    if not folder.is_dir():
        return stale, unknown
    prefix = f".{name}." if name else "."
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if not (p.name.startswith(prefix) and p.name.endswith(PARTIAL_SUFFIX)):
                continue
            # .NAME.PID.RANDOM.partial: NAME may hold dots, mkstemp's RANDOM does not. A PID that is
            # not ASCII digits ('¹', '٣': anyone may name a file so) is no writer's of ours: unknown.
            parts = p.name[:-len(PARTIAL_SUFFIX)].rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() else None
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                stale.append(p)
            elif pid is None or pid != os.getpid():
                unknown.append(p)
    return stale, unknown


def remove_path(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str], label: str = "tmp") -> Iterator[Path]:
    """A private temporary folder inside ``parent`` (same file system, so renames out of it are atomic)."""
    parent = Path(parent)
    made: list[Path] = []
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temporary_dir(parent, label, made)
        except OSError as e:
            raise write_failure(e, parent) or CvtDeployError(
                f"cannot write to {parent}: {e.strerror}", "choose an output location you can write to") from None
        with write_errors(parent):
            yield tmp
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def make_temporary_dir(parent: Path, label: str, made: list[Path]) -> Path:
    """``mkdtemp`` for a writer's temporary folder (``.LABEL.PID.RANDOM.partial``), appended to
    ``made``, which the caller's ``finally`` removes. Signals wait until it is in ``made``: a
    Ctrl-C between the folder's creation and its name reaching the caller would leave it behind."""
    with signals_held():
        path = Path(tempfile.mkdtemp(prefix=partial_name(label), suffix=PARTIAL_SUFFIX, dir=parent))
        made.append(path)
    return path


@contextlib.contextmanager
def temp_files_in(folder: Path) -> Iterator[None]:
    """Point Python's ``tempfile`` (what libraries use for their scratch files) at ``folder``.

    Libraries that publish where they put their scratch files for their own subprocesses
    (torch's inductor sets TORCHINDUCTOR_CACHE_DIR) get their variables back afterwards:
    they would point into ``folder`` after it is gone, and whatever ran next would recreate it.
    """
    previous, environ = tempfile.tempdir, dict(os.environ)
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        inside = str(folder) + os.sep
        for key, value in list(os.environ.items()):
            if value.startswith(inside) and environ.get(key) != value:
                if key in environ:
                    os.environ[key] = environ[key]
                else:
                    del os.environ[key]


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A write the operating system refuses (disk full, read-only...) becomes one
    :class:`CvtDeployError` naming ``path``, with the temporary file removed.
    """
    path = Path(path)
    if path.is_dir():
        raise CvtDeployError(f"cannot write {path}: it is a folder", "name a file (inside it, or elsewhere)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=partial_name(path.name), suffix=PARTIAL_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_failure(e, path) or CvtDeployError(
            f"cannot write {path}: {e.strerror}", "choose an output location you can write to") from None
    os.close(fd)
    tmp = Path(name)
    try:
        with write_errors(path):
            yield tmp
        with write_errors(path, any_cause=True):
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it normal file permissions
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex digest of a file (or of a folder's files in name order), for provenance records."""
    import hashlib

    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


_WHOLE = re.compile(r"-?[0-9]+")  # the sign, so that a range check can say what is allowed
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def parse_whole(text: str) -> int:
    """A whole number written in the digits 0-9, nothing else: Python's ``int`` also takes
    "１２" or "٣" (other scripts' digits), "1_000" and " 8 ", which look like numbers but are
    not what anyone typed on purpose. ValueError otherwise."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(f"{text!r} is not a whole number written in the digits 0-9")
    return int(text)


def parse_decimal(text: str) -> float:
    """A finite decimal number in ASCII (``float`` also takes "nan", "inf" and other scripts'
    digits). ValueError otherwise."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise ValueError(f"{text!r} is not a decimal number")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is out of range")
    return value


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask; a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def ort_session(path: str | os.PathLike[str] | bytes, threads: int | None = None,
                providers: Sequence[str] = ("CPUExecutionProvider",), spin: bool = True, optimize: bool = True) -> Any:
    """An ONNX Runtime session with cvt-deploy's settings (quiet log; ``threads`` intra-op
    threads and one inter-op thread when given). The one place sessions are configured.
    ``spin=False``: its idle threads sleep at once, for sessions timed in turn with many others
    in sub-millisecond calls (each one's spinning threads would otherwise hold the cores the
    next one runs on: measured 4x on the 2-core machine). ``optimize=False``: the graph runs
    as written, unfused (what ONNX Runtime's calibrator does: int8 calibration matches it bit for bit)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=list(providers))


def require_writable(out: Path) -> None:
    """A read-only, immutable or foreign folder is refused before minutes of work, not after them."""
    where = next((p for p in (out, *out.parents) if p.is_dir()), None)
    if where is None:
        return
    try:  # an unnamed file where the system has them (O_TMPFILE): nothing to see, nothing a kill leaves
        with tempfile.TemporaryFile(prefix=partial_name(out.name), suffix=PARTIAL_SUFFIX, dir=where):
            pass
    except OSError as e:
        raise write_failure(e, out) or CvtDeployError(
            f"cannot write {out}: {e.strerror}", "choose an output location you can write to") from None
