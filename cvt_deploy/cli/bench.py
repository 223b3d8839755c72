"""cvt-bench: latency of a bundle on every backend and precision, against PyTorch eager."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import CvtDeployError
from .common import cli_entry

# --quick: a few seconds for the demo model (the demo's own smoke run), still interleaved.
QUICK: dict[str, float] = {"min_time": 0.1, "warmup": 1, "rounds": 3, "min_iterations": 5, "matmul_size": 1024}
NORMAL: dict[str, float] = {"min_time": 2.0, "warmup": 3, "rounds": 5, "min_iterations": 10, "matmul_size": 2048}


def epilog() -> str:
    from ..bench import COLUMNS

    width = max(len(n) for n, _, _ in COLUMNS)
    cols = "\n".join(f"  {n.ljust(width)}  {t:5}  {m}" for n, t, m in COLUMNS)
    return f"""\
how it measures:
  Every backend x precision x batch is one row; one that cannot run here (not installed,
  no artifact, torch int8, fp16 torch on CPU ...) is a 'skipped' row with the reason.
  All runtimes are loaded and warmed up, then timed in interleaved rounds (A B C A B C ...)
  so that load on a shared machine hits every row alike. Each call is timed on its own.
  One thread count for all: torch.set_num_threads and ONNX Runtime intra_op threads.

reading the table:
  p50/p90/p99/mean/min/max ms  latency of one call of BATCH images
  img/s      batch / p50
  vs torch   PyTorch-eager fp32 p50 / this p50 at the same batch: 2.00x = twice as fast
  GFLOP/s    the model's analytic MACs x 2 x img/s
  % matmul   that, as a share of a large fp32 matmul timed in the same run (what the
             cores deliver right now); fp16/int8 rows may exceed 100%
  accuracy / agree  as recorded in the bundle at export (cvt-export --check); blank if none
  n          timed calls behind the statistics
  The 'baseline' row is our CvT in PyTorch eager (the bundle's model.safetensors); the
  'reference' row is Hugging Face transformers' CvtForImageClassification with the same
  architecture and random weights (--no-hf leaves it out).
  On a noisy or shared machine absolute milliseconds move from run to run by 10-50%:
  compare the ratios within one run; re-run before trusting a small difference.

CSV/JSON columns (--csv, --json; JSON adds a 'meta' object: threads, matmul GFLOP/s, versions):
{cols}

examples:
  cvt-bench --bundle build/demo --quick
  cvt-bench --bundle build/cvt13 --backends torch,onnxruntime --batches 1,8 --threads 2 --csv bench.csv
  cvt-bench --bundle build/cvt13 --device cuda --precisions fp32,fp16 --batches 1,8,32 --plot bench.png

a served model (cvt-serve, or any Triton serving it):
  cvt-bench --url http://localhost:8000 --model cvt --concurrency 1,2,4,8,16
  cvt-bench --url http://localhost:8000 --bundle build/cvt13 --threads 2   also times the bundle in this
      process (ONNX Runtime fp32 at --batches) in the same interleaved rounds, and prints the ratios
"""


def split_list(text: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b'] (None stays None: the library's default)."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (the library checks that each is >= 1)."""
    out = []
    for item in text.split(","):
        try:
            out.append(int(item.strip()))
        except ValueError:
            raise CvtDeployError(f"--batches {text!r}: {item.strip()!r} is not a whole number",
                                 "use comma-separated batch sizes, e.g. --batches 1,8,32") from None
    return out


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..bench import BenchOptions, benchmark, default_threads
    from ..bundle import PRECISIONS, Bundle
    from ..runtimes import BACKENDS

    ap = argparse.ArgumentParser(prog="cvt-bench", description=__doc__, epilog=epilog(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder written by cvt-export")
    ap.add_argument("--backends", metavar="LIST",
                    help=f"comma-separated, of {','.join(BACKENDS)} (default: all; unavailable ones are skipped rows)")
    ap.add_argument("--precisions", metavar="LIST",
                    help=f"comma-separated, of {','.join(PRECISIONS)} (default: those the bundle holds)")
    ap.add_argument("--batches", "--batch", dest="batches", metavar="LIST",
                    help="batch sizes, comma-separated (default: 1,8,32 inside the bundle's range; --batch is the older name)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help=f"CPU threads for every backend (default: the CPUs this process may use, here {default_threads()})")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    ap.add_argument("--iterations", type=int, metavar="N",
                    help="timed calls per row (default: enough for --min-time seconds, at least 10)")
    ap.add_argument("--min-time", type=float, metavar="S", help=f"seconds of timed calls per row (default {NORMAL['min_time']:g})")
    ap.add_argument("--warmup", type=int, metavar="N", help=f"untimed calls per row first (default {NORMAL['warmup']})")
    ap.add_argument("--rounds", type=int, metavar="N", help=f"interleaved rounds (default {NORMAL['rounds']})")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write rows and run details as JSON")
    ap.add_argument("--csv", type=Path, metavar="FILE", help="write one CSV row per combination")
    ap.add_argument("--plot", type=Path, metavar="FILE.png", help="latency and throughput vs batch (needs the 'plot' extra)")
    ap.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face transformers reference row")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave out the PyTorch-eager baseline unless torch fp32 is asked for (no 'vs torch' then)")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds in all: ~0.1 s per row, 1 warm-up call, 3 rounds (figures are rough)")
    ap.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    g = ap.add_argument_group("a served model (cvt-serve)")
    g.add_argument("--url", help="a running Triton server, e.g. http://localhost:8000 (gRPC: localhost:8001 with --protocol grpc)")
    g.add_argument("--model", default="cvt", help="served model name (default cvt)")
    g.add_argument("--concurrency", default="1,2,4,8,16", metavar="LIST", help="requests in flight per level (default 1,2,4,8,16)")
    g.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default: http")
    g.add_argument("--send", choices=("pixels", "images"), default="pixels",
                   help="pixels: preprocessed float32 (default); images: an encoded PNG, preprocessed by the server")
    g.add_argument("--images-per-request", type=int, default=1, metavar="N", help="batch of one request (default 1)")
    g.add_argument("--metrics-url", help="Triton's metrics (default: the --url host, port 8002)")
    args = ap.parse_args(argv)
    if args.url is not None:
        return _served(args)
    if args.bundle is None:
        raise CvtDeployError("nothing to benchmark", "pass --bundle DIR, or --url URL for a served model")

    settings = dict(QUICK if args.quick else NORMAL)
    for key in ("min_time", "warmup", "rounds"):  # explicit flags win over --quick
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    # Validated by BenchOptions, before the bundle is read or anything is measured.
    options = BenchOptions(backends=split_list(args.backends), precisions=split_list(args.precisions),
                           batches=parse_batches(args.batches) if args.batches else None, threads=args.threads,
                           device=args.device, iterations=args.iterations, min_time=float(settings["min_time"]),
                           warmup=int(settings["warmup"]), rounds=int(settings["rounds"]),
                           min_iterations=int(settings["min_iterations"]), matmul_size=int(settings["matmul_size"]),
                           reference=not args.no_reference, hf_reference=not args.no_hf)
    bundle = Bundle.open(args.bundle)  # a wrong path is reported before anything is printed or measured
    threads = args.threads or default_threads()
    show = not args.no_progress
    if show:
        print(f"threads: {threads} (torch.set_num_threads and ONNX Runtime intra_op_num_threads"
              f"{'' if args.threads else '; default = CPUs available to this process'})", file=sys.stderr)
    # Check the output names before minutes of measuring, not after.
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise CvtDeployError(f"--plot {args.plot}: unsupported image type {args.plot.suffix or '(none)'}",
                             "name it FILE.png (or .svg, .pdf)")
    if args.plot is not None:
        from ..errors import require

        require("matplotlib", "plot", "--plot")

    result = benchmark(bundle, options=options, progress=show)
    print(result.table())
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv), (args.plot, result.plot)):
        if path is not None:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    if not result.measured:
        raise CvtDeployError("no combination could run here (see the reasons under the table)",
                             "install a backend (pip install 'cvt-deploy[onnx]') or export the missing artifacts")
    # 1: it ran, but some combination broke while running (reasons under the table)
    return 1 if any(r.status == "failed" for r in result.rows) else 0


def _served(args: argparse.Namespace) -> int:
    from ..serve.load import LoadOptions, comparison, sweep

    settings = dict(QUICK if args.quick else NORMAL)
    for key in ("min_time", "warmup", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    options = LoadOptions(url=args.url, model=args.model, concurrency=parse_batches(args.concurrency),
                          protocol=args.protocol, metrics_url=args.metrics_url, send=args.send,
                          images_per_request=args.images_per_request, min_time=float(settings["min_time"]),
                          warmup=int(settings["warmup"]), rounds=int(settings["rounds"]),
                          bundle=str(args.bundle) if args.bundle else None,
                          batches=parse_batches(args.batches) if args.batches else (1, 8, 32), threads=args.threads)
    result = sweep(options, progress=not args.no_progress)
    print(result.table())
    ratios = comparison(result)
    if ratios:
        result.meta["comparison"] = ratios
        print("served / in-process: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv), (args.plot, result.plot)):
        if path is not None:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.status == "failed" for r in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main(None))
