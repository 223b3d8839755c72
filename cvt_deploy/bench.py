"""Latency benchmarks across backends: the library behind ``cvt-bench``.

    >>> from cvt_deploy.bench import benchmark
    >>> result = benchmark("build/cvt13", backends=["onnxruntime", "torch"], batches=[1, 8], threads=2)
    >>> print(result.table())
    >>> result.to_csv("bench.csv"); result.plot("bench.png")

How the numbers are made (and why):

* Every combination backend x precision x batch becomes one row. One that cannot run here
  (backend not installed, no artifact for that precision, torch int8, ...) is a row with
  status ``skipped`` and the reason, so a missing figure is never mistaken for a missing run.
* Each combination is warmed up, then all of them are measured **interleaved**: round 1 runs
  a block of iterations of A, then B, then C; round 2 again A, B, C ... On a shared machine
  the load drifts over seconds; interleaving spreads that drift over every combination
  instead of penalising whichever happened to run during a busy spell.
* Each iteration is timed on its own with ``time.perf_counter`` around ``runtime.run`` and
  the runtime's ``synchronize()`` when it has one (CUDA work is asynchronous). The Python GC
  is paused inside a timed block, as ``timeit`` does.
* One thread count for everything: ``torch.set_num_threads`` (process-wide) and ONNX
  Runtime's ``intra_op_num_threads``.
* A large fp32 matrix multiply is timed as one more interleaved combination: its GFLOP/s is
  what this machine delivers right now, and ``pct_matmul_peak`` puts each model against it.
  The model's MACs come from :func:`count_macs`, computed from the architecture.
* Reference rows: our model in PyTorch eager fp32 (the bundle's ``model.safetensors``) is the
  baseline that ``ratio_vs_torch`` divides by; Hugging Face's ``CvtForImageClassification``
  with the same architecture (random weights: latency does not depend on them) shows how the
  usual off-the-shelf implementation compares.

Output schema (``to_csv`` columns in this order; ``to_json`` rows with the same keys, plus a
``meta`` object): see :data:`COLUMNS`. Blank (CSV) / null (JSON) means "not applicable".
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from . import runtimes as rt
from .bundle import PRECISIONS, Bundle, atomic_output
from .checkpoints import hf_config_kwargs, hf_unsupported
from .config import CvtConfig, mlp_hidden, stage_maps
from .errors import CvtDeployError, require
from .progress import stage, track
from .report import format_table
from .runtimes.base import Runtime

if TYPE_CHECKING:
    from .bundle import BatchRange

__all__ = ["COLUMNS", "SCHEMA", "SCHEMA_VERSION", "BenchResult", "BenchRow", "Case", "HFReferenceRuntime", "Stats",
           "benchmark", "count_macs", "default_threads", "mac_breakdown", "measure_interleaved", "summarize"]

SCHEMA = "cvt-deploy-bench"
SCHEMA_VERSION = 1
BASELINE = ("torch", "fp32")  # what ratio_vs_torch divides by: our model, PyTorch eager, fp32
HF_BACKEND = "hf-transformers"
NOISY = 1.5  # p90 / p50 above this: the table says the row's calls were held up (by other processes)

#: One row per combination, in this order; units are in the names. New columns are only ever
#: appended (bump SCHEMA_VERSION if one changes meaning).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "str", "the bundle's variant, e.g. cvt-13"),
    ("backend", "str", "torch | onnxruntime | tensorrt | hf-transformers"),
    ("precision", "str", "fp32 | fp16 | int8"),
    ("batch", "int", "images per call"),
    ("device", "str", "cpu | cuda"),
    ("threads", "int", "CPU threads (torch.set_num_threads and ORT intra_op_num_threads)"),
    ("status", "str", "ok | skipped (cannot run here) | failed (loaded but raised while running)"),
    ("reason", "str", "why skipped/failed; blank when ok"),
    ("p50_ms", "float", "median latency of one call, milliseconds"),
    ("p90_ms", "float", "90th percentile latency"),
    ("p99_ms", "float", "99th percentile latency (with few iterations this is close to the max)"),
    ("mean_ms", "float", "mean latency"),
    ("min_ms", "float", "fastest call"),
    ("max_ms", "float", "slowest call"),
    ("throughput_ips", "float", "images per second = batch / p50"),
    ("ratio_vs_torch", "float", "speed-up over PyTorch eager fp32 at the same batch = its p50 / this p50 (>1 is faster)"),
    ("gflops", "float", "achieved GFLOP/s = MACs x 2 x images/s / 1e9"),
    ("pct_matmul_peak", "float", "gflops as % of a large fp32 matmul timed in the same run, same device and threads"),
    ("peak_rss_mb", "float", "process-wide peak resident memory (ru_maxrss) once this combination was loaded and "
                             "warmed up; cumulative, since all runtimes share one process"),
    ("accuracy", "float", "accuracy recorded in the bundle manifest at export (fraction), blank if none"),
    ("top1_agreement", "float", "top-1 agreement with PyTorch fp32 recorded at export (fraction), blank if none"),
    ("iterations", "int", "timed calls behind the statistics"),
    ("role", "str", "baseline (the ratio's denominator) | reference (Hugging Face) | backend"),
    ("peak_cuda_mb", "float", "torch.cuda.max_memory_allocated, process-wide; blank off CUDA"),
)
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


# --- model cost -------------------------------------------------------------------------

def mac_breakdown(cfg: CvtConfig) -> dict[str, int]:
    """Multiply-accumulates of one image through the model, by kind of layer.

    Counted as the paper counts: convolutions and Linear layers (weights x output positions)
    and the two attention matmuls; norms, softmax, pooling, activations and additions are
    left out (they are well under 1%). k/v are squeezed by each stage's ``kv_strides``; a
    class token is one extra query and one extra key/value that skip the projections' convs.
    """
    out = dict.fromkeys(("conv_embed", "dw_conv", "qkv_proj", "attention", "out_proj", "mlp", "head"), 0)
    chans = cfg.in_chans
    for i, (h, hk) in enumerate(stage_maps(cfg)):
        dim, depth, k = cfg.embed_dims[i], cfg.depths[i], cfg.patch_sizes[i]
        out["conv_embed"] += h * h * dim * chans * k * k
        chans = dim
        if cfg.qkv_projections[i] == "dw_bn":
            kq = cfg.qkv_kernels[i]
            out["dw_conv"] += depth * kq * kq * dim * (h * h + 2 * hk * hk)  # q keeps the map size
        cls = int(cfg.cls_token[i])
        n_q, n_kv = h * h + cls, hk * hk + cls
        hidden = mlp_hidden(dim, cfg.mlp_ratios[i])
        out["qkv_proj"] += depth * dim * dim * (n_q + 2 * n_kv)
        out["attention"] += depth * 2 * n_q * n_kv * dim  # q @ k^T and attn @ v, summed over heads
        out["out_proj"] += depth * n_q * dim * dim
        out["mlp"] += depth * 2 * n_q * dim * hidden
    out["head"] = cfg.embed_dims[-1] * cfg.num_classes
    return out


def count_macs(cfg: CvtConfig) -> int:
    """MACs per image (CvT-13 at 224: 4.57 G; the paper rounds to 4.5 G). GFLOPs = 2 x GMACs."""
    return sum(mac_breakdown(cfg).values())


# --- statistics -------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds. Percentiles interpolate linearly between ranks
    (numpy's default), so the p50 of 1..100 is 50.5."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    n: int


def summarize(seconds: Sequence[float]) -> Stats:
    """Statistics of per-iteration timings given in seconds."""
    if len(seconds) == 0:
        raise ValueError("no timings to summarize")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Stats(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()), float(ms.max()), len(ms))


# --- the interleaved scheduler ------------------------------------------------------------

@dataclass(eq=False)
class Case:
    """One thing to time: ``call()`` then ``sync()`` (if any) per iteration; timings in ``times`` (s)."""

    name: str
    call: Callable[[], object]
    sync: Callable[[], object] | None = None
    iterations: int = 0  # timed calls: fixed if set beforehand, else measure_interleaved decides
    times: list[float] = field(default_factory=list)
    error: str | None = None  # set when a call raised; the case is then dropped from later rounds

    @classmethod
    def for_runtime(cls, name: str, runtime: Runtime, batch: np.ndarray) -> Case:
        return cls(name, lambda: runtime.run(batch), getattr(runtime, "synchronize", None))

    def _once(self) -> float:
        t0 = time.perf_counter()
        self.call()
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - t0


def measure_interleaved(cases: Sequence[Case], *, iterations: int | None = None, min_time: float = 2.0,
                        warmup: int = 3, rounds: int = 5, settle: int = 1, min_iterations: int = 10,
                        max_iterations: int = 10_000, progress: bool = True,
                        after_warmup: Callable[[Case], None] | None = None) -> None:
    """Warm up every case, then time them interleaved: each round runs a block of each case in turn.

    ``iterations``: timed calls per case (a case's own ``iterations``, when set, wins), spread
    evenly over ``rounds``. None: each block runs for ``min_time / rounds`` seconds (and at
    least ``min_iterations / rounds`` calls), so a case gets about ``min_time`` seconds however
    slow its calls turn out under load; a count fixed from warm-up speed would not be.
    At least one warm-up call is made. Each block starts with ``settle`` untimed calls: the
    first call after switching cases pays for the previous one (ONNX Runtime's worker threads
    spin on the cores for a while after a run; caches are cold). Measured here on CvT-13:
    +25 ms on a 65 ms call. A case whose call raises gets ``error`` set and is not run again;
    the others go on. ``after_warmup(case)`` is called once each case is warm (e.g. to read memory use).
    """
    if rounds < 1 or warmup < 0 or settle < 0 or min_time <= 0 or (iterations is not None and iterations < 1):
        raise CvtDeployError(f"rounds={rounds}, warmup={warmup}, settle={settle}, iterations={iterations}, "
                             f"min_time={min_time}: need rounds >= 1, warmup >= 0, settle >= 0, iterations >= 1 "
                             "and min_time > 0", "pass positive counts")
    for case in track(cases, len(cases), "warming up", show=progress):
        try:
            for _ in range(max(1, warmup)):
                case._once()
        except Exception as e:  # any backend error: report it in the row, keep measuring the rest
            case.error = _one_line(e)
            continue
        if after_warmup is not None:
            after_warmup(case)
        case.iterations = case.iterations or iterations or 0  # 0: timed blocks
    live = [c for c in cases if c.error is None]
    block_time = min_time / rounds
    block_min = math.ceil(min_iterations / rounds)
    block_max = math.ceil(max_iterations / rounds)
    schedule = [(r, c) for r in range(rounds) for c in live]
    for _, case in track(schedule, len(schedule), "measuring", show=progress):
        if case.error is not None:
            continue
        fixed = math.ceil(case.iterations / rounds) if case.iterations else 0
        todo = min(fixed, case.iterations - len(case.times)) if fixed else block_max
        gc_was_on = gc.isenabled()
        gc.disable()  # a collection inside one call would be charged to whichever case ran then
        try:
            for _ in range(settle):
                case._once()
            start, done = time.perf_counter(), 0
            while done < todo and (fixed or done < block_min or time.perf_counter() - start < block_time):
                case.times.append(case._once())
                done += 1
        except Exception as e:
            case.error = _one_line(e)
        finally:
            if gc_was_on:
                gc.enable()
    for case in live:
        case.iterations = len(case.times)


def _one_line(e: BaseException) -> str:
    if isinstance(e, CvtDeployError):
        return e.message
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# --- the Hugging Face reference -------------------------------------------------------

class HFReferenceRuntime(Runtime):
    """Hugging Face ``CvtForImageClassification`` with our bundle's architecture, random weights.

    For latency only: its weights are random (a CvtConfig with the same widths, heads and
    depths), and it computes exact GELU where ours may use QuickGELU, which costs the same.
    """

    backend: ClassVar[str] = HF_BACKEND
    artifact_kind: ClassVar[str] = "none"
    install_hint: ClassVar[str] = "pip install transformers torch"

    def __init__(self, config: CvtConfig, device: str = "cpu") -> None:
        import torch
        import transformers

        super().__init__(config, "fp32", device)
        hf_cfg = transformers.CvtConfig(**hf_config_kwargs(config))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = transformers.CvtForImageClassification(hf_cfg).eval().to(device)

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed ({cls.install_hint})"
        return rt.backend_class("torch").unavailable_reason(device)  # same devices as our torch backend

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> HFReferenceRuntime:
        cfg = bundle.config
        if precision not in (None, "fp32"):
            raise CvtDeployError(f"the Hugging Face reference runs fp32 only, not {precision}", "compare it at fp32")
        reason = hf_unsupported(cfg)
        if reason:
            raise CvtDeployError(f"the bundle's architecture has no Hugging Face counterpart: {reason}", "pass --no-hf")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return cls(cfg, device or "cpu")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return self.model(pixel_values=x).logits.float().cpu().numpy()

    def synchronize(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


# --- results ----------------------------------------------------------------------------

@dataclass
class BenchRow:
    """One combination; fields are :data:`COLUMNS` (None = not applicable)."""

    model: str
    backend: str
    precision: str
    batch: int
    device: str
    threads: int
    status: str = "ok"
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    throughput_ips: float | None = None
    ratio_vs_torch: float | None = None
    gflops: float | None = None
    pct_matmul_peak: float | None = None
    peak_rss_mb: float | None = None
    accuracy: float | None = None
    top1_agreement: float | None = None
    iterations: int = 0
    role: str = "backend"
    peak_cuda_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


assert tuple(f.name for f in dataclasses.fields(BenchRow)) == COLUMN_NAMES, "BenchRow and COLUMNS must agree"


@dataclass
class BenchResult:
    """The rows of one benchmark run and how it was run (``meta``)."""

    rows: list[BenchRow]
    meta: dict[str, Any]

    def row(self, backend: str, precision: str, batch: int) -> BenchRow | None:
        return next((r for r in self.rows if (r.backend, r.precision, r.batch) == (backend, precision, batch)), None)

    @property
    def measured(self) -> list[BenchRow]:
        return [r for r in self.rows if r.status == "ok"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": self.meta,
                "columns": [{"name": n, "type": t, "meaning": m} for n, t, m in COLUMNS],
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BenchResult:
        """Read back what :meth:`to_json` wrote (to re-plot or compare runs)."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("schema") != SCHEMA or int(data.get("schema_version", 0)) > SCHEMA_VERSION:
                raise ValueError(f"schema {data.get('schema')!r} version {data.get('schema_version')!r}")
            known = set(COLUMN_NAMES)
            return cls([BenchRow(**{k: v for k, v in r.items() if k in known}) for r in data["rows"]], data["meta"])
        except OSError as e:
            raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass a file written by cvt-bench --json") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CvtDeployError(f"{path} is not a cvt-bench result ({type(e).__name__}: {e})",
                                 "pass a file written by cvt-bench --json") from None

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        with atomic_output(path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMN_NAMES)
                writer.writeheader()
                for r in self.rows:
                    writer.writerow({k: "" if v is None else v for k, v in r.to_dict().items()})
        return Path(path)

    def header(self) -> str:
        m = self.meta
        mm = m["matmul"]
        peak = f"{mm['gflops']:.1f} GFLOP/s" if mm.get("gflops") else f"not measured ({mm.get('error')})"
        return (f"{m['model']} at {m['img_size']}px ({m['gmacs']:.3g} GMACs/image) on {m['device']}, "
                f"{m['threads']} threads; fp32 matmul {mm['size']}x{mm['size']} ({mm['impl']}): {peak}")

    def table(self) -> str:
        """Terminal text: one line per combination, skipped/failed reasons as numbered notes."""
        notes: list[str] = []
        rows = []
        for r in self.rows:
            if r.status != "ok":
                note = f"{r.backend}: {r.reason}"  # reasons name the precision where it matters
                if note not in notes:
                    notes.append(note)
                status = f"{r.status} [{notes.index(note) + 1}]"
            else:
                status = "ok" if r.role == "backend" else r.role
            rows.append([r.backend, r.precision, str(r.batch), status, _ms(r.p50_ms), _ms(r.p90_ms), _ms(r.p99_ms),
                         _ms(r.mean_ms), _ms(r.min_ms), _ms(r.max_ms), _num(r.throughput_ips, 1),
                         "" if r.ratio_vs_torch is None else f"{r.ratio_vs_torch:.2f}x", _num(r.gflops, 1),
                         "" if r.pct_matmul_peak is None else f"{r.pct_matmul_peak:.0f}%",
                         _pct(r.accuracy), _pct(r.top1_agreement), str(r.iterations) if r.iterations else ""])
        head = ["backend", "precision", "batch", "status", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "max ms",
                "img/s", "vs torch", "GFLOP/s", "% matmul", "accuracy", "agree", "n"]
        text = format_table(head, rows, title=self.header())
        foot = [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
        noisy = [f"{r.backend} {r.precision} b{r.batch}" for r in self.measured
                 if r.p90_ms is not None and r.p50_ms and r.p90_ms > NOISY * r.p50_ms]
        if noisy:
            foot.append(f"noisy (p90 > {NOISY:g} x p50, calls were held up): {', '.join(noisy)}")
        load = (self.meta.get("loadavg_1min") or {}).get("after")
        cpus = self.meta.get("host", {}).get("cpus_usable") or 1
        if load is not None and load > cpus + 1:
            foot.append(f"system load average {load:.1f} on {cpus} usable CPUs: other processes competed for the cores; "
                        "re-run on a quieter machine (or with fewer --threads) before trusting small differences")
        foot.append(f"peak RSS of this process (all runtimes together): {self.meta['peak_rss_mb']:.0f} MB"
                    + (f"; peak CUDA memory: {self.meta['peak_cuda_mb']:.0f} MB" if self.meta.get("peak_cuda_mb") else ""))
        foot.append("vs torch = PyTorch-eager fp32 p50 / this p50 at the same batch (>1 is faster). "
                    "On a shared machine compare these ratios, not absolute milliseconds across runs.")
        return text + "\n" + "\n".join(foot)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Latency (p50, whiskers min..p90) and throughput vs batch, one line per backend/precision."""
        require("matplotlib", "plot", "Plotting benchmark results")
        # A Figure on the Agg canvas directly, not pyplot: no display needed, and the caller's
        # pyplot backend and open figures are left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        fig = Figure(figsize=(11, 4.2))
        canvas = FigureCanvasAgg(fig)
        fmt = path.suffix.lstrip(".").lower() or "png"
        if fmt not in canvas.get_supported_filetypes():
            raise CvtDeployError(f"cannot plot to {path}: matplotlib does not write .{fmt} files", "use a .png, .svg or .pdf name")
        series: dict[tuple[str, str], list[BenchRow]] = {}
        for r in self.measured:
            series.setdefault((r.backend, r.precision), []).append(r)
        if not series:
            raise CvtDeployError("no combination was measured, so there is nothing to plot", "see the table's skipped reasons")
        ax_lat, ax_ips = fig.subplots(1, 2)
        batches = sorted({r.batch for r in self.measured})
        for (backend, precision), rows in series.items():
            rows = sorted(rows, key=lambda r: r.batch)
            xs = [r.batch for r in rows]
            p50 = np.array([r.p50_ms for r in rows], dtype=float)
            low = [p - (r.min_ms or p) for p, r in zip(p50, rows)]
            high = [(r.p90_ms or p) - p for p, r in zip(p50, rows)]
            err = np.array([low, high])
            label = f"{backend} {precision}"
            ax_lat.errorbar(xs, p50, yerr=err, marker="o", capsize=3, label=label)
            ax_ips.plot(xs, [r.throughput_ips for r in rows], marker="o", label=label)
        for ax, ylabel in ((ax_lat, "latency per call, ms (p50; whiskers min..p90)"), (ax_ips, "throughput, images/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks(batches, [str(b) for b in batches])
        from matplotlib.ticker import FuncFormatter, NullFormatter

        for ax, values in ((ax_lat, [r.p50_ms for r in self.measured]), (ax_ips, [r.throughput_ips for r in self.measured])):
            finite = [v for v in values if v]
            if finite and max(finite) > 10 * min(finite):  # backends can differ by 10x and more
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 200, not 2 x 10^2
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax_ips.legend(fontsize=8)
        fig.suptitle(self.header(), fontsize=9)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
        return path


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _num(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


# --- the benchmark --------------------------------------------------------------------

def default_threads() -> int:
    """CPUs this process may run on (its affinity mask; a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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


def _recorded_parity(bundle: Bundle, backend: str, precision: str) -> tuple[float | None, float | None]:
    """(accuracy, top-1 agreement) the export recorded for this artifact, if any."""
    if backend == HF_BACKEND:
        return None, None
    if (backend, precision) == BASELINE:
        # PyTorch fp32 is the reference of every parity check: its accuracy is recorded there.
        for art in bundle.artifacts.values():
            parity = art.info.get("parity")
            if isinstance(parity, dict) and parity.get("accuracy_reference") is not None:
                return float(parity["accuracy_reference"]), None
        return None, None
    try:
        found = bundle.find(rt.backend_class(backend).artifact_kind, precision)
    except ImportError:
        return None, None
    parity = found.info.get("parity") if found is not None else None
    if not isinstance(parity, dict):
        return None, None

    def first(*keys: str) -> float | None:
        return next((float(parity[k]) for k in keys if parity.get(k) is not None), None)

    return first("accuracy_candidate", "accuracy"), first("top1_agreement", "agreement")


def _matmul_case(size: int, device: str) -> tuple[Case, str]:
    """A size x size fp32 matmul with the same library, device and threads as the models."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(device)
        b = torch.randn(size, size, generator=gen).to(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        return Case("matmul", lambda: torch.matmul(a, b), sync), f"torch {torch.__version__}"
    rng = np.random.default_rng(0)
    an, bn = rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)
    return Case("matmul", lambda: an @ bn), f"numpy {np.__version__} (its BLAS threads are not set by --threads)"


def _versions() -> dict[str, str]:
    from .export.onnx import tool_versions

    return {"python": platform.python_version(),
            **tool_versions(("numpy", "torch", "onnxruntime", "tensorrt", "transformers"))}


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


def benchmark(bundle: Bundle | str | os.PathLike[str], backends: Sequence[str] | None = None,
              precisions: Sequence[str] | None = None, batches: Sequence[int] | None = None, *,
              threads: int | None = None, device: str = "cpu", iterations: int | None = None,
              min_time: float = 2.0, warmup: int = 3, rounds: int = 5, settle: int = 1, min_iterations: int = 10,
              reference: bool = True, hf_reference: bool = True, matmul_size: int = 2048,
              progress: bool = True) -> BenchResult:
    """Time every combination of ``backends`` x ``precisions`` x ``batches`` on one bundle.

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
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = _loadavg()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    cfg = bundle.config
    backends = _check_choices(backends or list(rt.PREFERENCE), list(rt.BACKENDS), "backend")
    precisions = _check_choices(precisions or sorted({a.precision for a in bundle.artifacts.values()},
                                                     key=PRECISIONS.index) or ["fp32"], PRECISIONS, "precision")
    batches = list(dict.fromkeys(batches or default_batches(bundle.batch)))
    if any(not isinstance(b, (int, np.integer)) or b < 1 for b in batches):
        raise CvtDeployError(f"batch sizes {batches} must be whole numbers >= 1", "use e.g. 1,8,32")
    threads = threads or default_threads()
    if threads < 1:
        raise CvtDeployError(f"threads={threads} must be >= 1", f"use e.g. {default_threads()}")
    if min_time <= 0 or matmul_size < 16:
        raise CvtDeployError(f"min_time={min_time} and matmul_size={matmul_size} must be positive (matmul >= 16)",
                             "use e.g. min_time=2.0, matmul_size=2048")
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)  # process-wide: the torch backend, HF and the matmul all use it

    # combinations: the baseline and HF first at each batch, then the backends asked for
    combos: list[tuple[str, str, int, str]] = []
    for b in batches:
        if reference or (BASELINE[0] in backends and BASELINE[1] in precisions):
            combos.append((*BASELINE, b, "baseline"))
        if hf_reference:
            combos.append((HF_BACKEND, "fp32", b, "reference"))
        combos += [(be, p, b, "backend") for be in backends for p in precisions if (be, p) != BASELINE]

    reasons = _backend_reasons(bundle, device, backends)
    loaded: dict[tuple[str, str], Runtime | str] = {}

    def runtime_for(backend: str, precision: str) -> Runtime | str:
        """The runtime, loaded once per backend/precision and shared by its batch sizes; or why not."""
        key = (backend, precision)
        if key not in loaded:
            if backend == HF_BACKEND:
                why = HFReferenceRuntime.unavailable_reason(device)
            else:
                why = reasons.get(backend)
            if why is None:
                try:
                    loaded[key] = (HFReferenceRuntime.from_bundle(bundle, precision, device, threads)
                                   if backend == HF_BACKEND else rt.load(bundle, backend, device, precision, threads))
                except CvtDeployError as e:  # e.g. no int8 artifact, fp16 torch on CPU: a skipped row
                    loaded[key] = e.message
            else:
                loaded[key] = why
        return loaded[key]

    rows: list[BenchRow] = []
    cases: dict[int, Case] = {}  # row index -> case
    inputs: dict[int, np.ndarray] = {}
    with stage(f"loading {len({c[:2] for c in combos})} runtimes", progress):
        runtimes = [runtime_for(backend, precision) for backend, precision, _, _ in combos]
    for (backend, precision, b, role), runtime in zip(combos, runtimes):
        row = BenchRow(cfg.variant, backend, precision, b, device, threads, role=role)
        row.accuracy, row.top1_agreement = _recorded_parity(bundle, backend, precision)
        if isinstance(runtime, str):
            row.status, row.reason = "skipped", runtime
        elif runtime.batch is not None and not runtime.batch.min <= b <= runtime.batch.max:
            # run() would split or pad it: that times a different batch than the row claims
            row.status, row.reason = "skipped", (f"batch {b} is outside the artifact's batch range "
                                                 f"{runtime.batch.min}..{runtime.batch.max} (re-export with --batch)")
        else:
            if b not in inputs:  # one input per batch size, shared by every backend
                shape = (b, cfg.in_chans, cfg.img_size, cfg.img_size)
                inputs[b] = np.random.default_rng(b).standard_normal(shape).astype(np.float32)
            cases[len(rows)] = Case.for_runtime(f"{backend} {precision} b{b}", runtime, inputs[b])
        rows.append(row)

    all_cases = list(cases.values())
    row_of = {id(case): rows[i] for i, case in cases.items()}

    def note_memory(case: Case) -> None:
        # process-wide peak once this combination is loaded and warm (warm-up runs in row order)
        if id(case) in row_of:
            row_of[id(case)].peak_rss_mb = round(_peak_rss_mb(), 1)
            row_of[id(case)].peak_cuda_mb = _peak_cuda_mb(device)

    matmul, matmul_impl = _matmul_case(matmul_size, device)
    if progress:
        print(f"benchmarking {len(all_cases)} combinations ({len(rows) - len(all_cases)} skipped) of {cfg.variant} "
              f"on {device} with {threads} threads, {rounds} interleaved rounds", file=sys.stderr)
    measure_interleaved(all_cases + [matmul], iterations=iterations, min_time=min_time, warmup=warmup, rounds=rounds,
                        settle=settle, min_iterations=min_iterations, progress=progress, after_warmup=note_memory)

    matmul_gflops = 2 * matmul_size ** 3 / (summarize(matmul.times).p50 / 1e3) / 1e9 if matmul.times else None
    macs = count_macs(cfg)
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
        if matmul_gflops:
            row.pct_matmul_peak = round(100 * row.gflops / matmul_gflops, 2)
    for row in rows:
        base = next((r for r in rows if (r.backend, r.precision, r.batch) == (*BASELINE, row.batch) and r.p50_ms), None)
        if base is not None and row.p50_ms:
            assert base.p50_ms is not None
            row.ratio_vs_torch = round(base.p50_ms / row.p50_ms, 3)

    meta = {"model": cfg.variant, "img_size": cfg.img_size, "num_classes": cfg.num_classes, "macs": macs,
            "gmacs": macs / 1e9, "bundle": str(bundle.root), "device": device, "threads": threads,
            "thread_controls": "torch.set_num_threads (process-wide) and onnxruntime intra_op_num_threads",
            "warmup": max(1, warmup), "rounds": rounds, "settle": settle, "iterations": iterations, "min_time_s": min_time,
            "matmul": {"size": matmul_size, "impl": matmul_impl,
                       "gflops": None if matmul_gflops is None else round(matmul_gflops, 2), "error": matmul.error},
            "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_cuda_mb": _peak_cuda_mb(device),
            "loadavg_1min": {"before": load_before, "after": _loadavg()},
            "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus_usable": default_threads(),
                     "cpus_total": os.cpu_count()},
            "versions": _versions(), "started": started,
            "timing": "per-iteration time.perf_counter around runtime.run (+ synchronize), interleaved rounds; "
                      "percentiles interpolate linearly"}
    return BenchResult(rows, meta)
