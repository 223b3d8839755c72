"""cvt-serve: serve a bundle on Triton Inference Server (HTTP, gRPC, metrics) with dynamic batching."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from ..backends import BACKENDS
from .common import (add_backend_arg, add_groups, add_precision_arg, cli_entry, whole_number)

EPILOG = """\
The bundle runs on the same runtime as cvt-predict, inside this process; a real tritonserver
(shipped by the nvidia-pytriton package: pip install 'cvt-deploy[serve]') takes requests,
forms batches from concurrent requests and hands them over. A request carries either encoded
image files (input 'images', BYTES [N,1]: preprocessed on the server exactly as cvt-predict
does) or preprocessed pixels (input 'pixels', FP32 [N,C,H,W]); responses carry 'logits' and
the top-k 'classes', 'scores' and 'labels'. GET /v2/models/<name> describes them.

examples:
  cvt-serve --bundle build/demo
  cvt-serve --bundle build/cvt13 --backend onnxruntime --threads 4 --max-queue-delay-us 2000
  curl localhost:8000/v2/models/cvt                     inputs and outputs
  curl localhost:8002/metrics | grep nv_inference       requests, executions (batches) per model
  cvt-bench --url http://localhost:8000 --model-name cvt   a concurrency sweep against the server

For production Triton containers write a model repository instead:
  cvt-export --format triton --bundle build/cvt13 --out build/triton-repo
"""


GROUPS = (  # --help's groups, one per job: (title, when its flags apply); every run takes them all
    ("bundle and runtime (as cvt-predict)",
     "Every run: the bundle runs in this process, on the runtime cvt-predict would pick."),
    ("the served model", "Every run: the name clients ask for, and what each response carries."),
    ("addresses", "Every run: where Triton listens (HTTP, gRPC, metrics)."),
    ("batching", "Every run: how Triton forms batches of concurrent requests and runs them."),
    ("logs", "Every run: where Triton's and PyTriton's log goes."),
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-serve", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    adders = (_add_runtime, _add_model, _add_addresses, _add_batching, _add_logs)
    add_groups(ap, GROUPS, adders)
    return ap


def _add_runtime(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--bundle", type=Path, required=True, help="bundle folder written by cvt-export")
    add_backend_arg(g, list(BACKENDS), many=False, default="the best available, as cvt-predict")
    add_precision_arg(g, many=False, default="the most precise in the bundle")
    g.add_argument("--device", help="cpu or cuda (default: what the backend picks)")
    g.add_argument("--threads", type=whole_number, metavar="N", help="CPU threads of the runtime (default: the library's)")


def _add_model(g: argparse._ArgumentGroup) -> None:
    from ..serve.protocol import DEFAULT_MODEL_NAME

    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME, metavar="NAME", help=f"name clients ask for (default {DEFAULT_MODEL_NAME})")
    g.add_argument("--topk", type=whole_number, default=5, metavar="K", help="labels and scores per image (default 5)")


def _add_addresses(g: argparse._ArgumentGroup) -> None:
    from ..serve.server import DEFAULT_PORTS

    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all; 127.0.0.1: this machine only)")
    for what, port in DEFAULT_PORTS.items():
        g.add_argument(f"--{what}-port", type=whole_number, default=port, metavar="PORT", help=f"default {port}")


def _add_batching(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-batch", type=whole_number, metavar="N", help="largest batch Triton forms (default: the bundle's maximum)")
    g.add_argument("--max-queue-delay-us", type=whole_number, default=1000, metavar="US",
                   help="how long Triton may hold a request to fill a batch (default 1000 us)")
    g.add_argument("--instances", type=whole_number, default=1, metavar="N", help="batches run at once (default 1)")


def _add_logs(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--log-file", type=Path, metavar="FILE",
                   help="where Triton writes its log (default: a temporary file, named at startup and removed after a clean stop)")
    g.add_argument("-v", "--verbose", action="store_true", help="Triton's and PyTriton's log on the terminal instead")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..serve.server import ServeOptions, Server, main_loop

    args = build_parser().parse_args(argv)
    options = ServeOptions(backend=args.backend, precision=args.precision, device=args.device, threads=args.threads,
                           model_name=args.model_name, host=args.host, http_port=args.http_port,
                           grpc_port=args.grpc_port, metrics_port=args.metrics_port, max_batch=args.max_batch,
                           max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, topk=args.topk)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    log_file, temporary = args.log_file, False
    if not args.verbose and log_file is None:
        import tempfile

        log_file, temporary = Path(tempfile.mkstemp(prefix="cvt-serve-", suffix=".log")[1]), True
    try:
        code = main_loop(Server(args.bundle, options, log_file=log_file))
    except BaseException:
        if temporary and log_file is not None and log_file.stat().st_size == 0:
            log_file.unlink()  # Triton never wrote to it: nothing to look at
        raise
    if temporary and log_file is not None:
        log_file.unlink(missing_ok=True)  # a clean stop: the temporary log has served its purpose
    return code


if __name__ == "__main__":
    import sys

    sys.exit(main(None))
