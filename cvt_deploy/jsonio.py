"""Reading what someone else wrote: JSON files, bounded and strict.

Manifests, sidecars, configs, caches and results come from files a user (or a colleague, or a
download) hands us. Everything read here is bounded by size before it is read, and every way
it can be wrong is a ValueError (or a CvtDeployError naming the file), never a RecursionError,
a NaN or an infinity taken for a number. Imports nothing of cvt-deploy but errors.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import CvtDeployError

# The largest JSON file cvt-deploy reads (manifests, configs with 22k labels, sidecars, caches
# are all under a few MiB): a bigger one is refused by its size before it is read.
MAX_JSON_BYTES = 64 << 20


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


class TooLarge(ValueError):
    """A file over the size cvt-deploy reads of its kind."""


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for text someone else wrote: every failure is a ValueError, NaN, Infinity
    and numbers like 1e400 (which Python reads as inf) included, and nesting too deep to read."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("it nests deeper than cvt-deploy reads") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; OSError when unreadable, ValueError when too big or not JSON."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""  # read() bounds a growing file
    if max(size, len(data)) > MAX_JSON_BYTES:
        raise TooLarge(f"it is {'at least ' if size <= MAX_JSON_BYTES else ''}{max(size, len(data)):,} bytes, over the "
                       f"{MAX_JSON_BYTES >> 20} MiB a cvt-deploy JSON file may be")
    return parse_json(data)


def read_json_object(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is an error naming the file and ``fix``."""
    path = Path(path)
    try:
        raw = read_json(path)
    except OSError as e:
        raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass an existing, readable JSON file") from None
    except ValueError as e:
        what = "is too large to read" if isinstance(e, TooLarge) else "is not valid JSON"
        raise CvtDeployError(f"{path} {what} ({e})", fix) from None
    if not isinstance(raw, dict):
        raise CvtDeployError(f"{path} holds a JSON {type(raw).__name__}, not an object", fix)
    return raw
