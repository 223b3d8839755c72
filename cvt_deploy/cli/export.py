"""cvt-export: PyTorch CvT -> checked ONNX bundle (fp32/fp16/int8) -> TensorRT engines."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..bundle import Bundle
from ..errors import CvtDeployError
from ..export.portable import DEFAULT_TENSORRT, TENSORRT_TARGETS
from ..trt.util import TOOLKITS, Toolkit
from ..util import INPUT_FORMATS, OUTPUT_KINDS, BatchRange
from .common import (ListOption, add_json_arg, add_limit_arg, add_model_args, add_precision_arg, add_quiet_arg,
                     aliases_note, cli_entry, decimal_number, deprecated_alias, load_model_from_args, refuse_unused,
                     whole_number)

if TYPE_CHECKING:
    from ..deepstream import DeepStreamOptions
    from ..export.pipeline import ExportOptions
    from ..trt.loader import BuildOptions

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

Every export checks each graph against PyTorch fp32 on real images (the demo held-out
digits, or --data) and fails with exit code 1 when a precision's gates do not hold; the
bundle is only written when everything succeeded. Then each CPU path of the bundle (ONNX
Runtime on each graph, OpenVINO where installed) is timed briefly on this CPU at batch 1 and 8,
and the manifest records the fastest for cvt-predict and cvt_deploy.load on this CPU
(--no-timing: skip; cvt-bench --record measures it again on another machine). Run a bundle
with cvt-predict, re-check it with cvt-check, time it with cvt-bench.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-export", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--format", choices=("onnx", "trt", "trt-rtx", "openvino", "deepstream", "triton"), default="onnx",
                    help="onnx: a bundle of ONNX graphs; trt: that bundle plus TensorRT engines (needs TensorRT + GPU); "
                         "trt-rtx: that bundle plus TensorRT-RTX engines for RTX and Ampere-or-newer GPUs, built ahead "
                         "of time on this machine, GPU or not (needs the 'rtx' extra; they run where a GPU is); "
                         "openvino: that bundle plus an OpenVINO IR of each graph (.xml + .bin, gated on OpenVINO); "
                         "deepstream: the bundle plus an nvinfer classifier config and label file; "
                         "triton: a Triton model repository from --bundle, written to --out")
    add_precision_arg(ap, many=True, default="fp32 for --format onnx and openvino, fp16 for trt, trt-rtx and deepstream",
                      extra=". The fp32 graph is always written: it is the reference")
    ap.add_argument("--out", type=Path, help="bundle folder to write (default: build/<variant>)")
    ap.add_argument("--bundle", type=Path, metavar="BUNDLE",
                    help="with --format trt or trt-rtx: build engines for this existing bundle instead of exporting; with "
                         "--format deepstream: write its nvinfer config; with --format triton: the bundle to serve")
    ap.add_argument("--opset", type=whole_number, default=17, help="ONNX opset, >= 17 (default 17: TensorRT 8.5 and newer parse it)")
    ap.add_argument("--tensorrt", default=DEFAULT_TENSORRT, metavar="VERSION", choices=TENSORRT_TARGETS,
                    help="oldest TensorRT the portable graphs must parse on: 8.5 (JetPack 5.1: LayerNorm written "
                         "as elementwise ops), 8.6 (default: JetPack 6.0 and newer, single LayerNormalization nodes) "
                         "or 10 (JetPack 6.1/6.2, x86); every graph is checked against each of those parsers "
                         "(cvt-check --tensorrt)"),
    ap.add_argument("--batch-range", default="1:8:32", metavar="N|MIN:OPT:MAX",
                    help="batch sizes the graphs and engines accept: fixed N, or a dynamic range (default 1:8:32; "
                         "OPT is what TensorRT tunes for, 8 inside the range when left out); the batch sizes of "
                         "cvt-bench --batch must lie inside it")
    g = ap.add_argument_group("accuracy check")
    g.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class (default: demo held-out digits)")
    add_limit_arg(g, "the check")
    g.add_argument("--no-check", action="store_true", help="skip the parity check (and its gates)")
    ap.add_argument("--no-timing", action="store_true",
                    help="do not time the CPU paths after the export (load then keeps its fixed order on this CPU)")
    ap.add_argument("--no-rtx-build", action="store_true",
                    help="do not parse and build the TensorRT-bound graphs with TensorRT-RTX (by default, where the "
                         "'rtx' extra is installed, NVIDIA's own parser and builder check every such graph on the CPU "
                         "and a graph they refuse fails the export)")
    ap.add_argument("--no-ort-cpu", action="store_true",
                    help="write the portable graphs only (by default ONNX Runtime CPU graphs are added: faster there, "
                         "see docs/precision.md)")
    g = ap.add_argument_group("int8 calibration")
    g.add_argument("--calib", metavar="DIR|FILE.npy", help="calibration images (default: the demo calibration split)")
    g.add_argument("--calib-method", metavar="M", help="calibration method (see cvt_deploy.export.int8)")
    g.add_argument("--calib-count", type=whole_number, metavar="N", help="number of calibration images")
    g.add_argument("--calib-cache", type=Path, metavar="DIR",
                   help="where calibration ranges are cached for reuse (default ~/.cache/cvt-deploy/calibration)")
    g.add_argument("--int8-keep-float", action=NameList, what="layer name", default=None, metavar="NAME[,NAME]",
                   help="layers every int8 graph leaves float (a comma list or repeated): module names "
                        "(stage2.blocks.1.attn.proj), module prefixes (stage2.blocks.1: every weighted layer inside) "
                        "or ONNX node names (node_MatMul_127), as cvt-check --layers lists them; an unknown name "
                        "fails the export, naming it. 'auto' (alone or beside names): also keep the fewest of the "
                        "layers cvt-check --rank-int8 ranks most costly float for the int8 gates to hold on the "
                        "check images; the export says which and why, and the manifest records it")
    g.add_argument("--int8-max-drop", type=decimal_number, metavar="POINTS",
                   help="with --int8-keep-float auto: the most top-1 accuracy (percentage points) int8 may lose on "
                        "the check images, at most the int8 gate's 1 (without labels: the most top-1 disagreement "
                        "with fp32)")
    g = ap.add_argument_group("TensorRT (--format trt; --workspace also trt-rtx)")
    g.add_argument("--workspace", type=whole_number, metavar="MiB", help="builder workspace limit (default fits a Jetson)")
    g.add_argument("--timing-cache", type=Path, metavar="FILE", help="timing cache file, reused and updated")
    g.add_argument("--version-compatible", action="store_true",
                   help="engine runs on newer TensorRT of the same major version too (TensorRT >= 8.6)")
    g.add_argument("--hardware-compatible", action="store_true",
                   help="engine runs on all Ampere and newer GPUs (TensorRT >= 8.6; not supported on Jetson/JetPack)")
    g = ap.add_argument_group("Triton model repository (--format triton; needs the 'serve' extra)")
    g.add_argument("--triton-name", default="cvt", metavar="NAME", help="model name prefix: NAME-onnx-fp32, NAME-trt-fp16 (default cvt)")
    g.add_argument("--triton-device", choices=("cpu", "gpu"), default="cpu", help="instances of the ONNX models (default cpu)")
    g.add_argument("--triton-instances", type=whole_number, default=1, metavar="N", help="instances per model (default 1)")
    g.add_argument("--triton-ort-tensorrt", action="store_true", help="ONNX models run through ONNX Runtime's TensorRT accelerator")
    g.add_argument("--dla-core", type=whole_number, metavar="N",
                   help="Jetson: run what the DLA can on DLA core N, the rest on the GPU (fp16 and a fixed --batch-range N only)")
    g = ap.add_argument_group("what the graphs take and give (for apps that hand the network pixels)")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default=None,
                   help="float (default): normalised float32 NCHW, as preprocess() makes; uint8-nhwc / uint8-nchw: "
                        "RGB pixels at the model's input size, the graph casts and normalises them itself; "
                        "float-pixels: float32 NCHW pixel values 0..255 (what DeepStream feeds; the default with "
                        "--format deepstream)")
    g.add_argument("--output", choices=OUTPUT_KINDS, default=None,
                   help="logits (default) or probs: the graph ends in a softmax (the default with --format deepstream)")
    g = ap.add_argument_group("DeepStream (--format deepstream)")
    g.add_argument("--classifier-mode", choices=("primary", "secondary"), default="primary",
                   help="primary: classify whole frames; secondary: classify a detector's objects")
    g.add_argument("--operate-on-gie-id", type=whole_number, default=1, metavar="ID",
                   help="secondary mode: the gie-unique-id of the detector whose objects to classify (default 1)")
    g.add_argument("--classifier-threshold", type=decimal_number, default=0.5, metavar="P",
                   help="lowest probability nvinfer attaches as a label (default 0.5)")
    add_json_arg(ap, "the parity reports", instead="")
    add_quiet_arg(ap)
    deprecated_alias(ap, "--onnx", "--bundle")
    deprecated_alias(ap, "--batch", "--batch-range", note="--batch now means batch sizes, as in cvt-bench")
    deprecated_alias(ap, "--check-limit", "--limit")
    ap.epilog = EPILOG + aliases_note(ap)
    return ap


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..parity import ParityFailure

    from ..export.pipeline import ExportOptions
    from ..trt.loader import BuildOptions

    parser = build_parser()
    args = parser.parse_args(argv)
    deepstream = args.format == "deepstream"
    # fp32 for the CPU formats (no CPU backend computes fp16 faster); fp16 where GPUs build engines.
    precisions = args.precision or ["fp32" if args.format in ("onnx", "openvino") else "fp16"]
    toolkit = TOOLKITS.get({"trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}.get(args.format, ""))
    refuse_no_effect(parser, args, precisions)
    progress = not args.quiet
    # DeepStream feeds float planar pixels and thresholds probabilities: its graphs default to both.
    options = ExportOptions(precisions=precisions, opset=args.opset, batch=BatchRange.parse(args.batch_range), data=args.data,
                            check=not args.no_check, check_limit=args.limit, calib=args.calib,
                            calib_method=args.calib_method, calib_count=args.calib_count, calib_cache=args.calib_cache,
                            ort_cpu=not args.no_ort_cpu,
                            input_format=args.input_format or ("float-pixels" if deepstream else "float"),
                            output=args.output or ("probs" if deepstream else "logits"), tensorrt=args.tensorrt,
                            openvino=args.format == "openvino" and args.bundle is None, time_cpu=not args.no_timing,
                            rtx_build=not args.no_rtx_build, int8_keep_float=tuple(args.int8_keep_float or ()),
                            int8_max_drop=args.int8_max_drop)
    # Both validated before any work: a bad --workspace should not wait for minutes of export.
    build = BuildOptions(workspace_mib=args.workspace, timing_cache=args.timing_cache,
                         version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                         dla_core=args.dla_core)
    if toolkit is not None:
        build.check_toolkit(toolkit)
    if args.format == "triton":
        return _triton(args)
    if args.dla_core is not None:
        from ..trt.dla import check_dla_request

        if args.format != "trt":
            raise CvtDeployError("--dla-core applies to TensorRT engines", "add --format trt")
        for precision in precisions if args.bundle is None else []:  # a bundle's batch is checked when it is read
            check_dla_request(args.dla_core, precision, options.batch)
    ds = _deepstream_options(args, options) if deepstream else None
    if args.bundle is not None:
        if args.format == "onnx":
            raise CvtDeployError("--bundle BUNDLE builds TensorRT engines from an existing bundle (--format trt or "
                                 "trt-rtx), adds OpenVINO IR (--format openvino) or writes its DeepStream config "
                                 "(--format deepstream)", "add --format trt, trt-rtx, openvino or deepstream")
        if args.format == "openvino":
            _add_openvino(Path(args.bundle), options, args.precision, progress)
        elif ds is not None:
            _write_deepstream(Bundle.open(args.bundle), ds, progress)
        elif toolkit is not None:
            _build_engines(Bundle.open(args.bundle), options, build, toolkit, progress)
        return 0
    if toolkit is not None:
        from ..trt.util import require_tensorrt

        require_tensorrt(f"--format {args.format}", toolkit)  # fail before minutes of export work, not after
    from ..bundle import check_output
    from ..export.pipeline import export_bundle, planned_files

    if args.out is not None:  # a folder that must not be written to is refused before the model loads
        check_output(args.out, planned_files(options))
    model, source = load_model_from_args(args)
    out = args.out or Path("build") / model.cfg.variant  # type: ignore[attr-defined]
    if ds is not None:  # what would stop the DeepStream files fails before the export, not after
        from ..deepstream import check_free, labels_text

        labels_text(model.cfg)  # type: ignore[attr-defined]
        if out.is_dir():
            check_free(out)
    try:
        result = export_bundle(model, out, options, source=source, progress=progress)  # type: ignore[arg-type]
    except ParityFailure as e:
        for rep in e.reports:
            print(rep, file=sys.stderr)
        print(f"error: {e.message}\n  fix: {e.hint}\nnothing was written to {out}", file=sys.stderr)
        if args.json:
            print(json.dumps([r.to_dict() for r in e.reports], indent=2))
        return 1
    if args.json:
        print(json.dumps([r.to_dict() for r in result.reports], indent=2))
    if toolkit is not None:
        _build_engines(result.bundle, options, build, toolkit, progress)
    if ds is not None:
        _write_deepstream(result.bundle, ds, progress)
    print(f"wrote {out}: " + ", ".join(sorted(result.bundle.artifacts)), file=sys.stderr)
    return 0


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


def refuse_no_effect(parser: argparse.ArgumentParser, args: argparse.Namespace, precisions: Sequence[str]) -> None:
    """cvt-export's flags that change nothing in the command given (see common.refuse_unused)."""
    exporting = args.bundle is None and args.format != "triton"  # a model is loaded and exported
    # --int8-keep-float auto plans on the check images even with --no-check: --data and --limit choose them.
    checking = (not args.no_check or "auto" in (args.int8_keep_float or ())) and args.format != "triton"
    # flag dests -> (has an effect, why not, what would make it count)
    rules = [
        (("calib", "calib_method", "calib_count", "calib_cache", "int8_keep_float", "int8_max_drop"),
         exporting and "int8" in precisions,
         "no int8 graph is exported" if exporting else "nothing is exported or calibrated (--bundle)", "add --precision int8"),
        (("data", "limit"), checking, "nothing is checked" + (" (--no-check)" if args.no_check else ""),
         "drop --no-check" if args.no_check else "use cvt-check on the repository's bundle"),
        (("workspace",), args.format in ("trt", "trt-rtx"), f"no TensorRT engine is built (--format {args.format})",
         "add --format trt or trt-rtx"),
        (("timing_cache", "version_compatible", "hardware_compatible"), args.format == "trt",
         f"no TensorRT engine is built on a GPU (--format {args.format}; TensorRT-RTX engines are built ahead of "
         "time for every RTX / Ampere-or-newer GPU)", "add --format trt"),
        (("triton_name", "triton_device", "triton_instances", "triton_ort_tensorrt"), args.format == "triton",
         f"no Triton repository is written (--format {args.format})", "add --format triton"),
        (("classifier_mode", "operate_on_gie_id", "classifier_threshold"), args.format == "deepstream",
         f"no DeepStream config is written (--format {args.format})", "add --format deepstream"),
        (("no_rtx_build",), exporting, "nothing is exported here, so no graph is built", "drop --no-rtx-build"),
        (("no_timing",), args.format != "triton" and (exporting or args.format == "openvino"),
         "nothing is exported here, so nothing is timed", "drop --no-timing"),
        (("operate_on_gie_id",), args.classifier_mode == "secondary", "only a secondary classifier reads a detector's "
         "objects", "add --classifier-mode secondary"),
        (("model", "weights", "heads", "config", "img_size", "activation", "opset", "tensorrt", "batch_range",
          "no_ort_cpu", "input_format", "output"), exporting,
         "--bundle is used as it is (nothing is exported)", "drop it, or export anew without --bundle"),
        # Past the rule above a model is exported; without --weights it is the demo model or --model's random
        # weights, whose architecture these flags cannot change (and the demo's size and activation neither).
        (("img_size", "activation"), bool(args.weights or args.model),
         "without --weights or --model the demo model is exported as it was trained, at its own size and activation",
         "pass --weights CKPT (or --model VARIANT for random weights) with them, or drop them"),
        (("heads", "config"), bool(args.weights), "--heads and --config describe the architecture of --weights, and "
         + (f"--model {args.model} alone is that variant's, with random weights" if args.model
            else "without --weights or --model the demo model is exported as it is"),
         "add --weights CKPT, or drop them"),
    ]
    refuse_unused(parser, args, rules)


def _triton(args: argparse.Namespace) -> int:
    from ..serve.repository import RepositoryOptions, write_model_repository

    if args.bundle is None or args.out is None:
        raise CvtDeployError("--format triton writes a model repository (--out) from an exported bundle (--bundle)",
                             "export first (cvt-export --out build/b), then: cvt-export --format triton --bundle build/b --out REPO")
    options = RepositoryOptions(model_name=args.triton_name, precisions=args.precision,
                                device=args.triton_device, instances=args.triton_instances,
                                ort_tensorrt=args.triton_ort_tensorrt)
    names = write_model_repository(args.bundle, args.out, options)
    print(f"wrote {args.out}: {', '.join(names)} (serve: see {args.out / 'README.md'})", file=sys.stderr)
    return 0


def _build_engines(bundle: Bundle, options: ExportOptions, build: BuildOptions, toolkit: Toolkit, progress: bool) -> None:
    from ..trt.loader import build_engines

    build_engines(bundle, list(options.precisions), build, toolkit=toolkit, check=options.check, data=options.data,
                  check_limit=options.check_limit, progress=progress)


def _add_openvino(root: Path, options: ExportOptions, precisions: Sequence[str] | None, progress: bool) -> None:
    """--format openvino --bundle: an IR of the bundle's portable graphs (those asked for, default
    all), gated on OpenVINO, then the CPU paths timed again with the IR among them."""
    from ..errors import require
    from ..export.openvino import irs_restored_on_failure, write_openvino_irs
    from ..outlock import output_lock
    from ..parity import check_bundle, record_parity
    from ..util import PRECISIONS

    require("openvino", "openvino", "--format openvino")
    Bundle.open(root)  # a wrong path is refused before the lock (which would make its parent folders)
    with output_lock(root):  # no export replaces the bundle meanwhile
        bundle = Bundle.open(root)  # read again under the lock: as it is now that nothing else writes it
        wanted = list(precisions or [p for p in PRECISIONS if p in {a.precision for a in bundle.artifacts.values()
                                                                      if a.kind == "onnx" and a.target == "portable"}])
        try:
            with irs_restored_on_failure(bundle):
                arts = write_openvino_irs(bundle, wanted, progress)
                if options.check:
                    reports = check_bundle(bundle, data=options.data, limit=options.check_limit, backends=["openvino"],
                                           precisions=[a.precision for a in arts], artifacts=[a.name for a in arts],
                                           progress=progress)
                    record_parity(bundle, "openvino", reports, show=progress)
        except BaseException:
            print(f"no OpenVINO IR was added to {bundle.root}: it is as it was", file=sys.stderr)
            raise
        if options.time_cpu:
            from ..bench.cpu_paths import record_cpu_timings

            record_cpu_timings(bundle, progress=progress)
    print(f"wrote {', '.join(bundle.path(a).name for a in arts)} into {bundle.root}", file=sys.stderr)


def _deepstream_options(args: argparse.Namespace, options: ExportOptions) -> DeepStreamOptions:
    from ..deepstream import DeepStreamOptions, check_graph_io

    if args.bundle is None:  # refused before minutes of export, not after
        check_graph_io(options.input_format, options.output, "the graph asked for")
    # One config per bundle: fp16 when exported (Jetson's usual engine), else the first precision asked for.
    precision = "fp16" if "fp16" in options.precisions else options.precisions[0]
    return DeepStreamOptions(precision=precision if args.precision or args.bundle is None else None,
                             mode=args.classifier_mode, operate_on_gie_id=args.operate_on_gie_id,
                             threshold=args.classifier_threshold, data=args.data, limit=args.limit)


def _write_deepstream(bundle: Bundle, options: DeepStreamOptions, progress: bool) -> None:
    from ..deepstream import write_deepstream

    result = write_deepstream(bundle, options, progress)
    print(f"wrote {result.config} and {result.labels}" + ("" if result.exact else " (approximate input scaling, see above)"),
          file=sys.stderr)
