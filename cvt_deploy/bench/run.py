"""The run: every backend x precision x batch of one bundle, loaded, warmed up and timed interleaved."""
from __future__ import annotations

import importlib.util
import os
import platform
import resource
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import backends as rt
from ..bundle import Bundle
from ..cpu import cpu_key
from ..errors import CvtDeployError
from ..preprocess import normalize
from ..progress import stage
from ..runtimes.base import Runtime
from ..util import PRECISIONS, default_threads, tool_versions
from .cost import count_macs, linear_gemms
from .limits import (SYSFS_CACHE, best, ceilings, ceilings_meta, fits_llc, int8_attainable, int8_limit, linear_gemm_cases,
                     llc_bytes)
from .results import BenchResult, BenchRow
from .timing import Case, check_settings, measure_interleaved, summarize

if TYPE_CHECKING:
    from ..util import BatchRange

BASELINE = ("torch", "fp32")  # what ratio_vs_torch divides by: our model, PyTorch eager, fp32


def _loadavg() -> float | None:
    """1-minute system load average (None where the OS has none): shows competing processes."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


def _peak_cuda_mb(device: str) -> float | None:
    if not device.startswith("cuda") or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def _backend_reasons(bundle: Bundle, device: str, names: Sequence[str]) -> dict[str, str | None]:
    """Why each backend cannot run here (None = it can), as :func:`runtimes.available_backends` says."""
    try:
        return rt.available_backends(bundle, device)
    except ImportError:
        # One backend's module failing to import must not hide the others: ask each alone.
        out: dict[str, str | None] = {}
        for name in names:
            try:
                cls = rt.backend_class(name)
            except ImportError as e:
                out[name] = f"the {name} backend module cannot be imported ({e})"
                continue
            out[name] = cls.unavailable_reason(device)
            if out[name] is None and bundle.find(cls.artifact_kind) is None:
                out[name] = f"the bundle has no {cls.artifact_kind} artifact"
        return out


def _recorded_parity(bundle: Bundle, backend: str, precision: str,
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
            found = bundle.find(rt.backend_class(backend).artifact_kind, precision)
        except ImportError:
            return None, None
    parity = found.parity_on(backend) if found is not None else None
    if parity is None:
        return None, None

    def first(*keys: str) -> float | None:
        return next((float(parity[k]) for k in keys if parity.get(k) is not None), None)

    return first("accuracy_candidate", "accuracy"), first("top1_agreement", "agreement")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ceiling_name(gemms: list[Any], precision: str) -> str | None:
    found = best(gemms, precision)
    return None if found is None else found.name


def _weights_mb(bundle: Bundle, runtime: Runtime | str) -> float | None:
    """Size of the file the runtime's weights come from (its graph, engine or safetensors), MB."""
    if isinstance(runtime, str):
        return None
    path = getattr(runtime, "path", None)
    ran = bundle.artifacts.get(runtime.artifact or "")
    if ran is not None and ran.info.get("weights_file"):  # an OpenVINO IR: its .bin, not its .xml
        path = bundle.root / str(ran.info["weights_file"])
    if path is None:
        try:
            art = bundle.find(rt.backend_class(runtime.backend).artifact_kind, runtime.precision)
        except (ImportError, CvtDeployError):
            return None
        path = bundle.path(art) if art is not None else None
    try:
        return round(os.path.getsize(path) / 2**20, 2) if path is not None else None
    except OSError:
        return None


def _versions() -> dict[str, str]:

    return {"python": platform.python_version(),
            **tool_versions(("numpy", "torch", "onnxruntime", "openvino", "tensorrt", "transformers"))}


def _check_choices(values: Sequence[str], choices: Sequence[str], what: str) -> list[str]:
    out = list(dict.fromkeys(values))  # keep order, drop repeats
    for v in out:
        if v not in choices:
            raise CvtDeployError(f"unknown {what} {v!r}", f"choose from: {', '.join(choices)}")
    if not out:
        raise CvtDeployError(f"no {what} given", f"choose from: {', '.join(choices)}")
    return out


def default_batches(batch: BatchRange) -> list[int]:
    """1, 8 and 32 where the bundle's batch range allows; else its optimum."""
    return [b for b in (1, 8, 32) if batch.min <= b <= batch.max] or [batch.opt]


@dataclass(frozen=True)
class BenchOptions:
    """How to time: one object for :func:`benchmark` and ``cvt-bench``, validated here.

    ``backends``: default all (those that cannot run here become skipped rows).
    ``precisions``: default the precisions the bundle holds artifacts for.
    ``batches``: default 1, 8, 32 inside the bundle's batch range.
    ``threads``: CPU threads for every backend; default :func:`default_threads`.
    ``iterations``: timed calls per combination; None = enough for ``min_time`` seconds each
    (at least ``min_iterations``). ``warmup`` untimed calls first, then ``rounds`` interleaved rounds,
    each block after ``settle`` untimed calls (see :func:`measure_interleaved`).
    ``matmul_size``: side of the fp32 matrix multiply that ``pct_matmul_peak`` compares with.
    ``reference``: add PyTorch eager fp32 (the ratio baseline) even if "torch"/"fp32" was not asked for.
    ``hf_reference``: add Hugging Face transformers' CvT at fp32 (a skipped row when it cannot run).
    ``compiled_reference``: add our model through ``torch.compile`` (inductor) at fp32; off by
    default, since each batch size compiles for tens of seconds first.
    ``openvino_reference``: add OpenVINO on the portable graphs as a user's code runs them (one
    dynamic-batch compile: runtimes/openvino.py PlainOpenVinoRuntime) at every precision.
    """

    backends: Sequence[str] | None = None
    precisions: Sequence[str] | None = None
    batches: Sequence[int] | None = None
    threads: int | None = None
    device: str = "cpu"
    iterations: int | None = None
    min_time: float = 2.0
    warmup: int = 3
    rounds: int = 5
    settle: int = 1
    min_iterations: int = 10
    reference: bool = True
    hf_reference: bool = True
    compiled_reference: bool = False
    openvino_reference: bool = False
    matmul_size: int = 2048

    def __post_init__(self) -> None:
        if self.backends is not None:
            object.__setattr__(self, "backends", _check_choices(self.backends, list(rt.BACKENDS), "backend"))
        if self.precisions is not None:
            object.__setattr__(self, "precisions", _check_choices(self.precisions, PRECISIONS, "precision"))
        if self.batches is not None:
            batches = list(dict.fromkeys(self.batches))
            bad = [b for b in batches if not isinstance(b, (int, np.integer)) or b < 1]
            if not batches or bad:
                raise CvtDeployError(f"batch size {bad[0] if bad else 'list'} is {'below 1' if bad else 'empty'}",
                                     "use whole numbers >= 1, e.g. --batch 1,8,32")
            object.__setattr__(self, "batches", batches)
        # Named as cvt-bench spells them: the CLI passes its flags straight through.
        check_settings([("--" + name.replace("_", "-"), getattr(self, name), low) for name, low in (
            ("threads", 1), ("iterations", 1), ("rounds", 1), ("warmup", 0), ("settle", 0), ("min_iterations", 1),
            ("matmul_size", 16))], self.min_time)


def check_batches(bundle: Bundle, batches: Sequence[int]) -> None:
    """Refuse, before anything is loaded, batches the bundle was not exported for or that
    cannot fit in memory (inputs are made up front, one per batch size)."""
    rng = bundle.batch
    outside = [b for b in batches if not rng.min <= b <= rng.max]
    if outside:
        raise CvtDeployError(f"batch size {outside[0]} is outside the bundle's batch range {rng.min}..{rng.max}",
                             f"pick --batch within {rng.min}..{rng.max}, or re-export with cvt-export --batch-range MIN:OPT:MAX")
    cfg = bundle.config
    image_bytes = 4 * cfg.in_chans * cfg.img_size ** 2
    # Activations of one call are many times its input; 16x is a floor, not an estimate.
    need = max(batches) * image_bytes * 16 + sum(batches) * image_bytes
    available = _available_memory()
    if available is not None and need > available:
        raise CvtDeployError(f"batch size {max(batches)} needs at least {need / 2**30:.1f} GiB of memory for inputs and "
                             f"activations; {available / 2**30:.1f} GiB is available",
                             "use smaller --batch sizes")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def benchmark(bundle: Bundle | str | os.PathLike[str], backends: Sequence[str] | None = None,
              precisions: Sequence[str] | None = None, batches: Sequence[int] | None = None, *,
              options: BenchOptions | None = None, progress: bool = True, **fields: Any) -> BenchResult:
    """Time every combination of ``backends`` x ``precisions`` x ``batches`` on one bundle.

    ``options`` (or its fields as keyword arguments: ``threads=2``...) say how; see
    :class:`BenchOptions`.
    """
    if options is not None and (fields or backends or precisions or batches):
        raise TypeError("pass BenchOptions or its fields as arguments, not both")
    options = options or BenchOptions(backends=backends, precisions=precisions, batches=batches, **fields)
    threads, device, iterations, min_time = options.threads, options.device, options.iterations, options.min_time
    warmup, rounds, settle, min_iterations = options.warmup, options.rounds, options.settle, options.min_iterations
    reference, hf_reference, matmul_size = options.reference, options.hf_reference, options.matmul_size
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = _loadavg()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    cfg = bundle.config
    backends = list(options.backends or rt.PREFERENCE)
    precisions = list(options.precisions or sorted({a.precision for a in bundle.artifacts.values()},
                                                   key=PRECISIONS.index) or ["fp32"])
    batches = list(options.batches or default_batches(bundle.batch))
    check_batches(bundle, batches)
    threads = threads or default_threads()
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)  # process-wide: the torch backend, HF and the matmul all use it

    # combinations: the baseline and the references first at each batch, then the backends asked for
    references = [name for name, wanted in (("hf-transformers", hf_reference),
                                            ("torch-compile", options.compiled_reference),
                                            ("openvino-plain", options.openvino_reference)) if wanted]
    combos: list[tuple[str, str, int, str]] = []
    for b in batches:
        if reference or (BASELINE[0] in backends and BASELINE[1] in precisions):
            combos.append((*BASELINE, b, "baseline"))
        combos += [(name, p, b, "reference") for name in references
                   for p in (precisions if name in rt.GRAPH_REFERENCES else ["fp32"])]
        combos += [(be, p, b, "backend") for be in backends for p in precisions if (be, p) != BASELINE]

    reasons = _backend_reasons(bundle, device, backends)
    reasons.update({name: rt.backend_class(name).unavailable_reason(device) for name in references})
    loaded: dict[tuple[str, str, str], Runtime | str] = {}

    def runtime_for(backend: str, precision: str, batch: int) -> Runtime | str:
        """The runtime as load() gives it for this batch size (the graph measured fastest for it),
        loaded once per graph and shared by the batch sizes that run it; or why not."""
        from ..runtimes.choice import fastest

        choice = fastest(bundle, precision, batch, [backend]) if (device or "cpu") == "cpu" else None
        key = (backend, precision, choice.artifact if choice else "")
        if key not in loaded:
            why = reasons.get(backend)
            if why is None:
                try:
                    loaded[key] = rt.load(bundle, backend, device, precision, threads, batch=batch)
                except CvtDeployError as e:  # e.g. no int8 artifact, fp16 torch on CPU: a skipped row
                    loaded[key] = e.message
            else:
                loaded[key] = why
        return loaded[key]

    rows: list[BenchRow] = []
    cases: dict[int, Case] = {}  # row index -> case
    inputs: dict[int, np.ndarray] = {}
    with stage(f"loading {len({c[:2] for c in combos})} runtimes", progress):
        runtimes = [runtime_for(backend, precision, b) for backend, precision, b, _ in combos]
    for (backend, precision, b, role), runtime in zip(combos, runtimes):
        row = BenchRow(cfg.variant, backend, precision, b, device, threads, role=role)
        row.graph = getattr(runtime, "artifact", None)
        row.accuracy, row.top1_agreement = _recorded_parity(bundle, backend, precision, runtime)
        if isinstance(runtime, str):
            row.status, row.reason = "skipped", runtime
        elif runtime.batch_range is not None and not runtime.batch_range.min <= b <= runtime.batch_range.max:
            # run() would split or pad it: that times a different batch than the row claims
            row.status, row.reason = "skipped", (f"batch {b} is outside the artifact's batch range "
                                                 f"{runtime.batch_range.min}..{runtime.batch_range.max} (re-export with cvt-export --batch-range MIN:OPT:MAX)")
        else:
            if b not in inputs:  # one image batch per batch size, shared by every backend
                shape = (b, cfg.img_size, cfg.img_size, cfg.in_chans)
                inputs[b] = np.random.default_rng(b).integers(0, 256, shape, dtype=np.uint8)
            # Float graphs get the batch normalised once, untimed; raw-pixel graphs take the pixels themselves.
            x = normalize(inputs[b], cfg.preprocess) if runtime.input_format == "float" else inputs[b]
            cases[len(rows)] = Case.for_runtime(f"{backend} {precision} b{b}", runtime, x)
        rows.append(row)

    all_cases = list(cases.values())
    row_of = {id(case): rows[i] for i, case in cases.items()}

    def note_memory(case: Case) -> None:
        # process-wide peak once this combination is loaded and warm (warm-up runs in row order)
        if id(case) in row_of:
            row_of[id(case)].peak_rss_mb = round(_peak_rss_mb(), 1)
            row_of[id(case)].peak_cuda_mb = _peak_cuda_mb(device)

    gemms = ceilings(matmul_size, device, threads)
    # The model's own Linear GEMMs, where int8 rows are measured against them (int8_attainable).
    int8_batches = sorted({rows[i].batch for i in cases if rows[i].precision == "int8"})
    linear = linear_gemm_cases(linear_gemms(cfg), int8_batches, threads) if device == "cpu" else []
    if progress:
        print(f"benchmarking {len(all_cases)} combinations ({len(rows) - len(all_cases)} skipped) of {cfg.variant} "
              f"on {device} with {threads} threads, {rounds} interleaved rounds", file=sys.stderr)
    linear_cases = [case for group in linear for pair in group.cases for case in pair[:2]]
    measure_interleaved(all_cases + [c.case for c in gemms] + linear_cases, iterations=iterations, min_time=min_time, warmup=warmup, rounds=rounds,
                        settle=settle, min_iterations=min_iterations, progress=progress, after_warmup=note_memory)

    macs = count_macs(cfg)
    llc = llc_bytes() if device == "cpu" else None
    for i, case in cases.items():
        row = rows[i]
        if case.error is not None or not case.times:
            row.status, row.reason = "failed", case.error or "no timings"
            continue
        s = summarize(case.times)
        row.p50_ms, row.p90_ms, row.p99_ms, row.mean_ms, row.min_ms, row.max_ms = (
            round(v, 4) for v in (s.p50, s.p90, s.p99, s.mean, s.min, s.max))
        row.iterations = s.n
        ips = row.batch / (s.p50 / 1e3)
        row.throughput_ips = round(ips, 3)
        row.gflops = round(macs * 2 * ips / 1e9, 3)
        ceiling = best(gemms, row.precision)
        if ceiling is not None and ceiling.gops:
            row.pct_matmul_peak, row.matmul_ceiling = round(100 * row.gflops / ceiling.gops, 2), ceiling.name
        if case.first is not None:
            row.first_call_ms = round(case.first * 1e3, 4)
        row.weights_mb = _weights_mb(bundle, runtimes[i])
        row.weights_fit_llc = fits_llc(None if row.weights_mb is None else int(row.weights_mb * 2**20), llc)
    for row in rows:
        base = next((r for r in rows if (r.backend, r.precision, r.batch) == (*BASELINE, row.batch) and r.p50_ms), None)
        if base is not None and row.p50_ms:
            assert base.p50_ms is not None
            row.ratio_vs_torch = round(base.p50_ms / row.p50_ms, 3)
    limit = int8_limit(gemms)
    for row in rows:
        fp32 = next((r for r in rows if (r.backend, r.precision, r.batch) == (row.backend, "fp32", row.batch) and r.p50_ms), None)
        if row.precision == "int8" and row.p50_ms and fp32 is not None and fp32.p50_ms:
            row.int8_speedup = round(fp32.p50_ms / row.p50_ms, 3)
            row.int8_speedup_of_limit = None if limit is None else round(row.int8_speedup / limit, 3)
            group = next((g for g in linear if g.batch == row.batch), None)
            attainable = int8_attainable(fp32.p50_ms, group) if group is not None else None
            if attainable:
                row.int8_attainable = round(attainable, 3)
                row.int8_speedup_of_attainable = round(row.int8_speedup / attainable, 3)

    meta = {"model": cfg.variant, "img_size": cfg.img_size, "num_classes": cfg.num_classes, "macs": macs,
            "gmacs": macs / 1e9, "bundle": str(bundle.root), "device": device, "threads": threads,
            "thread_controls": "torch.set_num_threads (process-wide), onnxruntime intra_op_num_threads and "
                               "openvino INFERENCE_NUM_THREADS",
            "warmup": max(1, warmup), "rounds": rounds, "settle": settle, "iterations": iterations, "min_time_s": min_time,
            "matmul": {"size": matmul_size, "ceilings": ceilings_meta(gemms),
                       **{p: _ceiling_name(gemms, p) for p in PRECISIONS},
                       "int8_limit": None if limit is None else round(limit, 3),
                       "linear_gemms": {str(g.batch): {"fp32_ms": _round(g.total_ms(False)), "int8_ms": _round(g.total_ms(True)),
                                                       "shapes": len(g.cases)} for g in linear}},
            "llc_bytes": llc, "llc_source": str(SYSFS_CACHE) if llc else "unknown (no sysfs cache information)",
            "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_cuda_mb": _peak_cuda_mb(device),
            "loadavg_1min": {"before": load_before, "after": _loadavg()},
            "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus_usable": default_threads(),
                     "cpus_total": os.cpu_count(), "cpu": cpu_key()},
            "versions": _versions(), "started": started,
            "timing": "per-iteration time.perf_counter around runtime.run (+ synchronize), interleaved rounds; "
                      "percentiles interpolate linearly"}
    return BenchResult(rows, meta)
