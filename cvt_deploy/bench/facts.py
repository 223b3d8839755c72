"""What a benchmark records beside its timings: each row's recorded parity and weights size, memory
peaks, the machine's load, and the run's ``meta`` (host, versions, the matmul ceilings)."""
from __future__ import annotations

import importlib.util
import os
import platform
import resource
import sys
from typing import Any

from .. import backends as rt
from ..bundle import Bundle
from ..cpu import cpu_key
from ..errors import CvtDeployError
from ..runtimes.base import Runtime
from ..util import PRECISIONS, default_threads, tool_versions
from .limits import SYSFS_CACHE, Ceiling, LinearGemms, best, ceilings_meta

BASELINE = ("torch", "fp32")  # what ratio_vs_torch divides by: our model, PyTorch eager, fp32


def loadavg() -> float | None:
    """1-minute system load average (None where the OS has none): shows competing processes."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


def peak_cuda_mb(device: str) -> float | None:
    if not device.startswith("cuda") or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def recorded_parity(bundle: Bundle, backend: str, precision: str,
                    runtime: Runtime | str) -> tuple[float | None, float | None]:
    """(accuracy, top-1 agreement) recorded for the artifact this row runs, as this backend runs
    it (another backend's figures for the same graph are not this row's), if any."""
    if (backend, precision) == BASELINE:
        # PyTorch fp32 is the reference of every parity check: its accuracy is recorded there.
        for art in bundle.artifacts.values():
            parity = art.info.get("parity")
            if isinstance(parity, dict) and parity.get("accuracy_reference") is not None:
                return float(parity["accuracy_reference"]), None
        return None, None
    path = getattr(runtime, "path", None)
    found = next((a for a in bundle.artifacts.values() if path and str(bundle.path(a)) == str(path)), None)
    if found is None:
        try:
            found = rt.backend_class(backend).artifact_in(bundle, precision)
        except ImportError:
            return None, None
    parity = found.parity_on(backend) if found is not None else None
    if parity is None:
        return None, None

    def first(*keys: str) -> float | None:
        return next((float(parity[k]) for k in keys if parity.get(k) is not None), None)

    return first("accuracy_candidate", "accuracy"), first("top1_agreement", "agreement")


def weights_mb(bundle: Bundle, runtime: Runtime | str) -> float | None:
    """Size of the file the runtime's weights come from (its graph, engine or safetensors), MB."""
    if isinstance(runtime, str):
        return None
    path = getattr(runtime, "path", None)
    ran = bundle.artifacts.get(runtime.artifact or "")
    if ran is not None and ran.info.get("weights_file"):  # an OpenVINO IR: its .bin, not its .xml
        path = bundle.root / str(ran.info["weights_file"])
    if path is None:
        try:
            art = rt.backend_class(runtime.backend).artifact_in(bundle, runtime.precision)
        except (ImportError, CvtDeployError):
            return None
        path = bundle.path(art) if art is not None else None
    try:
        return round(os.path.getsize(path) / 2**20, 2) if path is not None else None
    except OSError:
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ceiling_name(gemms: list[Ceiling], precision: str) -> str | None:
    found = best(gemms, precision)
    return None if found is None else found.name


def _versions() -> dict[str, str]:

    return {"python": platform.python_version(),
            **tool_versions(("numpy", "torch", "onnxruntime", "openvino", "tensorrt", "transformers"))}


def matmul_meta(size: int, gemms: list[Ceiling], limit: float | None, linear: list[LinearGemms]) -> dict[str, Any]:
    """The matmul ceilings the rows were measured against, and the model's own Linear GEMMs."""
    return {"size": size, "ceilings": ceilings_meta(gemms),
            **{p: _ceiling_name(gemms, p) for p in PRECISIONS},
            "int8_limit": None if limit is None else round(limit, 3),
            "linear_gemms": {str(g.batch): {"fp32_ms": _round(g.total_ms(False)), "int8_ms": _round(g.total_ms(True)),
                                            "shapes": len(g.cases)} for g in linear}}


def host_meta(device: str, llc: int | None, load_before: float | None, started: str) -> dict[str, Any]:
    """The machine the run had: memory peaks, load before and after, cache, CPUs, versions."""
    return {"llc_bytes": llc, "llc_source": str(SYSFS_CACHE) if llc else "unknown (no sysfs cache information)",
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_cuda_mb": peak_cuda_mb(device),
            "loadavg_1min": {"before": load_before, "after": loadavg()},
            "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus_usable": default_threads(),
                     "cpus_total": os.cpu_count(), "cpu": cpu_key()},
            "versions": _versions(), "started": started}
