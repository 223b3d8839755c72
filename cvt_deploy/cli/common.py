"""What every command shares: error reporting, the model/weights options, and the one
spelling of each idea that several commands take (--precision, --backend, --batch, --limit,
-q/--quiet, --json), with the older spellings still accepted."""
from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from ..errors import CvtDeployError
from ..interrupt import Terminated, clear, on_signal, raise_if_interrupted, received
from ..table import printable
from ..util import PRECISIONS, parse_decimal, parse_whole

EXIT_ERROR = 2  # bad input or environment; 1 is reserved for "ran, but a check failed"


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored in a background job: left so
        wanted.append(signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in wanted}
    try:
        yield
    except Exception:
        # A library turned the signal's exception into its own on the way out (an extension
        # module's init interrupted: ImportError "initialization failed"): still a stop by signal.
        raise_if_interrupted()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        clear()


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
            # Messages quote names from files and requests: what a terminal acts on is shown escaped.
            print(f"error: {printable(e.message, lines=True)}", file=sys.stderr)
            if e.hint:
                print(f"  fix: {printable(e.hint, lines=True)}", file=sys.stderr)
            return getattr(e, "exit_code", EXIT_ERROR)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Terminated) else (received() or signal.SIGINT)
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
    g.add_argument("--img-size", type=whole_number, metavar="N", help="input size (224 or 384 for the paper's models)")
    g.add_argument("--activation", choices=("quick_gelu", "gelu"),
                   help="MLP activation; default: what the checkpoint was trained with "
                        "(quick_gelu official, gelu Hugging Face)")


def whole_number(text: str) -> int:
    """argparse type for counts and sizes: digits 0-9 only (see util.parse_whole)."""
    try:
        return parse_whole(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def decimal_number(text: str) -> float:
    """argparse type for seconds, probabilities ...: a finite ASCII decimal (no nan, inf)."""
    try:
        return parse_decimal(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_heads(text: str) -> tuple[int, ...]:
    try:
        heads = tuple(parse_whole(h) for h in text.split(","))
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


# --- one spelling per idea -------------------------------------------------------------------

class ListOption(argparse.Action):
    """``--flag a,b --flag c`` is ``[a, b, c]``: a comma list and repetition mean the same.

    ``valid``: the allowed words (else whole numbers, whose range the library checks). With
    ``many=False`` the option takes one value (given twice, the last wins) and a comma list is
    refused. Bad values are a :class:`CvtDeployError` naming the value and the valid ones, so
    they print as ``error:``/``fix:`` with exit code 2, as every other bad input does.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, what: str, valid: Sequence[str] | None = None,
                 many: bool = True, example: str = "", **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.what, self.valid, self.many = what, tuple(valid) if valid is not None else None, many
        self.example = example or (",".join(self.valid[:2]) if self.valid and many else
                                   self.valid[0] if self.valid else "1,8,32")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flag, text = option_string or self.dest, str(values)
        items = [self._item(flag, text, part.strip()) for part in text.split(",")]
        if not self.many:
            if len(items) > 1:
                raise CvtDeployError(f"{flag} {text!r}: takes one {self.what}", self._fix(flag))
            setattr(namespace, self.dest, items[0])
            return
        # The default (also a list, e.g. cvt-demo's precisions) is replaced, not extended.
        before = getattr(namespace, self.dest, None)
        kept = [] if before is None or before is self.default else list(before)
        setattr(namespace, self.dest, list(dict.fromkeys([*kept, *items])))

    def _item(self, flag: str, text: str, part: str) -> Any:
        if self.valid is not None:
            if part not in self.valid:
                raise CvtDeployError(f"{flag} {text!r}: unknown {self.what} {part!r}", self._fix(flag))
            return part
        try:
            return parse_whole(part)
        except ValueError:
            raise CvtDeployError(f"{flag} {text!r}: {part!r} is not a whole number", self._fix(flag)) from None

    def _fix(self, typed: str) -> str:
        flag = next((o for o in self.option_strings if o.startswith("--")), typed)  # the current spelling
        what = (f"{'one or more' if self.many else 'one'} of {', '.join(self.valid)}" if self.valid
                else "whole numbers" if self.many else "a whole number")
        if not self.many:
            return f"pass {what}, e.g. {flag} {self.example}"
        return f"pass {what}, as a comma list or repeated, e.g. {flag} {self.example}"


class NameList(ListOption):
    """A :class:`ListOption` of names (layer names): any non-empty word; an empty one is refused."""

    def _item(self, flag: str, text: str, part: str) -> Any:
        if not part:
            raise CvtDeployError(f"{flag} {text!r}: an empty {self.what}", self._fix(flag))
        return part

    def _fix(self, typed: str) -> str:
        flag = next((o for o in self.option_strings if o.startswith("--")), typed)
        return (f"pass one or more {self.what}s, as a comma list or repeated, e.g. {flag} "
                "stage2.blocks.1.attn.proj,head (cvt-check --layers lists them)")


_warned: set[str] = set()  # old spellings already warned about in this process


def warn_deprecated(old: str, new: str, note: str | None = None) -> None:
    """``warning: OLD is deprecated; use NEW`` on stderr, once per process per old spelling
    (a script that repeats a flag, or cvt-demo calling other commands, is told once)."""
    if old in _warned:
        return
    _warned.add(old)
    print(f"warning: {old} is deprecated; use {new}" + (f" ({note})" if note else ""), file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """An older spelling of another option: warns once, then does exactly what that option does."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, target: argparse.Action, new: str,
                 old_usage: str | None = None, new_usage: str | None = None, note: str | None = None,
                 **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.target, self.new = target, new
        self.old_usage, self.new_usage, self.note = old_usage, new_usage, note

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        old = option_string or self.option_strings[0]
        warn_deprecated(self.old_usage or old, self.new_usage or self.new, self.note)
        self.target(parser, namespace, values, option_string)


def deprecated_alias(ap: argparse.ArgumentParser, old: str, new: str, *, type: Callable[[str], Any] | None = None,
                     old_usage: str | None = None, new_usage: str | None = None, note: str | None = None) -> None:
    """Accept ``old`` as a hidden spelling of the existing option ``new`` (same values, same
    destination). ``type`` converts the old form's value where it meant more than the new
    one's (cvt-bench --csv FILE: CSV whatever the suffix); ``*_usage`` and ``note`` word the
    warning where the flag alone would not say enough."""
    target = ap._option_string_actions[new]
    kw: dict[str, Any] = {"type": type or target.type} if (type or target.type) is not None else {}
    ap.add_argument(old, action=DeprecatedAlias, target=target, new=new, old_usage=old_usage, new_usage=new_usage,
                    note=note, dest=target.dest, nargs=target.nargs, const=target.const, choices=target.choices,
                    metavar=target.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def or_list(words: Sequence[str]) -> str:
    """``a, b or c``."""
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


def aliases_note(ap: argparse.ArgumentParser, *extra: str) -> str:
    """One line for --help's epilog: the older spellings this command still accepts."""
    pairs = [*extra, *(f"{a.old_usage or a.option_strings[0]} ({a.new_usage or a.new})"
                       for a in ap._actions if isinstance(a, DeprecatedAlias))]
    return f"\nolder spellings, still accepted with a warning: {', '.join(pairs)}\n" if pairs else ""


def add_precision_arg(ap: argparse._ActionsContainer, *, many: bool, default: str,
                      extra: str = "", value: Sequence[str] | None = None) -> None:
    """--precision: several (a comma list or repeated) or, for commands that run one, one.
    ``default`` words the default for --help; ``value`` is it, where the command has a fixed one."""
    how = (f"one or more of {', '.join(PRECISIONS)} (a comma list or repeated: --precision fp16,int8)" if many
           else f"one of {', '.join(PRECISIONS)}")
    ap.add_argument("--precision", action=ListOption, what="precision", valid=PRECISIONS, many=many,
                    example="fp16,int8" if many else "fp16",
                    default=list(value) if value is not None else None, metavar="P[,P]" if many else "P",
                    help=f"{how}; default: {default}{extra}")


def add_backend_arg(ap: argparse._ActionsContainer, valid: Sequence[str], *, many: bool,
                    default: str) -> None:
    """--backend: several (a comma list or repeated) or one."""
    how = f"one or more of {', '.join(valid)} (a comma list or repeated)" if many else f"one of {', '.join(valid)}"
    ap.add_argument("--backend", action=ListOption, what="backend", valid=valid, many=many,
                    metavar="B[,B]" if many else "B", help=f"{how}; default: {default}")


def add_limit_arg(ap: argparse._ActionsContainer, what: str) -> None:
    from ..data import DEFAULT_LIMIT

    ap.add_argument("--limit", type=whole_number, metavar="N",
                    help=f"use at most N images of --data for {what} (default {DEFAULT_LIMIT})")


def add_quiet_arg(ap: argparse._ActionsContainer) -> None:
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress on stderr (results, warnings and errors still print)")


def add_json_arg(ap: argparse._ActionsContainer, what: str, instead: str = "the table", **overrides: Any) -> None:
    """--json: the result as JSON on stdout, for scripts (progress and messages stay on stderr)."""
    kw: dict[str, Any] = {"action": "store_true", **overrides}
    ap.add_argument("--json", help=f"print {what} as JSON on stdout" + (f" instead of {instead}" if instead else ""),
                    **kw)


# (flag dests, whether they change anything in this command, why not, what would make them count)
UnusedRule = tuple[Sequence[str], bool, str, str]


def given_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: Sequence[str]) -> list[str]:
    """The flags among ``dests`` that the command line set to other than their default, spelt ``--flag``."""
    # An older spelling shares its dest with a SUPPRESS default: the real default is the other's.
    defaults = {a.dest: a.default for a in reversed(parser._actions) if a.default is not argparse.SUPPRESS}
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) != defaults.get(d)]


def no_effect(flags: Sequence[str], why: str, fix: str) -> CvtDeployError:
    """The refusal of flags given where they change nothing (see :func:`refuse_unused`)."""
    return CvtDeployError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect here: {why}", fix)


def refuse_unused(parser: argparse.ArgumentParser, args: argparse.Namespace, rules: Sequence[UnusedRule]) -> None:
    """A flag given where it changes nothing is refused before any work: the user meant
    something that would not happen. ``rules`` are the command's own."""
    for dests, effect, why, fix in rules:
        given = given_flags(parser, args, dests)
        if given and not effect:
            raise no_effect(given, why, fix)


def add_groups(ap: argparse.ArgumentParser, groups: Sequence[tuple[str, str]],
               adders: Sequence[Callable[[Any], None]]) -> None:
    """--help's groups, one per job: each (title, when its flags apply) filled by its adder, in order."""
    for (title, description), add in zip(groups, adders):
        add(ap.add_argument_group(title, description))
