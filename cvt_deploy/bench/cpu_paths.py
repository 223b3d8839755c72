"""Timing a bundle's CPU paths on this CPU and recording the fastest in its manifest
(``record_cpu_timings``: at export, and by ``cvt-bench --record``). What is recorded, and how
``load`` follows it, is :mod:`cvt_deploy.runtimes.choice`'s; measuring is a benchmark's job, so it
lives here, above the runtimes it times.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..cpu import cpu_key
from ..artifacts import PRECISION
from ..errors import CvtDeployError
from ..preprocess import normalize
from ..progress import stage
from ..runtimes.choice import BATCHES, MANIFEST_KEY, cpu_paths, open_path, path_name
from ..util import PRECISIONS, default_threads, tool_versions
from .timing import Case, measure_interleaved, summarize

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..runtimes.base import Runtime


def record_cpu_timings(bundle: Bundle, precisions: Sequence[str] | None = None, batches: Sequence[int] = BATCHES,
                       threads: int | None = None, min_time: float = 0.1, progress: bool = True) -> dict[str, Any] | None:
    """Time every CPU path of the bundle where a precision has more than one, interleaved, and
    record the p50s in the manifest under this CPU's key; returns the entry (None: nothing to choose)."""
    wanted = [p for p in PRECISIONS if p in (precisions or {a.precision for a in bundle.artifacts.values()})]
    # A precision the CPU backends compute in f32 (fp16: docs/precision.md) is never the fast path.
    paths = {p: cpu_paths(bundle, p) for p in wanted if PRECISION[p].cpu_arithmetic}
    paths = {p: found for p, found in paths.items() if len(found) > 1}
    sizes = [b for b in batches if bundle.batch.min <= b <= bundle.batch.max] or [bundle.batch.opt]
    if not paths:
        return None
    cfg = bundle.config
    threads = threads or default_threads()  # as cvt-bench times by default
    entry: dict[str, Any] = {"threads": threads, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "versions": tool_versions(("onnxruntime", "openvino")), "batches": {}}
    count = sum(len(found) for found in paths.values())
    skipped: list[str] = []  # paths that failed to open or run: left out of the choice, said why
    with stage(f"timing {count} CPU paths at batch {', '.join(map(str, sizes))} (for load's choice on this CPU)", progress):
        runtimes: dict[tuple[str, str, str], Runtime] = {}
        cases: dict[tuple[str, str, str, int], Case] = {}
        try:
            for p, found in paths.items():
                for b, a in found:
                    try:
                        runtimes[(p, b, a)] = open_path(bundle, b, a, threads)
                    except CvtDeployError as e:  # a speed-up only: a path that cannot open is not timed, the rest are
                        skipped.append(f"{b} {a}: {e.message}")
            for n in sizes:
                pixels = np.random.default_rng(n).integers(0, 256, (n, cfg.img_size, cfg.img_size, cfg.in_chans),
                                                           dtype=np.uint8)
                x = normalize(pixels, cfg.preprocess)
                for (p, b, a), runtime in runtimes.items():
                    cases[(p, b, a, n)] = Case.for_runtime(f"{b} {a} b{n}", runtime,
                                                           x if runtime.input_format == "float" else pixels)
            measure_interleaved(list(cases.values()), min_time=min_time, warmup=2, rounds=3, min_iterations=3,
                                progress=False)
        finally:
            for runtime in runtimes.values():
                runtime.close()
    skipped += [f"{b} {a} at batch {n}: {case.error}" for (p, b, a, n), case in cases.items() if case.error]
    for (p, b, a, n), case in cases.items():
        if case.times:
            entry["batches"].setdefault(str(n), {}).setdefault(p, {})[path_name(b, a)] = round(summarize(case.times).p50, 3)
    from ..bundle_write import changing

    with changing(bundle):
        bundle.extra.setdefault(MANIFEST_KEY, {})[cpu_key()] = entry
    for line in skipped:
        print(f"  note: not timed, so never chosen: {line}", file=sys.stderr)
    if progress:
        for n, by_precision in entry["batches"].items():
            for p, times in by_precision.items():
                best = min(times, key=times.__getitem__)
                print(f"  {p} batch {n}: fastest {best} ({times[best]:.2f} ms; "
                      + ", ".join(f"{k} {v:.2f}" for k, v in times.items() if k != best) + ")", file=sys.stderr)
    return entry
