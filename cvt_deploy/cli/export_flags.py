"""cvt-export's flags: --help's groups by job, and one table of where each flag applies (the
refusal of one that cannot apply is derived from it). cli/export.py maps them onto the options."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from ..errors import CvtDeployError
from ..export.portable import DEFAULT_TENSORRT, TENSORRT_TARGETS
from ..util import INPUT_FORMATS, OUTPUT_KINDS
from .common import (NameList, add_groups, add_json_arg, add_limit_arg, add_model_args, add_precision_arg,
                     add_quiet_arg, aliases_note, decimal_number, deprecated_alias, given_flags, no_effect, or_list,
                     whole_number)

EPILOG = """\
examples:
  cvt-export --format onnx --out build/demo                 the bundled demo model, fp32
  cvt-export --model cvt-13 --weights CvT-13-224x224-IN-1k.pth --precision fp16,int8 --out build/cvt13
  cvt-export --weights microsoft/cvt-13 --format trt --precision fp16 --out build/cvt13
  cvt-export --weights my-finetuned-cvt/ --out build/mine    a Hugging Face folder: any architecture, any classes
  cvt-export --weights mine.pth --heads 2,4,6 --out build/mine   official keys, widths of no registered variant
  cvt-export --format trt --bundle build/cvt13 --precision fp16   build the engine on the target device
  cvt-export --format trt-rtx --precision fp16,int8 --out build/rtx   engines for RTX / Ampere+ GPUs, built on any CPU
  cvt-export --model cvt-13 --tensorrt 8.5 --precision fp16 --out build/xavier   graphs JetPack 5.1 parses
  cvt-export --format openvino --precision int8 --out build/cpu   the bundle plus OpenVINO IR (fp32, int8)
  cvt-export --format openvino --bundle build/cvt13   add OpenVINO IR to a bundle (openvino + onnxruntime)
  cvt-export --format triton --bundle build/cvt13 --out build/triton-repo   a Triton model repository
  cvt-export --input-format uint8-nhwc --output probs --out build/edge   graphs that take camera pixels
  cvt-export --format deepstream --out build/ds          float-pixels + probs graphs and nvinfer_config.txt
  cvt-export --format deepstream --bundle build/ds --precision fp32   (re)write the config of a bundle
  cvt-export --weights mine.pth --precision int8 --int8-keep-float auto --int8-max-drop 0.5 --data val/ --out build/q
                                                          int8 that meets its gate: the fewest layers kept float

Every export checks each graph against PyTorch fp32 on real images (the demo held-out digits, or --data) and fails
with exit code 1 when a precision's gates do not hold; the bundle is only written when everything succeeded. Then each
CPU path of the bundle (ONNX Runtime on each graph, OpenVINO where installed) is timed briefly on this CPU at batch 1
and 8, and the manifest records the fastest for cvt-predict and cvt_deploy.load on this CPU (--no-timing: skip;
cvt-bench --record measures it again on another machine). Run a bundle with cvt-predict, re-check it with cvt-check,
time it with cvt-bench.
"""


# Where each flag applies. A mode: a --format, with --bundle (that bundle used as it is) or without (an export).
FORMATS = ("onnx", "trt", "trt-rtx", "openvino", "deepstream", "triton")


class Mode(NamedTuple):
    format: str
    bundle: bool  # --bundle given


NO_MODE = {  # the two combinations that are no mode: (message, fix)
    Mode("onnx", True): ("--bundle BUNDLE builds TensorRT engines from an existing bundle (--format trt or trt-rtx), "
                         "adds OpenVINO IR (--format openvino) or writes its DeepStream config (--format deepstream)",
                         "add --format trt, trt-rtx, openvino or deepstream"),
    Mode("triton", False): ("--format triton writes a model repository (--out) from an exported bundle (--bundle)",
                            "export first (cvt-export --out build/b), then: cvt-export --format triton --bundle build/b "
                            "--out REPO")}
MODES = frozenset(Mode(f, b) for f in FORMATS for b in (False, True)) - set(NO_MODE)
EXPORTS = frozenset(m for m in MODES if not m.bundle)
FORMAT = {f: frozenset(m for m in MODES if m.format == f) for f in FORMATS}  # its modes, with --bundle or without


class Need(NamedTuple):  # a condition beyond the mode
    holds: Callable[[argparse.Namespace, Sequence[str]], bool]  # (args, precisions)
    why: str | Callable[[argparse.Namespace], str]  # why flags change nothing without it
    fix: str


DEMO_AS_IS = "without --weights or --model the demo model is exported as it"
NEEDS: dict[str, Need] = {
    # decision: the int8 flags tune the int8 export, so they need one
    "int8": Need(lambda a, p: "int8" in p, "no int8 graph is exported", "add --precision int8"),
    # --int8-keep-float auto plans on the check images even with --no-check: --data and --limit choose them.
    "checked": Need(lambda a, p: not a.no_check or "auto" in (a.int8_keep_float or ()),
                    "nothing is checked (--no-check)", "drop --no-check"),
    "a model": Need(lambda a, p: bool(a.weights or a.model), f"{DEMO_AS_IS} was trained, at its own size and activation",
                    "pass --weights CKPT (or --model VARIANT for random weights) with them"),
    "weights": Need(lambda a, p: bool(a.weights), lambda a: "--heads and --config describe the architecture of "
                    "--weights, and " + (f"--model {a.model} alone is that variant's, with random weights" if a.model
                                         else f"{DEMO_AS_IS} is"), "add --weights CKPT"),
    "secondary": Need(lambda a, p: a.classifier_mode == "secondary",
                      "only a secondary classifier reads a detector's objects", "add --classifier-mode secondary"),
}


class Scope(NamedTuple):  # where flags apply: modes, and needs (NEEDS keys) beyond them
    modes: frozenset[Mode]
    missing: str = ""  # what does not happen in the other modes
    needs: tuple[str, ...] = ()
    notes: Mapping[str, str] = {}  # format: why it in particular is left out


EXPORTED, CHECKED, DS = "nothing is exported", "nothing is checked", "no DeepStream config is written"
SERVED = {"triton": "cvt-check checks the bundle it serves"}
APPLIES: tuple[tuple[tuple[str, ...], Scope], ...] = (  # every flag (dest) and where it applies, by --help's groups
    (("model", "weights"), Scope(EXPORTS, EXPORTED)),
    (("img_size", "activation"), Scope(EXPORTS, EXPORTED, ("a model",))),
    (("heads", "config"), Scope(EXPORTS, EXPORTED, ("weights",))),
    (("format", "precision", "bundle", "out"), Scope(MODES)),
    (("opset", "tensorrt", "batch_range", "input_format", "output", "no_ort_cpu"), Scope(EXPORTS, EXPORTED)),
    (("data", "limit"), Scope(MODES - FORMAT["triton"], CHECKED, ("checked",), SERVED)),
    (("no_check",), Scope(MODES - FORMAT["triton"] - {Mode("deepstream", True)}, CHECKED, notes=SERVED)),
    (("no_timing",), Scope(EXPORTS | {Mode("openvino", True)}, "nothing is exported here, so nothing is timed")),
    (("no_rtx_build",), Scope(EXPORTS, "nothing is exported here, so no graph is built")),
    (("calib", "calib_method", "calib_count", "calib_cache", "int8_keep_float", "int8_max_drop"),
     Scope(EXPORTS, "nothing is exported or calibrated", ("int8",))),
    (("workspace",), Scope(FORMAT["trt"] | FORMAT["trt-rtx"], "no TensorRT engine is built")),
    (("timing_cache", "version_compatible", "hardware_compatible", "dla_core"),
     Scope(FORMAT["trt"], "no TensorRT engine is built on a GPU",
           notes={"trt-rtx": "TensorRT-RTX engines are built ahead of time for every RTX / Ampere-or-newer GPU"})),
    (("triton_name", "triton_device", "triton_instances", "triton_ort_tensorrt"),
     Scope(FORMAT["triton"], "no Triton repository is written")),
    (("classifier_mode", "classifier_threshold"), Scope(FORMAT["deepstream"], DS)),
    (("operate_on_gie_id",), Scope(FORMAT["deepstream"], DS, ("secondary",))),
    (("json",), Scope(EXPORTS, "no parity report is printed")),
    (("quiet",), Scope(MODES)),
)


def refuse_no_effect(parser: argparse.ArgumentParser, args: argparse.Namespace, precisions: Sequence[str]) -> None:
    """No mode, or flags that change nothing in the mode, refused before any work (one reason at a time)."""
    mode = Mode(args.format, args.bundle is not None)
    if mode in NO_MODE:
        raise CvtDeployError(*NO_MODE[mode])
    refused = [(reason, given) for dests, scope in APPLIES
               if (given := given_flags(parser, args, dests)) and (reason := _why_not(scope, mode, args, precisions))]
    if refused:
        (why, fix), flags = refused[0][0], [flag for reason, given in refused if reason == refused[0][0] for flag in given]
        raise no_effect(flags, why, f"{fix}, or {'' if fix.startswith('drop ') else 'drop '}{', '.join(flags)}")


def _why_not(scope: Scope, mode: Mode, args: argparse.Namespace, precisions: Sequence[str]) -> tuple[str, str] | None:
    """(why flags of ``scope`` change nothing in ``mode``, what makes them count), None where they apply."""
    if mode not in scope.modes:
        if mode.bundle and mode._replace(bundle=False) in scope.modes:
            return f"{scope.missing} (--bundle): that bundle is used as it is", "export anew without --bundle"
        note = scope.notes.get(mode.format)
        same = [f for f in FORMATS if Mode(f, mode.bundle) in scope.modes]  # else --bundle must change too
        other = or_list([f for f in FORMATS if Mode(f, not mode.bundle) in scope.modes])
        return (f"{scope.missing} (--format {mode.format}{'; ' + note if note else ''})",
                f"add --format {or_list(same)}" if same else f"export anew with --format {other} (no --bundle)"
                if mode.bundle else f"add --format {other} --bundle BUNDLE")
    for need in (NEEDS[n] for n in scope.needs if not NEEDS[n].holds(args, precisions)):
        return need.why if isinstance(need.why, str) else need.why(args), need.fix
    return None


GROUPS = (  # --help's groups, one per job, in APPLIES' order: (title, when its flags apply)
    ("model to export", "An export (no --bundle) of the bundled demo model, CvT-tiny trained on digits, unless --weights\n"
     "or --model; --img-size and --activation need one of them, --heads and --config need --weights."),
    ("what to write", "--format, --precision, --bundle (used as it is: nothing is exported) and --out: every mode;\n"
     "the others shape the exported graphs: an export only (no --bundle)."),
    ("checks and timing", "Every format but triton. --data and --limit: not with --no-check (but with it and\n"
     "--int8-keep-float auto); --no-check: not with --format deepstream --bundle either; --no-timing: an export\n"
     "or --format openvino --bundle; --no-rtx-build: an export."),
    ("int8", "An export (no --bundle) with --precision int8."),
    ("TensorRT engines (--format trt, trt-rtx)", "--format trt, with or without --bundle; --workspace also trt-rtx."),
    ("Triton (--format triton)", "--format triton --bundle BUNDLE --out REPO (needs the 'serve' extra)."),
    ("DeepStream (--format deepstream)", "--format deepstream, with or without --bundle."),
    ("output", "-q: every mode; --json: an export."),
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-export", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)  # its own group, titled here as the others
    ap._action_groups[-1].title, ap._action_groups[-1].description = GROUPS[0]
    adders = (_add_what, _add_checks, _add_int8, _add_tensorrt, _add_triton, _add_deepstream)
    add_groups(ap, GROUPS[1:], adders)
    add_json_arg(output := ap.add_argument_group(*GROUPS[-1]), "the parity reports", instead="")
    add_quiet_arg(output)
    deprecated_alias(ap, "--onnx", "--bundle")
    deprecated_alias(ap, "--batch", "--batch-range", note="--batch now means batch sizes, as in cvt-bench")
    deprecated_alias(ap, "--check-limit", "--limit")
    ap.epilog = EPILOG + aliases_note(ap)
    return ap


def _add_what(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx: a bundle of ONNX graphs; trt: that bundle plus TensorRT engines (needs TensorRT + GPU); "
                        "trt-rtx: that bundle plus TensorRT-RTX engines for RTX and Ampere-or-newer GPUs, built ahead "
                        "of time on this machine, GPU or not (needs the 'rtx' extra; they run where a GPU is); "
                        "openvino: that bundle plus an OpenVINO IR of each graph (.xml + .bin, gated on OpenVINO); "
                        "deepstream: the bundle plus an nvinfer classifier config and label file; "
                        "triton: a Triton model repository from --bundle, written to --out")
    add_precision_arg(g, many=True, default="fp32 for --format onnx and openvino, fp16 for trt, trt-rtx and deepstream",
                      extra=". The fp32 graph is always written: it is the reference")
    g.add_argument("--bundle", type=Path, metavar="BUNDLE",
                   help="with --format trt or trt-rtx: build engines for this existing bundle instead of exporting; "
                        "openvino: add its OpenVINO IR; deepstream: write its nvinfer config; triton: the bundle to serve")
    g.add_argument("--out", type=Path, help="bundle folder to write (default: build/<variant>); triton: the repository")
    g.add_argument("--opset", type=whole_number, default=17, help="ONNX opset, >= 17 (default 17: TensorRT 8.5 and newer)")
    g.add_argument("--tensorrt", default=DEFAULT_TENSORRT, metavar="VERSION", choices=TENSORRT_TARGETS,
                   help="oldest TensorRT the portable graphs must parse on: 8.5 (JetPack 5.1: LayerNorm written as "
                        "elementwise ops), 8.6 (default: JetPack 6.0 and newer, single LayerNormalization nodes) or 10 "
                        "(JetPack 6.1/6.2, x86); each graph is checked against those parsers (cvt-check --tensorrt)")
    g.add_argument("--batch-range", default="1:8:32", metavar="N|MIN:OPT:MAX",
                   help="batch sizes the graphs and engines accept: fixed N, or a dynamic range (default 1:8:32; OPT "
                        "is what TensorRT tunes for, 8 inside the range when left out); the batch sizes of cvt-bench "
                        "--batch must lie inside it")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default=None,
                   help="float (default): normalised float32 NCHW, as preprocess() makes; uint8-nhwc / uint8-nchw: RGB "
                        "pixels at the model's input size, the graph casts and normalises them itself; float-pixels: "
                        "float32 NCHW pixel values 0..255 (what DeepStream feeds; the default with --format deepstream)")
    g.add_argument("--output", choices=OUTPUT_KINDS, default=None,
                   help="logits (default) or probs: the graph ends in a softmax (the default with --format deepstream)")
    g.add_argument("--no-ort-cpu", action="store_true", help="write the portable graphs only (by default ONNX "
                   "Runtime CPU graphs are added: faster there, see docs/precision.md)")


def _add_checks(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class (default: demo held-out digits)")
    add_limit_arg(g, "the check")
    g.add_argument("--no-check", action="store_true", help="skip the parity check (and its gates)")
    g.add_argument("--no-timing", action="store_true",
                   help="do not time the CPU paths after the export (load then keeps its fixed order on this CPU)")
    g.add_argument("--no-rtx-build", action="store_true",
                   help="do not parse and build the TensorRT-bound graphs with TensorRT-RTX (by default, where the 'rtx' "
                        "extra is installed, NVIDIA's own parser and builder check each such graph on the CPU and a "
                        "graph they refuse fails the export)")


def _add_int8(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--calib", metavar="DIR|FILE.npy", help="calibration images (default: the demo calibration split)")
    g.add_argument("--calib-method", metavar="M", help="calibration method (see cvt_deploy.export.int8)")
    g.add_argument("--calib-count", type=whole_number, metavar="N", help="number of calibration images")
    g.add_argument("--calib-cache", type=Path, metavar="DIR",
                   help="where calibration ranges are cached for reuse (default ~/.cache/cvt-deploy/calibration)")
    g.add_argument("--int8-keep-float", action=NameList, what="layer name", default=None, metavar="NAME[,NAME]",
                   help="layers every int8 graph leaves float (a comma list or repeated): module names "
                        "(stage2.blocks.1.attn.proj), module prefixes (stage2.blocks.1: every weighted layer inside) or "
                        "ONNX node names (node_MatMul_127), as cvt-check --layers lists them; an unknown name fails the "
                        "export, naming it. 'auto' (alone or beside names): also keep the fewest of the layers cvt-check "
                        "--rank-int8 ranks most costly float for the int8 gates to hold on the check images; the export "
                        "says which and why, and the manifest records it")
    g.add_argument("--int8-max-drop", type=decimal_number, metavar="POINTS",
                   help="with --int8-keep-float auto: the most top-1 accuracy (percentage points) int8 may lose on the "
                        "check images, at most the int8 gate's 1 (without labels: the most top-1 disagreement with fp32)")


def _add_tensorrt(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--workspace", type=whole_number, metavar="MiB", help="builder workspace limit (default fits a Jetson)")
    g.add_argument("--timing-cache", type=Path, metavar="FILE", help="timing cache file, reused and updated")
    g.add_argument("--version-compatible", action="store_true",
                   help="engine runs on newer TensorRT of the same major version too (TensorRT >= 8.6)")
    g.add_argument("--hardware-compatible", action="store_true",
                   help="engine runs on all Ampere and newer GPUs (TensorRT >= 8.6; not supported on Jetson/JetPack)")
    g.add_argument("--dla-core", type=whole_number, metavar="N", help="Jetson: run what the DLA can on DLA core N, "
                   "the rest on the GPU (fp16 and a fixed --batch-range N only)")


def _add_triton(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--triton-name", default="cvt", metavar="NAME", help="model name prefix: NAME-onnx-fp32, NAME-trt-fp16 (default cvt)")
    g.add_argument("--triton-device", choices=("cpu", "gpu"), default="cpu", help="instances of the ONNX models (default cpu)")
    g.add_argument("--triton-instances", type=whole_number, default=1, metavar="N", help="instances per model (default 1)")
    g.add_argument("--triton-ort-tensorrt", action="store_true", help="ONNX models run through ONNX Runtime's TensorRT accelerator")


def _add_deepstream(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--classifier-mode", choices=("primary", "secondary"), default="primary",
                   help="primary: classify whole frames; secondary: classify a detector's objects")
    g.add_argument("--operate-on-gie-id", type=whole_number, default=1, metavar="ID",
                   help="secondary mode: the gie-unique-id of the detector whose objects to classify (default 1)")
    g.add_argument("--classifier-threshold", type=decimal_number, default=0.5, metavar="P",
                   help="lowest probability nvinfer attaches as a label (default 0.5)")
