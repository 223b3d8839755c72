"""Benchmark results: the row schema, rows, and their files (JSON, CSV)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CvtDeployError
from ..util import atomic_output

SCHEMA = "cvt-deploy-bench"
SCHEMA_VERSION = 1

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
    ("pct_matmul_peak", "float", "gflops as % of the fastest GEMM for this precision timed in the same run, same device "
                                 "and threads (matmul_ceiling names it: float GEMM for fp32/fp16, u8 x s8 for int8)"),
    ("peak_rss_mb", "float", "process-wide peak resident memory (ru_maxrss) once this combination was loaded and "
                             "warmed up; cumulative, since all runtimes share one process"),
    ("accuracy", "float", "accuracy recorded in the bundle manifest at export (fraction), blank if none"),
    ("top1_agreement", "float", "top-1 agreement with PyTorch fp32 recorded at export (fraction), blank if none"),
    ("iterations", "int", "timed calls behind the statistics"),
    ("role", "str", "baseline (the ratio's denominator) | reference (Hugging Face) | backend | in-process "
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
        from .render import header

        return header(self)

    def table(self) -> str:
        """Terminal text: one line per combination, skipped/failed reasons as numbered notes."""
        from .render import table

        return table(self)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Latency (p50, whiskers min..p90) and throughput vs batch, one line per backend/precision."""
        from .render import plot

        return plot(self, path)
