"""The calibration cache of :func:`~cvt_deploy.export.int8.quantize_int8`: where it may live
(:func:`check_cache_location`: a user's other file is never overwritten), the ranges read back
(a damaged or foreign file means calibrating again, never a failed export) and written."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import CvtDeployError
from ..jsonio import read_json
from ..util import atomic_output

CACHE_FORMAT = "cvt-deploy-calibration"
CACHE_VERSION = 1  # export/calibrate.py gives ONNX Runtime's ranges: caches of either serve both


def check_cache_location(cache: Path) -> Path:
    """``cache`` if it is a folder, a path to create, or one of our cache files; a user's
    other file is never overwritten with a cache."""
    if cache.is_dir() or not cache.exists():
        return cache
    if cache.is_file() and cache.suffix.lower() == ".json":
        with contextlib.suppress(OSError, ValueError):
            raw = read_json(cache)
            if isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT:
                return cache
    raise CvtDeployError(f"--calib-cache {cache} is an existing file that is not a cvt-deploy calibration cache; "
                         "refusing to overwrite it",
                         "pass a folder (one cache file per model and data is kept inside) or a new FILE.json; "
                         "if it is a damaged cache of ours, delete it")


def cache_file(cache: Path, key: str) -> Path:
    """``cache`` is a folder (one file per key inside) or a single ``.json`` file."""
    check_cache_location(cache)
    if cache.is_dir() or (not cache.exists() and cache.suffix.lower() != ".json"):
        return cache / f"calib-{key[:24]}.json"
    return cache


def _finite_number(v: Any) -> bool:
    if isinstance(v, dict):  # ORT serialises numpy values as {"data": x or [x], "dtype": ..., "CLS": "numpy.array"}
        v = v.get("data")
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached ranges for ``key``; None (calibrate again, then rewrite it) when missing,
    for other data, or damaged (said on stderr, naming the file: a cache never fails an export)."""
    if not path.exists():
        return None
    try:
        raw = read_json(path)
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            raise ValueError("not a cvt-deploy calibration cache")
        if raw.get("key") != key:
            return None
        ranges = raw.get("ranges")
        data = ranges.get("data") if isinstance(ranges, dict) else None
        if not isinstance(data, dict) or not data:
            raise ValueError("it holds no ranges")
        for name, r in data.items():
            if not (isinstance(r, dict) and _finite_number(r.get("lowest")) and _finite_number(r.get("highest"))):
                raise ValueError(f"the range of {name!r} is not two finite numbers")
        return ranges
    except (OSError, ValueError) as e:
        print(f"  note: ignoring the damaged calibration cache {path} ({e}); calibrating again and rewriting it",
              file=sys.stderr)
        return None


def write_cache(path: Path, key: str, method: str, samples: int, ranges: dict[str, Any]) -> None:
    import onnxruntime

    payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "method": method, "samples": samples,
               "onnxruntime": onnxruntime.__version__, "ranges": ranges}
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(payload))
    except (CvtDeployError, OSError) as e:  # an unwritable cache must not fail the export
        print(f"  note: calibration cache not written: {getattr(e, 'message', e)}", file=sys.stderr)
