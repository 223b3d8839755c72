"""cvt-bench: latency of a bundle on every backend and precision, against PyTorch eager."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import CvtDeployError
from .common import (ListOption, add_backend_arg, add_groups, add_json_arg, add_precision_arg, add_quiet_arg,
                     aliases_note, cli_entry, decimal_number, deprecated_alias, refuse_unused, warn_deprecated,
                     whole_number)

if TYPE_CHECKING:
    from ..bench import BenchResult
    from ..bench.timing import TimingOptions

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
  One thread count for all: torch.set_num_threads, ONNX Runtime intra_op threads and
  OpenVINO INFERENCE_NUM_THREADS.

reading the table:
  p50/p90/p99/mean/min/max ms  latency of one call of BATCH images
  img/s      batch / p50
  vs torch   PyTorch-eager fp32 p50 / this p50 at the same batch: 2.00x = twice as fast
  GFLOP/s    the model's analytic MACs x 2 x img/s
  % matmul   that, as a share of a large fp32 matmul timed in the same run (what the
             cores deliver right now); fp16/int8 rows may exceed 100%
  int8/limit  int8 rows (where the CPU's GEMMs were timed): the row's speed-up over its
             backend's fp32 row, in brackets, as a share of the speed-up the CPU's int8
             GEMM has over its fp32 GEMM in this run; 1.00 = all the int8 GEMMs allow
  accuracy / agree  as recorded in the bundle at export (cvt-export --check); blank if none
  n          timed calls behind the statistics
  The 'baseline' row is our CvT in PyTorch eager (the bundle's model.safetensors); the
  'reference' row is Hugging Face transformers' CvtForImageClassification with the same
  architecture and random weights (--no-hf leaves it out).
  On a noisy or shared machine absolute milliseconds move from run to run by 10-50%:
  compare the ratios within one run; re-run before trusting a small difference.

columns of --json and --save FILE.json / FILE.csv (JSON adds a 'meta' object: threads,
matmul GFLOP/s, versions; BenchResult.from_json reads a saved file back):
{cols}

examples:
  cvt-bench --bundle build/demo --quick
  cvt-bench --bundle build/cvt13 --backend torch,onnxruntime --batch 1,8 --threads 2 --save bench.csv
  cvt-bench --bundle build/cvt13 --device cuda --precision fp32,fp16 --batch 1,8,32 --plot bench.png
  cvt-bench --bundle build/demo --quick --json > bench.json     the result for a script

a served model (cvt-serve, or any Triton serving it):
  cvt-bench --url http://localhost:8000 --model-name cvt --concurrency 1,2,4,8,16
  cvt-bench --url http://localhost:8000 --bundle build/cvt13 --threads 2   also times the bundle in this
      process (ONNX Runtime fp32 at --batch) in the same interleaved rounds, and prints the ratios
"""


SAVE_FORMATS = (".json", ".csv")


class _Save(argparse.Action):
    """--save FILE (repeatable): the suffix picks the format, checked before anything is measured."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # The older --json FILE / --csv FILE arrive as (path, format): their format was the flag's, not the suffix's.
        path, fmt = values if isinstance(values, tuple) else (Path(values), Path(values).suffix.lower()[1:])
        if f".{fmt}" not in SAVE_FORMATS:
            raise CvtDeployError(f"--save {path}: unknown file type {path.suffix or '(none)'}",
                                 "name it FILE.json (rows and run details) or FILE.csv (one row per combination); "
                                 "a plot is --plot FILE.png")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (path, fmt)])


class _JsonFlag(argparse.Action):
    """--json alone: JSON on stdout; the older --json FILE: --save FILE as JSON, with a warning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is None:
            setattr(namespace, self.dest, True)
            return
        warn_deprecated("--json FILE", "--save FILE", "--json alone prints the result on stdout")
        parser._option_string_actions["--save"](parser, namespace, (Path(values), "json"), option_string)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows --json as the flag it is; its optional FILE is the older spelling."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return "" if isinstance(action, _JsonFlag) else super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return super()._format_action_invocation(action).rstrip()


def _as(fmt: str) -> Any:
    return lambda text: (Path(text), fmt)


GROUPS = (  # --help's groups, one per job: (title, when its flags apply)
    ("what to time", "--bundle: the bundle timed in this process, on every backend (with --url: on ONNX Runtime\n"
     "fp32, beside the served model); --batch and --threads: its rows, with --url too."),
    ("rows of the benchmark", "Without --url: the backend x precision rows of --bundle, and the reference rows beside\n"
     "them."),
    ("timing", "Every run, with --url too; --iterations: without --url; --quick: not with all three of\n"
     "--min-time, --warmup and --rounds (each of them wins over it)."),
    ("recording the CPU paths (--record)",
     "Without --url, on --device cpu: before the benchmark, the fastest CPU path at each --batch\n"
     "is recorded in the bundle's manifest for this CPU."),
    ("load test of a served model (--url)",
     "With --url: the load test against a running server (cvt-serve, or any Triton serving the\n"
     "model); the other flags here need --url."),
    ("output", "Every run, with --url too."),
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-bench", description=__doc__, formatter_class=_Formatter)
    adders = (_add_what, _add_rows, _add_timing, _add_record, _add_served, _add_output)
    add_groups(ap, GROUPS, adders)
    deprecated_alias(ap, "--backends", "--backend")
    deprecated_alias(ap, "--precisions", "--precision")
    deprecated_alias(ap, "--batches", "--batch")
    deprecated_alias(ap, "--no-progress", "--quiet")
    deprecated_alias(ap, "--csv", "--save", type=_as("csv"), old_usage="--csv FILE", new_usage="--save FILE.csv")
    deprecated_alias(ap, "--model", "--model-name", note="--model is the architecture variant in the other commands")
    ap.epilog = epilog() + aliases_note(ap, "--json FILE (--save FILE.json)")
    return ap


def _add_what(g: argparse._ArgumentGroup) -> None:
    from ..bench import default_threads

    g.add_argument("--bundle", type=Path, help="bundle folder written by cvt-export")
    g.add_argument("--batch", action=ListOption, what="batch size", metavar="N[,N]",
                   help="batch sizes to time, a comma list or repeated: --batch 1,8 (default: 1,8,32 inside the "
                        "bundle's batch range, which cvt-export --batch-range sets)")
    g.add_argument("--threads", type=whole_number, metavar="N",
                   help=f"CPU threads for every backend (default: the CPUs this process may use, here {default_threads()})")


def _add_rows(g: argparse._ArgumentGroup) -> None:
    from ..backends import BACKENDS

    add_backend_arg(g, list(BACKENDS), many=True, default="all; those that cannot run here are 'skipped' rows")
    add_precision_arg(g, many=True, default="those the bundle holds")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    g.add_argument("--no-reference", action="store_true",
                   help="leave out the PyTorch-eager baseline unless torch fp32 is asked for (no 'vs torch' then)")
    g.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face transformers reference row")
    g.add_argument("--plain-openvino", action="store_true",
                   help="add reference rows: OpenVINO reading the portable ONNX as your own code would (one compile, "
                        "batch left dynamic), at each --precision; the openvino rows are cvt-deploy's own path")
    g.add_argument("--torch-compile", action="store_true",
                   help="add our model through torch.compile (inductor) as a reference row; each batch size "
                        "compiles first (tens of seconds, shown as 'first ms')")


def _add_timing(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--iterations", type=whole_number, metavar="N",
                   help="timed calls per row (default: enough for --min-time seconds, at least 10)")
    g.add_argument("--min-time", type=decimal_number, metavar="S", help=f"seconds of timed calls per row (default {NORMAL['min_time']:g})")
    g.add_argument("--warmup", type=whole_number, metavar="N", help=f"untimed calls per row first (default {NORMAL['warmup']})")
    g.add_argument("--rounds", type=whole_number, metavar="N", help=f"interleaved rounds (default {NORMAL['rounds']})")
    g.add_argument("--quick", action="store_true",
                   help="a few seconds in all: ~0.1 s per row, 1 warm-up call, 3 rounds (figures are rough)")


def _add_record(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--record", action="store_true",
                   help="first time every CPU path of the bundle (ONNX Runtime on each graph, OpenVINO) at --batch "
                        "(default 1 and 8) and record the fastest in its manifest for this CPU: what cvt-predict and "
                        "cvt_deploy.load then pick here (cvt-export does this on the machine it exports on)")


def _add_served(g: argparse._ArgumentGroup) -> None:
    from ..serve.protocol import DEFAULT_MODEL_NAME

    g.add_argument("--url", help="a running Triton server, e.g. http://localhost:8000 (gRPC: localhost:8001 with --protocol grpc)")
    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME, metavar="NAME",
                   help=f"served model name, as cvt-serve --model-name (default {DEFAULT_MODEL_NAME})")
    g.add_argument("--concurrency", action=ListOption, what="concurrency level", default=[1, 2, 4, 8, 16],
                   metavar="N[,N]", help="requests in flight per level, a comma list or repeated (default 1,2,4,8,16)")
    g.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default: http")
    g.add_argument("--send", choices=("pixels", "images"), default="pixels",
                   help="pixels: preprocessed float32 (default); images: an encoded PNG, preprocessed by the server")
    g.add_argument("--images-per-request", type=whole_number, default=1, metavar="N", help="batch of one request (default 1)")
    g.add_argument("--metrics-url", help="Triton's metrics (default: the --url host, port 8002)")


def _add_output(g: argparse._ArgumentGroup) -> None:
    add_json_arg(g, "the result (rows and run details, as --save FILE.json writes)", action=_JsonFlag, nargs="?",
                 default=False)
    g.add_argument("--save", action=_Save, metavar="FILE",
                   help="also write the result to FILE: .json (rows and run details) or .csv (one row per "
                        "combination); repeatable")
    g.add_argument("--plot", type=Path, metavar="FILE.png", help="latency and throughput vs batch (needs the 'plot' extra)")
    add_quiet_arg(g)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..bench import BenchOptions, benchmark, check_batches, default_threads
    from ..bundle import Bundle

    parser = build_parser()
    args = parser.parse_args(argv)
    served = args.url is not None
    refuse_unused(parser, args, [
        (("model_name", "concurrency", "protocol", "send", "images_per_request", "metrics_url"), served,
         "they describe a served model, and no --url is given", "add --url http://HOST:8000 (a running cvt-serve)"),
        (("record",), args.device == "cpu", "it times the CPU paths, and --device is not cpu", "drop --device, or --record"),
        (("backend", "precision", "device", "iterations", "no_hf", "torch_compile", "plain_openvino", "no_reference",
          "record"), not served,
         "with --url the served model is timed (and --bundle's in-process rows on ONNX Runtime)",
         "drop it, or time the bundle in-process without --url"),
        (("quick",), not (args.min_time is not None and args.warmup is not None and args.rounds is not None),
         "--min-time, --warmup and --rounds are all given", "drop --quick"),
    ])
    if served:
        return _served(args)
    if args.bundle is None:
        raise CvtDeployError("nothing to benchmark", "pass --bundle DIR, or --url URL for a served model")

    settings = _settings(args)
    # Validated by TimingOptions and BenchOptions, before the bundle is read or anything is measured.
    options = BenchOptions.with_timing(
        _timing(args, settings), backends=args.backend, precisions=args.precision, batches=args.batch,
        device=args.device, iterations=args.iterations, min_iterations=int(settings["min_iterations"]),
        matmul_size=int(settings["matmul_size"]), reference=not args.no_reference, hf_reference=not args.no_hf,
        compiled_reference=args.torch_compile, openvino_reference=args.plain_openvino)
    bundle = Bundle.open(args.bundle)  # a wrong path is reported before anything is printed or measured
    if options.batches:  # sizes the bundle was not exported for, before the banner and the model loads
        check_batches(bundle, options.batches)
    threads = args.threads or default_threads()
    show = not args.quiet
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

    if args.record:
        from ..bench.cpu_paths import BATCHES, record_cpu_timings
        from ..outlock import output_lock

        with output_lock(bundle.root):  # no export replaces the bundle while its timings are recorded
            bundle = Bundle.open(bundle.root)  # re-read under the lock: an export may have just finished
            if record_cpu_timings(bundle, batches=options.batches or BATCHES, threads=args.threads, progress=show) is None:
                print(f"note: nothing recorded: {bundle.root} has one CPU path per precision (nothing to choose)",
                      file=sys.stderr)
    result = benchmark(bundle, options=options, progress=show)
    _report(result, args)
    if not result.measured:
        raise CvtDeployError("no combination could run here (see the reasons under the table)",
                             "install a backend (pip install 'cvt-deploy[onnx]') or export the missing artifacts")
    # 1: it ran, but some combination broke while running (reasons under the table)
    return 1 if any(r.status == "failed" for r in result.rows) else 0


def _settings(args: argparse.Namespace) -> dict[str, float]:
    settings = dict(QUICK if args.quick else NORMAL)
    for key in ("min_time", "warmup", "rounds"):  # explicit flags win over --quick
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _timing(args: argparse.Namespace, settings: dict[str, float]) -> TimingOptions:
    """--min-time, --warmup, --rounds (over --quick's or the usual) and --threads: the timing the
    benchmark and the load test of a served model share."""
    from ..bench.timing import TimingOptions

    return TimingOptions(min_time=float(settings["min_time"]), warmup=int(settings["warmup"]),
                         rounds=int(settings["rounds"]), threads=args.threads)


def _report(result: BenchResult, args: argparse.Namespace, extra: str | None = None) -> None:
    """The table (or --json) on stdout, then the --save and --plot files."""
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if extra and not args.json:
        print(extra)
    outputs = [(path, result.to_json if fmt == "json" else result.to_csv) for path, fmt in args.save or []]
    for path, write in [*outputs, *([(args.plot, result.plot)] if args.plot is not None else [])]:
        write(path)
        print(f"wrote {path}", file=sys.stderr)


def _served(args: argparse.Namespace) -> int:
    from ..serve.load import LoadOptions, comparison, sweep

    options = LoadOptions.with_timing(_timing(args, _settings(args)), url=args.url, model=args.model_name,
                                      concurrency=args.concurrency, protocol=args.protocol,
                                      metrics_url=args.metrics_url, send=args.send,
                                      images_per_request=args.images_per_request,
                                      bundle=str(args.bundle) if args.bundle else None, batches=args.batch or (1, 8, 32))
    result = sweep(options, progress=not args.quiet)
    ratios = comparison(result)
    if ratios:
        result.meta["comparison"] = ratios  # in --json and --save FILE.json too
    _report(result, args, "served / in-process: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items())
            if ratios else None)
    return 1 if any(r.status == "failed" for r in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main(None))
