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
* One thread count for everything: ``torch.set_num_threads`` (process-wide), ONNX
  Runtime's ``intra_op_num_threads`` and OpenVINO's ``INFERENCE_NUM_THREADS``.
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

from ..runtimes.hf import HFReferenceRuntime
from .cost import count_macs, mac_breakdown
from .results import COLUMN_NAMES, COLUMNS, SCHEMA, SCHEMA_VERSION, BenchResult, BenchRow
from .run import BenchOptions, benchmark, check_batches, default_batches, default_threads
from .timing import Case, Stats, measure_interleaved, summarize

__all__ = ["COLUMNS", "COLUMN_NAMES", "SCHEMA", "SCHEMA_VERSION", "BenchOptions", "BenchResult", "BenchRow", "Case", "check_batches",
           "HFReferenceRuntime", "Stats", "benchmark", "count_macs", "default_batches", "default_threads",
           "mac_breakdown", "measure_interleaved", "summarize"]
