"""The run: every backend x precision x batch of one bundle, loaded, warmed up and timed interleaved."""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import backends as rt
from ..artifacts import PRECISION, REFERENCE
from ..bundle import Bundle
from ..errors import CvtDeployError
from ..preprocess import normalize
from ..progress import stage
from ..runtimes.base import Runtime
from ..util import PRECISIONS, default_threads
from .cost import count_macs, linear_gemms
from .facts import BASELINE, host_meta, loadavg, matmul_meta, peak_cuda_mb, peak_rss_mb, recorded_parity, weights_mb
from .limits import Ceiling, LinearGemms, best, ceilings, fits_llc, int8_attainable, int8_limit, linear_gemm_cases, llc_bytes
from .results import BenchResult, BenchRow
from .timing import Case, TimingOptions, check_settings, measure_interleaved, summarize

if TYPE_CHECKING:
    from ..config import CvtConfig
    from ..util import BatchRange

#: One combination to time: (backend, precision, batch, role: "baseline" | "reference" | "backend").
Combo = tuple[str, str, int, str]


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
            if out[name] is None and cls.artifact_in(bundle, device=device) is None:
                out[name] = f"the bundle has no {' or '.join(cls.kinds())} artifact"
        return out


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
    #: The fields above that the load test shares, validated there (built here, not passed).
    timing: TimingOptions = field(init=False, repr=False, compare=False)

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
        object.__setattr__(self, "timing", TimingOptions(min_time=self.min_time, warmup=self.warmup, rounds=self.rounds,
                                                         settle=self.settle, threads=self.threads))
        # Named as cvt-bench spells them: the CLI passes its flags straight through.
        check_settings([("--" + name.replace("_", "-"), getattr(self, name), low) for name, low in (
            ("iterations", 1), ("min_iterations", 1), ("matmul_size", 16))])

    @classmethod
    def with_timing(cls, timing: TimingOptions, **fields: Any) -> BenchOptions:
        """The options with ``timing``'s fields (``cvt-bench`` builds one for the benchmark and the load test)."""
        return cls(**timing.fields(), **fields)


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
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = loadavg()
    run = _Run.of(bundle if isinstance(bundle, Bundle) else Bundle.open(bundle), options)
    _set_torch_threads(run.threads)
    references = _references(options)
    combos = _combinations(run, options.reference, references)
    reasons = _backend_reasons(run.bundle, run.device, run.backends)
    reasons.update({name: rt.backend_class(name).unavailable_reason(run.device) for name in references})
    runtimes = _load_runtimes(run, combos, reasons, progress)
    rows, cases = _rows(run, combos, runtimes)
    gemms, linear = _measure(run, options, rows, cases, progress)

    macs = count_macs(run.cfg)
    llc = llc_bytes() if run.device == "cpu" else None
    for i, case in cases.items():
        row = rows[i]
        if _fill_timings(row, case, macs, gemms):
            row.weights_mb = weights_mb(run.bundle, runtimes[i])
            row.weights_fit_llc = fits_llc(None if row.weights_mb is None else int(row.weights_mb * 2**20), llc)
    _fill_ratios(rows)
    limit = int8_limit(gemms)
    _fill_int8(rows, limit, linear)
    t = options.timing
    meta = {"model": run.cfg.variant, "img_size": run.cfg.img_size, "num_classes": run.cfg.num_classes, "macs": macs,
            "gmacs": macs / 1e9, "bundle": str(run.bundle.root), "device": run.device, "threads": run.threads,
            "thread_controls": "torch.set_num_threads (process-wide), onnxruntime intra_op_num_threads and "
                               "openvino INFERENCE_NUM_THREADS",
            "warmup": max(1, t.warmup), "rounds": t.rounds, "settle": t.settle, "iterations": options.iterations,
            "min_time_s": t.min_time, "matmul": matmul_meta(options.matmul_size, gemms, limit, linear),
            **host_meta(run.device, llc, load_before, started),
            "timing": "per-iteration time.perf_counter around runtime.run (+ synchronize), interleaved rounds; "
                      "percentiles interpolate linearly"}
    return BenchResult(rows, meta)


@dataclass(frozen=True)
class _Run:
    """What one run covers: the options' choices, the bundle's defaults where none was made."""

    bundle: Bundle
    backends: list[str]
    precisions: list[str]
    batches: list[int]
    threads: int
    device: str

    @classmethod
    def of(cls, bundle: Bundle, options: BenchOptions) -> _Run:
        backends = list(options.backends or rt.PREFERENCE)
        precisions = list(options.precisions or sorted({a.precision for a in bundle.artifacts.values()},
                                                       key=PRECISIONS.index) or ["fp32"])
        batches = list(options.batches or default_batches(bundle.batch))
        check_batches(bundle, batches)
        return cls(bundle, backends, precisions, batches, options.threads or default_threads(), options.device)

    @property
    def cfg(self) -> CvtConfig:
        return self.bundle.config


def _set_torch_threads(threads: int) -> None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)  # process-wide: the torch backend, HF and the matmul all use it


def _references(options: BenchOptions) -> list[str]:
    return [name for name, wanted in (("hf-transformers", options.hf_reference),
                                      ("torch-compile", options.compiled_reference),
                                      ("openvino-plain", options.openvino_reference)) if wanted]


def _combinations(run: _Run, reference: bool, references: list[str]) -> list[Combo]:
    """The baseline and the references first at each batch, then the backends asked for."""
    combos: list[Combo] = []
    for b in run.batches:
        if reference or (BASELINE[0] in run.backends and BASELINE[1] in run.precisions):
            combos.append((*BASELINE, b, "baseline"))
        combos += [(name, p, b, "reference") for name in references
                   for p in (run.precisions if name in rt.GRAPH_REFERENCES else ["fp32"])]
        combos += [(be, p, b, "backend") for be in run.backends for p in run.precisions if (be, p) != BASELINE]
    return combos


def _load_runtimes(run: _Run, combos: list[Combo], reasons: dict[str, str | None], progress: bool) -> list[Runtime | str]:
    """Each combination's runtime as load() gives it for its batch size (the graph measured fastest
    for it), loaded once per graph and shared by the batch sizes that run it; or why not."""
    loaded: dict[tuple[str, str, str], Runtime | str] = {}
    out = []
    with stage(f"loading {len({c[:2] for c in combos})} runtimes", progress):
        from ..runtimes.choice import fastest

        for backend, precision, batch, _ in combos:
            choice = fastest(run.bundle, precision, batch, [backend]) if (run.device or "cpu") == "cpu" else None
            key = (backend, precision, choice.artifact if choice else "")
            if key not in loaded:
                loaded[key] = _load(run, backend, precision, batch, reasons.get(backend))
            out.append(loaded[key])
    return out


def _load(run: _Run, backend: str, precision: str, batch: int, why: str | None) -> Runtime | str:
    if why is not None:
        return why
    try:
        return rt.load(run.bundle, backend, run.device, precision, run.threads, batch=batch)
    except CvtDeployError as e:  # e.g. no int8 artifact, fp16 torch on CPU: a skipped row
        return e.message


def _rows(run: _Run, combos: list[Combo], runtimes: list[Runtime | str]) -> tuple[list[BenchRow], dict[int, Case]]:
    """A row per combination, and a case to time for each that can run (by row index)."""
    cfg = run.cfg
    rows: list[BenchRow] = []
    cases: dict[int, Case] = {}
    inputs: dict[int, np.ndarray] = {}
    for (backend, precision, b, role), runtime in zip(combos, runtimes):
        row = BenchRow(cfg.variant, backend, precision, b, run.device, run.threads, role=role)
        row.graph = getattr(runtime, "artifact", None)
        row.accuracy, row.top1_agreement = recorded_parity(run.bundle, backend, precision, runtime)
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
    return rows, cases


def _measure(run: _Run, options: BenchOptions, rows: list[BenchRow], cases: dict[int, Case],
             progress: bool) -> tuple[list[Ceiling], list[LinearGemms]]:
    """Every case, the matmul ceilings and the model's Linear GEMMs, timed interleaved."""
    all_cases = list(cases.values())
    row_of = {id(case): rows[i] for i, case in cases.items()}

    def note_memory(case: Case) -> None:
        # process-wide peak once this combination is loaded and warm (warm-up runs in row order)
        if id(case) in row_of:
            row_of[id(case)].peak_rss_mb = round(peak_rss_mb(), 1)
            row_of[id(case)].peak_cuda_mb = peak_cuda_mb(run.device)

    t = options.timing
    gemms = ceilings(options.matmul_size, run.device, run.threads)
    # The model's own Linear GEMMs, where int8 rows are measured against them (int8_attainable).
    int8_batches = sorted({rows[i].batch for i in cases if PRECISION[rows[i].precision].integer})
    linear = linear_gemm_cases(linear_gemms(run.cfg), int8_batches, run.threads) if run.device == "cpu" else []
    if progress:
        print(f"benchmarking {len(all_cases)} combinations ({len(rows) - len(all_cases)} skipped) of {run.cfg.variant} "
              f"on {run.device} with {run.threads} threads, {t.rounds} interleaved rounds", file=sys.stderr)
    linear_cases = [case for group in linear for pair in group.cases for case in pair[:2]]
    measure_interleaved(all_cases + [c.case for c in gemms] + linear_cases, iterations=options.iterations,
                        min_time=t.min_time, warmup=t.warmup, rounds=t.rounds, settle=t.settle,
                        min_iterations=options.min_iterations, progress=progress, after_warmup=note_memory)
    return gemms, linear


def _fill_timings(row: BenchRow, case: Case, macs: int, gemms: list[Ceiling]) -> bool:
    """The row's latency statistics, throughput and share of the matmul ceiling; False (and why
    in the row) when it has none."""
    if case.error is not None or not case.times:
        row.status, row.reason = "failed", case.error or "no timings"
        return False
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
    return True


def _fill_ratios(rows: list[BenchRow]) -> None:
    """ratio_vs_torch: the baseline's p50 at the same batch over each row's."""
    for row in rows:
        base = next((r for r in rows if (r.backend, r.precision, r.batch) == (*BASELINE, row.batch) and r.p50_ms), None)
        if base is not None and row.p50_ms:
            assert base.p50_ms is not None
            row.ratio_vs_torch = round(base.p50_ms / row.p50_ms, 3)


def _fill_int8(rows: list[BenchRow], limit: float | None, linear: list[LinearGemms]) -> None:
    """Each int8 row's speed-up over its backend's fp32 row, against what the CPU's GEMMs allow."""
    for row in rows:
        fp32 = next((r for r in rows if (r.backend, r.precision, r.batch) == (row.backend, REFERENCE, row.batch) and r.p50_ms), None)
        if PRECISION[row.precision].integer and row.p50_ms and fp32 is not None and fp32.p50_ms:
            row.int8_speedup = round(fp32.p50_ms / row.p50_ms, 3)
            row.int8_speedup_of_limit = None if limit is None else round(row.int8_speedup / limit, 3)
            group = next((g for g in linear if g.batch == row.batch), None)
            attainable = int8_attainable(fp32.p50_ms, group) if group is not None else None
            if attainable:
                row.int8_attainable = round(attainable, 3)
                row.int8_speedup_of_attainable = round(row.int8_speedup / attainable, 3)
