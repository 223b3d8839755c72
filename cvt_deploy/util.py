"""The ground floor: plumbing every layer shares, importing nothing of cvt-deploy but errors.

Precision names, batch ranges, the ``cvt_deploy.*`` metadata keys (safetensors metadata and
ONNX ``metadata_props``) and their encoding, atomic file writes, hashing and tool versions.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import CvtDeployError

VERSION = "0.1.0"  # cvt_deploy.__version__; keep in step with pyproject.toml
PRECISIONS = ("fp32", "fp16", "int8")

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


def check_precision(precision: Any, what: str = "precision") -> str:
    """``precision`` if it is one cvt-deploy knows, else an error naming it."""
    if precision not in PRECISIONS:
        raise CvtDeployError(f"unknown {what} {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return str(precision)


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
                                 "pass --batch N for a fixed batch or --batch MIN:OPT:MAX")

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'8' (fixed), '1:32' (opt = max), '1:8:32'."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise CvtDeployError(f"--batch {text!r} is not a number or range", "use e.g. 8, 1:32 or 1:8:32") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], min(max(8, parts[0]), parts[1]), parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise CvtDeployError(f"--batch {text!r} has too many parts", "use e.g. 8, 1:32 or 1:8:32")

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


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str], label: str = "tmp") -> Iterator[Path]:
    """A private temporary folder inside ``parent`` (same file system, so renames out of it are atomic)."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{label}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise CvtDeployError(f"cannot write to {parent}: {e.strerror}", "choose an output location you can write to") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise CvtDeployError(f"cannot write {path}: {e.strerror}", "choose an output location you can write to") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
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


def read_json_object(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is an error naming the file and ``fix``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass an existing, readable JSON file") from None
    except ValueError as e:
        raise CvtDeployError(f"{path} is not valid JSON ({e})", fix) from None
    if not isinstance(raw, dict):
        raise CvtDeployError(f"{path} holds a JSON {type(raw).__name__}, not an object", fix)
    return raw


def ort_session(path: str | os.PathLike[str], threads: int | None = None,
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime session with cvt-deploy's settings (quiet log; ``threads`` intra-op
    threads and one inter-op thread when given). The one place sessions are configured."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=list(providers))
