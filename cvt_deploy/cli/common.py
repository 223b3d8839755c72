"""What every command shares: error reporting, the model/weights options, progress."""
from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

from ..errors import CvtDeployError

EXIT_ERROR = 2  # bad input or environment; 1 is reserved for "ran, but a check failed"


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that every ``finally`` removes its temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _terminate) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def cli_entry(fn: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Run a command; a :class:`CvtDeployError` becomes one clear message and exit code 2.

    Ctrl-C, SIGTERM (docker stop, kill) and SIGHUP (a closed terminal) unwind the command
    the same way, so temporary files are removed; the exit code is 128 + the signal number.
    """

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            with _cleanup_on_signals():
                return fn(argv)
        except CvtDeployError as e:
            print(f"error: {e.message}", file=sys.stderr)
            if e.hint:
                print(f"  fix: {e.hint}", file=sys.stderr)
            return getattr(e, "exit_code", EXIT_ERROR)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
            print(f"{'interrupted' if signum == signal.SIGINT else signal.Signals(signum).name}; "
                  "nothing was left half-written", file=sys.stderr)
            return 128 + int(signum)

    return wrapper


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model (default: the bundled demo model, CvT-tiny trained on digits)")
    g.add_argument("--model", metavar="VARIANT",
                   help="a registered architecture: cvt-13, cvt-21, cvt-w24, cvt-tiny. With --weights it only checks "
                        "them (the checkpoint decides the architecture); alone it gives random weights (for trying "
                        "the pipeline only)")
    g.add_argument("--weights", metavar="CKPT",
                   help="official microsoft/CvT .pth, Hugging Face folder or hub id (microsoft/cvt-13), "
                        "or a cvt-deploy .safetensors; any CvT architecture, registered or not")
    g.add_argument("--heads", metavar="H,H,H", type=parse_heads,
                   help="attention heads per stage, e.g. 1,3,6: needed for official .pth weights whose widths are "
                        "not a registered variant's (the weights do not record heads)")
    g.add_argument("--config", metavar="FILE.json",
                   help="CvtConfig fields for what official weights cannot show: num_heads, patch_strides, "
                        "patch_paddings, q_strides, q_paddings, kv_strides, kv_paddings, qkv_projections "
                        '(e.g. {"num_heads": [1, 3, 6], "kv_strides": [2, 2, 1]}); fields that contradict the '
                        "weights are refused")
    g.add_argument("--img-size", type=int, metavar="N", help="input size (224 or 384 for the paper's models)")
    g.add_argument("--activation", choices=("quick_gelu", "gelu"),
                   help="MLP activation; default: what the checkpoint was trained with "
                        "(quick_gelu official, gelu Hugging Face)")


def parse_heads(text: str) -> tuple[int, ...]:
    try:
        heads = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of head counts, e.g. 1,3,6") from None
    if not heads or min(heads) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: head counts must be positive, e.g. 1,3,6")
    return heads


def load_model_from_args(args: argparse.Namespace) -> tuple[object, str]:
    """(CvT, description of where it came from) for --model/--weights, else the demo model."""
    from ..checkpoints import load_checkpoint
    from ..demo import DEMO_WEIGHTS
    from ..errors import require

    require("torch", "torch", "Loading a PyTorch model")
    if args.weights:
        return load_checkpoint(args.weights, args.model, activation=args.activation, img_size=args.img_size,
                               heads=args.heads, config=args.config), str(args.weights)
    if args.heads or args.config:
        raise CvtDeployError("--heads and --config describe the architecture of --weights", "add --weights CKPT")
    if args.model:
        from ..model import create_model

        overrides = {k: v for k, v in (("img_size", args.img_size), ("activation", args.activation)) if v}
        model = create_model(args.model, **overrides)
        print(f"note: --model {args.model} without --weights: random weights, accuracy numbers are meaningless",
              file=sys.stderr)
        return model, f"{args.model} (random weights)"
    return load_checkpoint(DEMO_WEIGHTS), str(DEMO_WEIGHTS)
