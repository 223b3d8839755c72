"""Benchmark results: the row schema, rows, their files (JSON, CSV), the terminal table and the plot."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import label
from ..errors import CvtDeployError, require
from ..table import format_table
from ..jsonio import read_json
from ..util import atomic_output

SCHEMA = "cvt-deploy-bench"
SCHEMA_VERSION = 1
TITLE_CHARS = 150  # of the plot's 9-point title across its 11-inch figure

#: One row per combination, in this order; units are in the names. New columns are only ever
#: appended (bump SCHEMA_VERSION if one changes meaning).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "str", "the bundle's variant, e.g. cvt-13"),
    ("backend", "str", "torch | onnxruntime | openvino | tensorrt | hf-transformers"),
    ("precision", "str", "fp32 | fp16 | int8"),
    ("batch", "int", "images per call"),
    ("device", "str", "cpu | cuda"),
    ("threads", "int", "CPU threads (torch.set_num_threads, ORT intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS)"),
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
    ("pct_matmul_peak", "float", "gflops as % of the fastest GEMM for this precision timed in the same run, same device "
                                 "and threads (matmul_ceiling names it: float GEMM for fp32/fp16, u8 x s8 for int8)"),
    ("peak_rss_mb", "float", "process-wide peak resident memory (ru_maxrss) once this combination was loaded and "
                             "warmed up; cumulative, since all runtimes share one process"),
    ("accuracy", "float", "accuracy recorded in the bundle manifest at export (fraction), blank if none"),
    ("top1_agreement", "float", "top-1 agreement with PyTorch fp32 recorded at export (fraction), blank if none"),
    ("iterations", "int", "timed calls behind the statistics"),
    ("role", "str", "baseline (the ratio's denominator) | reference (Hugging Face, torch.compile) | backend | in-process "
                    "(beside a served run)"),
    ("peak_cuda_mb", "float", "torch.cuda.max_memory_allocated, process-wide; blank off CUDA"),
    ("first_call_ms", "float", "the first call after load at this batch (cold caches, buffers allocated); not in p50..max. "
                               "Only the runtime's first batch size is a first call of the runtime itself"),
    ("matmul_ceiling", "str", "the GEMM pct_matmul_peak divides by (see meta.matmul.ceilings)"),
    ("weights_mb", "float", "size of the file the weights come from (graph, engine, safetensors), MiB"),
    ("weights_fit_llc", "str", "yes | no | unknown: weights_mb within the CPU's last-level cache (meta.llc_bytes)"),
    ("concurrency", "int", "served rows (cvt-bench --url): requests kept in flight; throughput is then images "
                           "completed / wall time; blank in-process"),
    ("server_batch", "float", "served rows: mean batch Triton formed (its inference count / execution count)"),
    ("int8_speedup", "float", "int8 rows: p50 of the same backend's fp32 row at the same batch / this p50 (>1: int8 is faster)"),
    ("int8_speedup_of_limit", "float", "int8 rows: int8_speedup / the CPU's own int8 limit, the fastest u8 x s8 GEMM's "
                                       "GOP/s over the fastest fp32 GEMM's, both timed in this run (meta.matmul.int8_limit); "
                                       "1.0 = int8 gains all the GEMMs allow"),
    ("int8_attainable", "float", "int8 rows: the int8 speed-up if the model's Linear layers ran at this CPU's u8 x s8 "
                                 "GEMM speed at their own shapes (timed alone in this run) and the rest stayed as in "
                                 "the same backend's fp32 row: fp32 p50 / (fp32 p50 - Linear fp32 + Linear int8)"),
    ("int8_speedup_of_attainable", "float", "int8 rows: int8_speedup / int8_attainable; above 1: the graph gains "
                                            "beyond its Linear layers (int8 convolutions, fused kernels)"),
    ("graph", "str", "the bundle artifact the row ran, e.g. onnx-int8-onnxruntime-cpu, openvino-int8 (blank: the "
                     "reference rows, which run the model itself)"),
)
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


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
    first_call_ms: float | None = None
    matmul_ceiling: str | None = None
    weights_mb: float | None = None
    weights_fit_llc: str | None = None
    concurrency: int | None = None
    server_batch: float | None = None
    int8_speedup: float | None = None
    int8_speedup_of_limit: float | None = None
    int8_attainable: float | None = None
    int8_speedup_of_attainable: float | None = None
    graph: str | None = None

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
            data = read_json(path)
            if data.get("schema") != SCHEMA or int(data.get("schema_version", 0)) > SCHEMA_VERSION:
                raise ValueError(f"schema {data.get('schema')!r} version {data.get('schema_version')!r}")
            known = set(COLUMN_NAMES)
            return cls([BenchRow(**{k: v for k, v in r.items() if k in known}) for r in data["rows"]], data["meta"])
        except OSError as e:
            raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass a file written by cvt-bench --save FILE.json") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CvtDeployError(f"{path} is not a cvt-bench result ({type(e).__name__}: {e})",
                                 "pass a file written by cvt-bench --save FILE.json") from None

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
        return header(self)

    def table(self) -> str:
        """Terminal text: one line per combination, skipped/failed reasons as numbered notes."""
        return table(self)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Latency (p50, whiskers min..p90) and throughput vs batch, one line per backend/precision."""
        return plot(self, path)


# --- rendering: the terminal table and the plot ------------------------------------------------

NOISY = 1.5  # p90 / p50 above this: the table says the row's calls were held up (by other processes)


def header(result: BenchResult) -> str:
    m = result.meta
    if "url" in m:  # a served run (cvt-bench --url)
        return (f"model {m['model']!r} served at {m['url']} over {m['protocol']}, {m['send']} "
                f"x{m['images_per_request']} per request" + (f"; in-process: {m['bundle']}" if m.get("bundle") else ""))
    mm = m["matmul"]
    if "ceilings" in mm:
        peaks = "; ".join(f"{name} {c['gops']:.0f} GOP/s" if c.get("gops") else f"{name} not measured ({c.get('error')})"
                          for name, c in mm["ceilings"].items())
        peak = f"GEMM ceilings {mm['size']}^3: {peaks or 'none'} (fp32 rows use {mm.get('fp32')}, int8 rows {mm.get('int8')})"
    else:  # a result written before the per-precision ceilings
        peak = f"fp32 matmul {mm['size']}x{mm['size']} ({mm['impl']}): " + (
            f"{mm['gflops']:.1f} GFLOP/s" if mm.get("gflops") else f"not measured ({mm.get('error')})")
    cpu = (m.get("host") or {}).get("cpu")
    where = f"{m['device']} ({cpu})" if cpu and m["device"] == "cpu" else m["device"]
    return (f"{m['model']} at {m['img_size']}px ({m['gmacs']:.3g} GMACs/image) on {where}, "
            f"{m['threads']} threads; {peak}")


def _cache_note(result: BenchResult) -> str | None:
    """Which rows' weights fit the last-level cache: warm timings of those that do flatter them."""
    llc = result.meta.get("llc_bytes")
    sizes = {f"{r.backend} {r.precision}": (r.weights_mb, r.weights_fit_llc) for r in result.measured if r.weights_mb}
    if not sizes:
        return None
    what = ", ".join(f"{k} {mb:.3g} MiB ({fit})" for k, (mb, fit) in sizes.items())
    where = f"the last-level cache ({llc / 2**20:.0f} MiB)" if llc else "the last-level cache (size unknown here)"
    return (f"weights within {where}: {what}. Steady-state timings of weights that fit are warmer than a "
            "first call or a busy machine will see; 'first ms' is the first call after load")


def _graph_note(graph: str | None) -> str:
    """What a row's artifact name adds to its backend: which of the bundle's graphs it ran."""
    note = label(graph or "")
    return f" ({note})" if note else ""


def table(result: BenchResult) -> str:
    """Terminal text: one line per combination, skipped/failed reasons as numbered notes."""
    notes: list[str] = []
    rows = []
    served = any(r.concurrency is not None for r in result.rows)
    int8 = any(r.int8_speedup_of_limit is not None for r in result.rows)
    for r in result.rows:
        if r.status != "ok":
            note = f"{r.backend}: {r.reason}"  # reasons name the precision where it matters
            if note not in notes:
                notes.append(note)
            status = f"{r.status} [{notes.index(note) + 1}]"
        else:
            status = "ok" if r.role == "backend" else r.role
        rows.append([r.backend + _graph_note(r.graph), r.precision, str(r.batch), status, _ms(r.p50_ms), _ms(r.p90_ms), _ms(r.p99_ms),
                     _ms(r.mean_ms), _ms(r.min_ms), _ms(r.max_ms), _num(r.throughput_ips, 1),
                     "" if r.ratio_vs_torch is None else f"{r.ratio_vs_torch:.2f}x", _num(r.gflops, 1),
                     "" if r.pct_matmul_peak is None else f"{r.pct_matmul_peak:.0f}%",
                     _pct(r.accuracy), _pct(r.top1_agreement), str(r.iterations) if r.iterations else "",
                     _ms(r.first_call_ms)])
        if int8:
            rows[-1][14:14] = ["" if r.int8_speedup_of_limit is None else f"{r.int8_speedup_of_limit:.2f} ({r.int8_speedup:.2f}x)",
                               "" if r.int8_speedup_of_attainable is None
                               else f"{r.int8_speedup_of_attainable:.2f} ({r.int8_attainable:.2f}x)"]
        if served:
            rows[-1][3:3] = ["" if r.concurrency is None else str(r.concurrency), _num(r.server_batch, 2)]
    head = ["backend", "precision", "batch", "status", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "max ms",
            "img/s", "vs torch", "GFLOP/s", "% peak", "accuracy", "agree", "n", "first ms"]
    if int8:
        head[14:14] = ["int8/limit", "int8/attainable"]
    if served:
        head[3:3] = ["in flight", "srv batch"]
    text = format_table(head, rows, title=header(result))
    foot = [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    noisy = [f"{r.backend} {r.precision} b{r.batch}" for r in result.measured
             if r.p90_ms is not None and r.p50_ms and r.p90_ms > NOISY * r.p50_ms]
    if noisy:
        foot.append(f"noisy (p90 > {NOISY:g} x p50, calls were held up): {', '.join(noisy)}")
    load = (result.meta.get("loadavg_1min") or {}).get("after")
    cpus = result.meta.get("host", {}).get("cpus_usable") or 1
    if load is not None and load > cpus + 1:
        foot.append(f"system load average {load:.1f} on {cpus} usable CPUs: other processes competed for the cores; "
                    "re-run on a quieter machine (or with fewer --threads) before trusting small differences")
    cache = _cache_note(result)
    if cache:
        foot.append(cache)
    if not served:
        foot.append("% peak = GFLOP/s / the fastest GEMM of the row's kind in this run (int8 rows: the integer GEMM)")
    limit = result.meta.get("matmul", {}).get("int8_limit")
    if int8 and limit:
        foot.append(f"int8/limit = int8 speed-up (same backend's fp32 p50 / int8 p50, same batch; in brackets) / this "
                    f"CPU's int8 limit, its fastest u8 x s8 GEMM over its fastest fp32 GEMM in this run = {limit:.2f}x; "
                    "1.00 = the int8 graph gains all that its GEMMs allow")
        foot.append("int8/attainable = int8 speed-up / the speed-up if only the model's Linear layers ran at this CPU's "
                    "u8 x s8 GEMM speed at their own shapes (timed alone in this run; in brackets) and the rest stayed as "
                    "in the fp32 row; above 1.00 the graph gains beyond its Linear layers")
    if "peak_rss_mb" in result.meta:
        foot.append(f"peak RSS of this process (all runtimes together): {result.meta['peak_rss_mb']:.0f} MB"
                    + (f"; peak CUDA memory: {result.meta['peak_cuda_mb']:.0f} MB" if result.meta.get("peak_cuda_mb") else ""))
    if served:
        foot.append("served run: img/s = images completed / wall time (in-process rows too); 'in flight' = requests "
                    "kept outstanding; srv batch = mean batch Triton formed (from its metrics)")
    foot.append("vs torch = PyTorch-eager fp32 p50 / this p50 at the same batch (>1 is faster). "
                "On a shared machine compare these ratios, not absolute milliseconds across runs.")
    return text + "\n" + "\n".join(foot)

def plot(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Latency (p50, whiskers min..p90) and throughput vs batch, one line per backend/precision."""
    require("matplotlib", "plot", "Plotting benchmark results")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise CvtDeployError(f"cannot plot to {path}: matplotlib does not write .{fmt} files", "use a .png, .svg or .pdf name")
    fig = figure(result)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    return path


def figure(result: BenchResult) -> Any:
    """The matplotlib Figure that :func:`plot` writes."""
    # A Figure on the Agg canvas directly, not pyplot: no display needed, and the caller's
    # pyplot backend and open figures are left alone. The constrained layout makes room for
    # the title above the axes, however many lines it wraps to.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    series: dict[tuple[str, str], list[BenchRow]] = {}
    for r in result.measured:
        series.setdefault((r.backend, r.precision), []).append(r)
    if not series:
        raise CvtDeployError("no combination was measured, so there is nothing to plot", "see the table's skipped reasons")
    ax_lat, ax_ips = fig.subplots(1, 2)
    batches = sorted({r.concurrency or r.batch for r in result.measured})
    served = any(r.concurrency is not None for r in result.measured)
    for (backend, precision), rows in series.items():
        rows = sorted(rows, key=lambda r: r.concurrency or r.batch)
        xs = [r.concurrency or r.batch for r in rows]
        p50 = np.array([r.p50_ms for r in rows], dtype=float)
        low = [p - (r.min_ms or p) for p, r in zip(p50, rows)]
        high = [(r.p90_ms or p) - p for p, r in zip(p50, rows)]
        err = np.array([low, high])
        label = f"{backend} {precision}"
        ax_lat.errorbar(xs, p50, yerr=err, marker="o", capsize=3, label=label)
        ax_ips.plot(xs, [r.throughput_ips for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax_lat, "latency per call, ms (p50; whiskers min..p90)"), (ax_ips, "throughput, images/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (in-process) / requests in flight (served)" if served else "batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(batches, [str(b) for b in batches])
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, values in ((ax_lat, [r.p50_ms for r in result.measured]), (ax_ips, [r.throughput_ips for r in result.measured])):
        finite = [v for v in values if v]
        if finite and max(finite) > 10 * min(finite):  # backends can differ by 10x and more
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 200, not 2 x 10^2
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax_ips.legend(fontsize=8)
    # The header runs to 250 characters and more; one line of it would be cut at both edges.
    fig.suptitle("\n".join(textwrap.wrap(header(result), TITLE_CHARS, break_on_hyphens=False)), fontsize=9)
    return fig


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _num(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"
