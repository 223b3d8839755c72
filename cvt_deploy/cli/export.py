"""cvt-export: PyTorch CvT -> checked ONNX bundle (fp32/fp16/int8) -> TensorRT engines."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..bundle import Bundle
from ..errors import CvtDeployError
from ..trt.util import TOOLKITS, Toolkit
from ..util import BatchRange
from .common import NameList, cli_entry, load_model_from_args  # noqa: F401  (NameList: cli/check.py imports it here)
from .export_flags import NO_MODE, Mode, build_parser, refuse_no_effect

if TYPE_CHECKING:
    from ..deepstream import DeepStreamOptions
    from ..export.pipeline import ExportOptions
    from ..trt.loader import BuildOptions


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # decision: --format's default precision: fp32 for the CPU formats (no CPU backend computes fp16
    # faster), fp16 where GPUs build engines
    precisions = args.precision or ["fp32" if args.format in ("onnx", "openvino") else "fp16"]
    refuse_no_effect(parser, args, precisions)
    toolkit = next((t for t in TOOLKITS.values() if t.format == args.format), None)
    # Both validated before any work: a bad --workspace should not wait for minutes of export.
    options = _export_options(args, precisions)
    build = _build_options(args, options, toolkit)
    if args.format == "triton":
        return _triton(args)
    ds = _deepstream_options(args, options) if args.format == "deepstream" else None
    if args.bundle is None:
        return _export(args, options, build, toolkit, ds)
    progress = not args.quiet  # the bundle as it is: nothing exported
    if args.format == "openvino":  # decision: each --format's own step
        _add_openvino(Path(args.bundle), options, args.precision, progress)
    elif ds is not None:
        _write_deepstream(Bundle.open(args.bundle), ds, progress)
    elif toolkit is not None:
        _build_engines(Bundle.open(args.bundle), options, build, toolkit, progress)
    return 0


def _export_options(args: argparse.Namespace, precisions: Sequence[str]) -> ExportOptions:
    from ..export.pipeline import ExportOptions

    deepstream = args.format == "deepstream"  # it feeds float planar pixels and thresholds probabilities
    return ExportOptions(precisions=precisions, opset=args.opset, batch=BatchRange.parse(args.batch_range),
                         data=args.data, check=not args.no_check, check_limit=args.limit, calib=args.calib,
                         calib_method=args.calib_method, calib_count=args.calib_count, calib_cache=args.calib_cache,
                         ort_cpu=not args.no_ort_cpu,
                         input_format=args.input_format or ("float-pixels" if deepstream else "float"),
                         output=args.output or ("probs" if deepstream else "logits"), tensorrt=args.tensorrt,
                         # decision: --format openvino's IRs, written by the export itself
                         openvino=args.format == "openvino" and args.bundle is None, time_cpu=not args.no_timing,
                         rtx_build=not args.no_rtx_build, int8_keep_float=tuple(args.int8_keep_float or ()),
                         int8_max_drop=args.int8_max_drop)


def _build_options(args: argparse.Namespace, options: ExportOptions, toolkit: Toolkit | None) -> BuildOptions:
    from ..trt.loader import BuildOptions

    build = BuildOptions(workspace_mib=args.workspace, timing_cache=args.timing_cache,
                         version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                         dla_core=args.dla_core)
    if toolkit is not None:
        build.check_toolkit(toolkit)
    if args.dla_core is not None and args.bundle is None:  # a bundle's batch is checked when it is read
        from ..trt.dla import check_dla_request

        for precision in options.precisions:
            check_dla_request(args.dla_core, precision, options.batch)
    return build


def _export(args: argparse.Namespace, options: ExportOptions, build: BuildOptions, toolkit: Toolkit | None,
            ds: DeepStreamOptions | None) -> int:
    """The model exported to a bundle, then its engines or DeepStream config; 1 where a gate failed."""
    from ..bundle_write import check_output
    from ..export.pipeline import export_bundle, planned_files
    from ..parity import ParityFailure

    if toolkit is not None:
        from ..trt.util import require_tensorrt

        require_tensorrt(f"--format {args.format}", toolkit)  # fail before minutes of export work, not after
    if args.out is not None:  # a folder that must not be written to is refused before the model loads
        check_output(args.out, planned_files(options))
    model, source = load_model_from_args(args)
    out = args.out or Path("build") / model.cfg.variant  # type: ignore[attr-defined]
    if ds is not None:  # what would stop the DeepStream files fails before the export, not after
        from ..deepstream import check_free, labels_text

        labels_text(model.cfg)  # type: ignore[attr-defined]
        if out.is_dir():
            check_free(out)
    progress = not args.quiet
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


def _triton(args: argparse.Namespace) -> int:
    from ..serve.repository import RepositoryOptions, write_model_repository

    if args.out is None:
        raise CvtDeployError(*NO_MODE[Mode("triton", False)])
    options = RepositoryOptions(model_name=args.triton_name, precisions=args.precision, device=args.triton_device,
                                instances=args.triton_instances, ort_tensorrt=args.triton_ort_tensorrt)
    names = write_model_repository(args.bundle, args.out, options)
    print(f"wrote {args.out}: {', '.join(names)} (serve: see {args.out / 'README.md'})", file=sys.stderr)
    return 0


def _build_engines(bundle: Bundle, options: ExportOptions, build: BuildOptions, toolkit: Toolkit, progress: bool) -> None:
    from ..export.pipeline import add_engines

    add_engines(bundle, list(options.precisions), build, toolkit=toolkit, check=options.check, data=options.data,
                check_limit=options.check_limit, progress=progress)


def _add_openvino(root: Path, options: ExportOptions, precisions: Sequence[str] | None, progress: bool) -> None:
    """--format openvino --bundle: an IR of the bundle's portable graphs (those asked for, default all), gated
    on OpenVINO, then the CPU paths timed again with the IR among them."""
    from ..bundle_write import changing
    from ..errors import require
    from ..export.openvino import write_openvino_irs
    from ..outlock import output_lock
    from ..parity import check_bundle, record_parity
    from ..util import PRECISIONS

    require("openvino", "openvino", "--format openvino")
    Bundle.open(root)  # a wrong path is refused before the lock (which would make its parent folders)
    with output_lock(root):  # no export replaces the bundle meanwhile
        bundle = Bundle.open(root)  # read again under the lock: as it is now that nothing else writes it
        # decision: an IR is made of a portable graph: by default, of each one the bundle has
        wanted = list(precisions or [p for p in PRECISIONS if bundle.find("onnx", p) is not None])
        try:
            # The IRs land only when they passed their gates: a failure leaves the bundle as it was.
            with changing(bundle):
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
    # decision: one config per bundle: fp16 when exported (a Jetson's usual engine), else the first asked for
    precision = "fp16" if "fp16" in options.precisions else options.precisions[0]
    return DeepStreamOptions(precision=precision if args.precision or args.bundle is None else None,
                             mode=args.classifier_mode, operate_on_gie_id=args.operate_on_gie_id,
                             threshold=args.classifier_threshold, data=args.data, limit=args.limit)


def _write_deepstream(bundle: Bundle, options: DeepStreamOptions, progress: bool) -> None:
    from ..deepstream import write_deepstream

    result = write_deepstream(bundle, options, progress)
    print(f"wrote {result.config} and {result.labels}" + ("" if result.exact else " (approximate input scaling, see above)"),
          file=sys.stderr)
