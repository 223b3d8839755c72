"""Which of a bundle's CPU paths is fastest on this CPU: timed (at export, or by ``cvt-bench
--record``: :func:`cvt_deploy.bench.cpu_paths.record_cpu_timings`), recorded in the manifest per
CPU, and followed by :func:`cvt_deploy.backends.load`.

A bundle holds several graphs a CPU can run at one precision (the portable graph, the ONNX
Runtime CPU graph, an OpenVINO IR) and two CPU backends to run them, and no fixed order is
fastest everywhere. Measured with 2 threads: on CvT-13 OpenVINO's IR won fp32 and int8 at
batch 1 and 8 on an AMX and on a VNNI CPU (docs/openvino.md), but with the portable graph and
no IR ONNX Runtime's CPU graph won fp32 at batch 1 on the AMX CPU (40.8 vs 43.2 ms); on the
demo model ONNX Runtime's CPU int8 graph wins at batch 1; on an AVX2 CPU without VNNI,
OpenVINO's int8 was the slower one. So the order is measured where the bundle runs, and a path
that missed its gates on its backend is never among them.

Manifest, ``cpu_timings``: one entry per CPU (:func:`cpu_key`: architecture and the SIMD
features that decide these kernels, and a oneDNN instruction-set cap where one is set), each ``{"threads": N, "measured": ISO time, "versions":
{...}, "batches": {"8": {"int8": {"openvino:onnx-int8": 111.3, ...}}}}`` in milliseconds
(p50). A bundle copied to another CPU keeps its entries; ``load`` uses only this CPU's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..artifacts import candidates
from ..cpu import cpu_key
from ..errors import CvtDeployError

if TYPE_CHECKING:
    from ..bundle import Bundle
    from .base import Runtime
    from .openvino import OpenVinoRuntime
    from .ort import OrtRuntime

MANIFEST_KEY = "cpu_timings"
CPU_BACKENDS = ("onnxruntime", "openvino")
BATCHES = (1, 8)  # timed at export, inside the bundle's batch range


def path_name(backend: str, artifact: str) -> str:
    """A path's key in the manifest's timings: ``openvino:onnx-int8``."""
    return f"{backend}:{artifact}"


def cpu_paths(bundle: Bundle, precision: str, backends: Sequence[str] = CPU_BACKENDS) -> list[tuple[str, str]]:
    """(backend, artifact) pairs that run ``precision`` of the bundle on this CPU: ONNX Runtime on each
    CPU-capable graph, OpenVINO on its IR where there is one (else the portable graph: the same network)."""
    out = []
    for backend in backends:
        if backend not in CPU_BACKENDS or _runtime_class(backend).unavailable_reason("cpu") is not None:
            continue
        found = candidates(bundle, backend, precision, "cpu")
        # A graph that missed its gates as this backend runs it (the advisory check at export) is never chosen.
        out += [(backend, a.name) for a in found if (a.parity_on(backend) or {}).get("passed") is not False]
    return out


def open_path(bundle: Bundle, backend: str, artifact: str, threads: int | None = None,
              device: str | None = "cpu") -> Runtime:
    """The runtime of ``backend`` (onnxruntime or openvino) on exactly the graph ``artifact``:
    one path of :func:`cpu_paths`, or (``device``) the graph a parity check names."""
    cls = _runtime_class(backend)
    reason = cls.unavailable_reason(device)
    if reason is not None:
        raise CvtDeployError(f"backend {backend} cannot run here: {reason}", cls.install_hint)
    return cls.from_bundle(bundle, device=device, threads=threads, artifact=artifact)


def _runtime_class(backend: str) -> type[OrtRuntime] | type[OpenVinoRuntime]:
    # The two CPU backends by name (backends.py imports this module: no backend_class here).
    from .openvino import OpenVinoRuntime
    from .ort import OrtRuntime

    return {cls.backend: cls for cls in (OrtRuntime, OpenVinoRuntime)}[backend]


@dataclass(frozen=True)
class Choice:
    """The fastest recorded CPU path for one precision and batch size, and what it was measured against."""

    backend: str
    artifact: str
    batch: int
    ms: float
    others: dict[str, float]

    def sentence(self) -> str:
        rest = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.others.items(), key=lambda kv: kv[1]))
        return (f"{self.backend} on {self.artifact}: the fastest of {len(self.others) + 1} paths timed on this CPU "
                f"at batch {self.batch} "
                f"({self.ms:.2f} ms" + (f"; {rest}" if rest else "") + ")")


def fastest(bundle: Bundle, precision: str, batch: int | None = None,
            backends: Sequence[str] = CPU_BACKENDS) -> Choice | None:
    """The recorded fastest of ``backends``' CPU paths for ``precision`` at the measured batch size
    nearest ``batch`` (default 1) on this CPU; None when none is recorded for this CPU or it no
    longer applies (a path gone from the bundle, a backend not installed)."""
    entries = bundle.extra.get(MANIFEST_KEY)
    entry = entries.get(cpu_key()) if isinstance(entries, dict) else None
    measured = entry.get("batches") if isinstance(entry, dict) else None
    if not isinstance(measured, dict):
        return None
    # The manifest is a file anyone may edit: what is not {"N": {precision: {path: ms}}} is passed over
    # (N in the digits 0-9: str.isdigit also takes '¹', which int refuses, and '٣', which int reads as 3).
    by_size = {int(k): v[precision] for k, v in measured.items()
               if str(k).isascii() and str(k).isdigit() and int(k) > 0 and isinstance(v, dict) and isinstance(v.get(precision), dict)}
    if not by_size:
        return None
    want = batch or 1
    n = min(by_size, key=lambda s: (abs(np.log(s / want)), s))
    live = {path_name(b, a) for b, a in cpu_paths(bundle, precision, backends)}
    times = {k: float(v) for k, v in by_size[n].items()
             if k in live and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
    if len(times) < 2:  # one path left: nothing was chosen
        return None
    best = min(times, key=times.__getitem__)
    backend, artifact = best.split(":", 1)
    return Choice(backend, artifact, n, times[best], {k: v for k, v in times.items() if k != best})


def check_batch(batch: object) -> int | None:
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise CvtDeployError(f"batch {batch!r} must be a whole number >= 1", "pass the batch size you will run, e.g. 8")
    return batch
