"""cvt-check: re-run the accuracy parity check of a bundle's artifacts on this machine,
(--tensorrt) check its portable graphs against the ONNX parser of each TensorRT release,
(--layers) find the layer where a reduced-precision graph leaves the fp32 one, or
(--rank-int8) rank the int8 graph's quantized layers by what keeping each one float gives back.

Exit status: 0 when every checked artifact meets its precision's gates (or every graph is
ready for the asked TensorRT; --layers and --rank-int8 are diagnoses: always 0), 1 when one
does not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import CvtDeployError
from ..export.portable import TENSORRT_TARGETS
from ..backends import BACKENDS
from .common import (ListOption, add_backend_arg, add_groups, add_json_arg, add_limit_arg, add_precision_arg,
                     add_quiet_arg, cli_entry)
from .export import NameList

if TYPE_CHECKING:
    from ..bundle import Bundle

EPILOG = """\
The reference is PyTorch fp32 from the bundle's weights (or the fp32 ONNX graph on ONNX
Runtime when torch is not installed). Gates: fp32 max |diff| <= 1e-3 and 99.9% top-1
agreement; fp16 >= 99.5% top-1 agreement; int8 accuracy drop <= 1 point when labels exist.

examples:
  cvt-check --bundle build/demo
  cvt-check --bundle build/cvt13 --backend tensorrt --data imagenet-val-subset/
  cvt-check --bundle build/ds --preprocess deepstream    what nvinfer's direct resize costs (not gated)
  cvt-check --bundle build/cvt13 --tensorrt 8.5,8.6,10   will each Jetson's TensorRT parse it?
  cvt-check --bundle build/cvt13 --layers --precision int8 --plot layers.png   where does int8 go wrong?
  cvt-check --bundle build/cvt13 --rank-int8 --data imagenet-val-subset/   which layers should int8 keep float?

--tensorrt is a static check of the documented ONNX parser of that release (onnx-tensorrt's
operator table and importer source per release branch), not TensorRT: it needs neither
TensorRT nor a GPU, and lists every finding with the node, the rule and its source. Beside
it, where the 'rtx' extra is installed (pip install 'cvt-deploy[rtx]'), NVIDIA's own current
parser and builder (TensorRT-RTX, ahead of time on the CPU) parse and build every graph:
layers, time, and each parser and builder error and warning. That is real evidence for
today's parser, not for the 8.5/8.6/10.3 of a Jetson; nothing is run.

--layers runs each candidate graph (--backend onnxruntime: every ONNX graph but the fp32 one;
openvino: every OpenVINO IR; --precision: only those) beside the bundle's fp32 ONNX graph on the
same images and compares their tensors at every named layer (its PyTorch module and ONNX node),
every transformer block's output and the logits (--layers all: every weighted node, the
attention MatMuls too): worst and mean cosine, relative error ||fp32 - cand|| / ||fp32||, max
|diff|. The first jump is the first layer whose worst-image cosine falls more than 0.02 below
every earlier layer's, or whose mean relative error exceeds both 3x every earlier layer's and
0.1. At most 16 tensors are exposed per pass, so memory stays bounded.

--rank-int8 ranks every quantized layer (Conv, MatMul, Gemm) of the bundle's portable int8 graph
(--rank-layers: only those). For each, the int8 graph with only that layer float (its Q/DQ
removed, its fp32 weight back, every other scale as calibrated) runs beside the fp32 ONNX graph
on ONNX Runtime's CPU provider on --limit images of --data (default 64): worst and mean cosine
and top-1 agreement, what the int8 gate judges. gain is the share of int8's cosine error
(1 - mean cosine) that keeping the layer float removes: the top rows are what to name in
cvt-export --int8-keep-float (or let --int8-keep-float auto choose). Each layer runs only the
graph from the last block boundary before it. Per-layer results are cached in
~/.cache/cvt-deploy/sensitivity ($XDG_CACHE_HOME when set), keyed by both graphs, the images and
ONNX Runtime's version: an interrupted ranking resumes where it stopped.
"""


GROUPS = (  # --help's groups, one per job: (title, when its flags apply)
    ("what to check", "--bundle: every check; --precision: every check but --rank-int8; --backend: the parity\n"
     "check and --layers (there: onnxruntime or openvino)."),
    ("images", "Every check but --tensorrt (with --rank-int8: fewer by default)."),
    ("the parity check (the default)",
     "Without --tensorrt, --layers or --rank-int8: every artifact against PyTorch fp32, gated\n"
     "(--preprocess deepstream: DeepStream's resize beside the model's own, not gated)."),
    ("layer by layer (--layers)",
     "With --layers: where each candidate graph's error first jumps (a diagnosis); --plot needs\n"
     "--layers. Not with --tensorrt or --rank-int8, --device or --preprocess."),
    ("which int8 layers to keep float (--rank-int8)",
     "With --rank-int8: a ranking on ONNX Runtime's CPU provider (a diagnosis); --rank-layers\n"
     "needs --rank-int8. Not with --tensorrt or --layers, --backend (but onnxruntime), --precision,\n"
     "--device, --preprocess or --plot."),
    ("TensorRT readiness (--tensorrt)",
     "With --tensorrt: a static check of every portable graph, no images, no backend: not with\n"
     "--backend, --device, --data, --limit, --preprocess or --plot."),
    ("output", "Every check."),
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-check", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    adders = (_add_what, _add_images, _add_parity, _add_layers, _add_rank_int8, _add_tensorrt)
    add_groups(ap, GROUPS, adders)
    output = ap.add_argument_group(*GROUPS[-1])
    add_json_arg(output, "the reports")
    add_quiet_arg(output)
    return ap


def _add_what(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--bundle", type=Path, required=True, help="bundle folder written by cvt-export")
    # decision: torch is the reference cvt-check measures against, not a candidate
    add_backend_arg(g, [b for b in BACKENDS if b != "torch"], many=True, default="onnxruntime")
    add_precision_arg(g, many=True, default="every precision in the bundle")


def _add_images(g: argparse._ArgumentGroup) -> None:
    from ..sensitivity import DEFAULT_IMAGES

    g.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class (default: demo held-out digits)")
    add_limit_arg(g, "the check")
    limit = g._option_string_actions["--limit"]  # the ranking runs every image once per layer: fewer by default
    limit.help = f"{limit.help}; {DEFAULT_IMAGES} with --rank-int8"


def _add_parity(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--device", help="device for the checked backend (cpu, cuda)")
    g.add_argument("--preprocess", choices=("model", "deepstream"), default="model",
                   help="model (default): the parity check; deepstream: the same artifact on the model's own "
                        "preprocessing vs DeepStream's direct bilinear resize to the network size (no crop): "
                        "accuracy of each and top-1 agreement, reported, not gated")


def _add_layers(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--layers", nargs="?", const="named", choices=("named", "all"), metavar="all",
                   help="instead of the parity check: compare each candidate graph with the fp32 graph layer by "
                        "layer and mark where the error first jumps (a diagnosis: exit 0); 'all' adds every "
                        "weighted node (attention MatMuls)")
    g.add_argument("--plot", metavar="FILE.png",
                   help="with --layers: plot min cosine and relative error against depth, one line per candidate "
                        "(needs the 'plot' extra: pip install 'cvt-deploy[plot]')")


def _add_rank_int8(g: argparse._ArgumentGroup) -> None:
    from ..sensitivity import DEFAULT_IMAGES

    g.add_argument("--rank-int8", action="store_true",
                   help="instead of the parity check: rank every quantized layer of the bundle's portable int8 graph "
                        "by what keeping that one layer float gives back (a diagnosis: exit 0), on --limit images "
                        f"of --data (default {DEFAULT_IMAGES}); results per layer are cached, so a rerun resumes")
    g.add_argument("--rank-layers", action=NameList, what="layer name", default=None, metavar="NAME[,NAME]",
                   help="with --rank-int8: rank only these layers (a comma list or repeated): modules, module "
                        "prefixes (stage2.blocks.1) or ONNX node names")


def _add_tensorrt(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tensorrt", action=ListOption, what="TensorRT version", valid=TENSORRT_TARGETS,
                   metavar="VERSION[,VERSION]", example="8.5,10",
                   help="instead of the parity check: check every portable graph against the ONNX parser of "
                        "TensorRT 8.5 (JetPack 5.1), 8.6 (JetPack 6.0) or 10 (JetPack 6.1+, x86); several as a "
                        "comma list or repeated")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..bundle import Bundle
    from ..data import check_limit
    from ..parity import check_bundle, summary_table

    args = build_parser().parse_args(argv)
    if args.rank_int8 or args.rank_layers:
        return _rank_int8(args)
    if args.layers:
        return _layers(args)
    if args.plot:
        raise CvtDeployError("--plot draws the layer table of --layers", "add --layers, or drop --plot")
    if args.tensorrt:
        return _tensorrt(args)
    check_limit(args.limit)  # before the bundle, PyTorch and the model load
    bundle = Bundle.open(args.bundle)
    if args.preprocess == "deepstream":
        from ..deepstream import check_resize, format_resize

        reports = [check_resize(bundle, data=args.data, limit=args.limit, backend=backend, precision=precision,
                                device=args.device, progress=not args.quiet)
                   for backend in args.backend or ["onnxruntime"] for precision in args.precision or [None]]
        print(json.dumps([r.to_dict() for r in reports], indent=2) if args.json
              else "\n\n".join(format_resize(r) for r in reports))
        return 0
    reports = check_bundle(bundle, data=args.data, limit=args.limit, backends=args.backend or ["onnxruntime"],
                           precisions=args.precision, device=args.device, progress=not args.quiet)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for rep in reports:
            print(rep, end="\n\n")
        print(summary_table(reports))
    ok = all(reports)
    if not ok:
        print("error: parity gates failed for " + ", ".join(r.candidate for r in reports if not r), file=sys.stderr)
    return 0 if ok else 1


def _layers(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..data import check_limit
    from ..layer_report import JUMP_RULE, check_plot_path, plot
    from ..layers import check_layers

    if args.tensorrt:
        raise CvtDeployError("--layers and --tensorrt are two different checks (tensors of graphs run here; a static "
                             "check of the graphs for TensorRT's parser)", "run cvt-check once with each")
    unused = [flag for flag, value in (("--device", args.device), ("--preprocess", args.preprocess != "model" or None))
              if value]
    if unused:
        raise CvtDeployError(f"{', '.join(unused)} has no effect with --layers (the graphs run on the CPU, on the "
                             "model's own preprocessing)", f"drop {', '.join(unused)}, or run cvt-check without --layers")
    check_limit(args.limit)
    if args.plot:
        check_plot_path(args.plot)  # before minutes of work, not after
    bundle = Bundle.open(args.bundle)
    reports = check_layers(bundle, backends=args.backend or ["onnxruntime"], precisions=args.precision,
                           data=args.data, limit=args.limit, mode=args.layers, progress=not args.quiet)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for rep in reports:
            print(rep, end="\n\n")
        print(f"first jump = {JUMP_RULE}")
    if args.plot:
        print(f"plot: {plot(reports, args.plot)}", file=sys.stderr)
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..trt.readiness import check_bundle_readiness, summary

    unused = [flag for flag, value in (("--backend", args.backend), ("--device", args.device), ("--data", args.data),
                                       ("--limit", args.limit), ("--preprocess", args.preprocess != "model" or None))
              if value]
    if unused:
        raise CvtDeployError(f"{', '.join(unused)} has no effect with --tensorrt (a static check of the graphs: no "
                             "images, no backend)", f"drop {', '.join(unused)}, or run cvt-check without --tensorrt")
    from ..trt import rtx

    bundle = Bundle.open(args.bundle)
    reports = check_bundle_readiness(bundle, dict.fromkeys(args.tensorrt), args.precision)
    missing = rtx.rtx_missing()
    builds = {b.graph: b for b in rtx.check_builds(bundle, args.precision, progress=not args.quiet)} if not missing else {}
    if args.json:  # the real parser's verdict beside each static report of the same graph
        real = {g: b.to_dict() for g, b in builds.items()}
        print(json.dumps([{**r.to_dict(), "real_parser": real.get(r.graph) or {"checked": False, "why": missing}}
                          for r in reports], indent=2))
    else:
        for rep in reports:
            if rep.findings:
                print(rep, end="\n\n")
        print(summary(reports), end="\n\n")
        for build in builds.values():
            if build.errors or build.warnings:
                print(build, end="\n\n")
        print(rtx.summary(list(builds.values())) if builds else f"real parser: not checked: {missing}")
    refused = [b for b in builds.values() if not b]
    if refused:
        print("error: NVIDIA's parser and builder (TensorRT-RTX) refused " + ", ".join(f"{b.graph} ({b.verdict})"
                                                                              for b in refused), file=sys.stderr)
    failed = [r for r in reports if not r]
    if failed:
        oldest = min((r.version for r in failed), key=TENSORRT_TARGETS.index)
        print("error: not ready: " + ", ".join(f"{r.graph} on TensorRT {r.version} ({len(r.errors)} finding(s))"
                                             for r in failed), file=sys.stderr)
        print(f"  fix: re-export the bundle for that TensorRT: cvt-export --tensorrt {oldest} --out {args.bundle} ... "
              "(the findings above name each node, the rule and its source)", file=sys.stderr)
    return 1 if failed or refused else 0


def _rank_int8(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..export.pipeline import default_cache_dir
    from ..sensitivity import DEFAULT_IMAGES, rank_int8_layers

    if not args.rank_int8:
        raise CvtDeployError("--rank-layers chooses the layers --rank-int8 ranks", "add --rank-int8")
    for other, what in (("--tensorrt", "a static check of the graphs for TensorRT's parser"),
                        ("--layers", "where a graph's error first jumps, layer by layer")):
        if getattr(args, other[2:]):
            raise CvtDeployError(f"--rank-int8 and {other} are two different checks (which int8 layers to keep "
                                 f"float; {what})", "run cvt-check once with each")
    # The ranking edits the int8 ONNX graph's Q/DQ layer by layer: ONNX Runtime, its CPU provider, model preprocessing.
    backends = ",".join(b for b in args.backend or [] if b != "onnxruntime")  # decision: the ranking's own backend
    unused = [f"{flag} {value}" for flag, value in (
        ("--backend", backends), ("--precision", ",".join(args.precision or [])), ("--device", args.device),
        ("--preprocess", "" if args.preprocess == "model" else args.preprocess), ("--plot", args.plot)) if value]
    if unused:
        raise CvtDeployError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with --rank-int8 "
                             "(it ranks the portable int8 graph's layers against the fp32 graph, on ONNX Runtime's "
                             "CPU provider, on the model's own preprocessing)",
                             f"drop {', '.join(u.split()[0] for u in unused)}, or run cvt-check without --rank-int8")
    if args.limit == 0:  # check_limit's fix would name the parity check's default, not the ranking's
        raise CvtDeployError("--limit 0: the ranking needs at least one image",
                             f"omit --limit for the default ({DEFAULT_IMAGES}), or pass a whole number >= 1")
    bundle = Bundle.open(args.bundle)
    # decision: the ranking reads the portable int8 graph; before its own error, as the fix names the checkpoint
    if bundle.find("onnx", "int8") is None:
        raise CvtDeployError(f"{bundle.root} has no int8 ONNX graph to rank (it holds "
                             f"{', '.join(sorted(bundle.artifacts))})",
                             "export it with one: " + _export_command(bundle))
    cache = default_cache_dir() / "sensitivity"
    report = rank_int8_layers(bundle, data=args.data, limit=args.limit or DEFAULT_IMAGES, layers=args.rank_layers,
                              cache=cache, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    top = report.rows[0]
    print(report, end="\n\n")
    print(f"ranked {len(report.rows)} layer(s) in {report.seconds:.1f} s, {report.cached} from the cache ({cache})")
    int8 = bundle.find("onnx", "int8")  # decision: the graph just ranked
    recorded = int8.parity_on("onnxruntime") if int8 is not None else None
    if recorded and recorded.get("passed"):  # nothing to mend: the table only says where int8's error comes from
        print("the int8 graph already meets its gates (as recorded in the bundle): nothing needs to stay float")
        return 0
    print(f"next: {_export_command(bundle, '--int8-keep-float', top.module or top.node)}\n"
          f"  keeps the top layer float (gain {100 * top.gain:.1f}%); or --int8-keep-float auto [--int8-max-drop "
          "POINTS]: the most sensitive layers float, fewest first, until the int8 gates hold")
    return 0


def _export_command(bundle: Bundle, *flags: str) -> str:
    """The cvt-export line that writes ``bundle`` again as int8 with ``flags``: the checkpoint its manifest
    records as --weights (when that was a file), '...' for the model options a manifest does not keep."""
    import shlex

    from ..util import PRECISIONS

    source = bundle.extra.get("source")
    ckpt = source.get("checkpoint") if isinstance(source, dict) and source.get("sha256") else None
    weights = f"--weights {shlex.quote(ckpt)} " if isinstance(ckpt, str) else ""
    # decision: the re-export keeps the reduced precisions the bundle has, and int8 (what the ranking is of)
    precisions = ",".join(p for p in PRECISIONS[1:] if p == "int8" or bundle.find("onnx", p))
    return " ".join(["cvt-export", f"{weights}...", "--precision", precisions, *map(shlex.quote, flags), "--out",
                     shlex.quote(str(bundle.root))])
