"""``export_bundle``: every export stage in order, into a bundle that is checked before it exists.

Stages: weights (safetensors) -> ``export_onnx`` -> ``simplify`` -> ``convert_fp16`` /
``quantize_int8`` on request -> parity of every graph against PyTorch fp32 on real data.
The bundle folder appears only when all of this succeeded (and the gates held, unless
``check=False``); an interrupted or failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..bundle import Artifact, Bundle, artifact_name
# check_bundle and ParityFailure are re-exported: they lived here before parity.py owned checking.
from ..errors import CvtDeployError
from ..parity import ParityFailure, ParityReport, check_bundle, record_parity  # noqa: F401
from ..progress import stage
from ..trt.readiness import require_ready
from ..util import INPUT_FORMATS, OUTPUT_KINDS, PRECISIONS, BatchRange, check_choice, check_precision, file_sha256, tool_versions
from .onnx import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx, graph_metadata, graph_opset, simplify
from .portable import DEFAULT_TENSORRT, check_tensorrt_target, portable_graph

if TYPE_CHECKING:
    from ..data import EvalData
    from ..model import CvT
    from .int8_plan import Int8Plan

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: The int8 graph for strongly typed TensorRT >= 10: Q/DQ with fp16 outside it (export/fp16.py).
INT8_FP16_FILE = "model.int8-fp16.onnx"


@dataclass
class ExportResult:
    bundle: Bundle
    reports: list[ParityReport] = field(default_factory=list)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvt-deploy"


@dataclass(frozen=True)
class ExportOptions:
    """How to export: one object for ``export_bundle`` and ``cvt-export``, validated here only.

    ``precisions``: graphs besides the fp32 reference (fp16, int8). ``batch``: the batch sizes
    the graphs accept. ``data``/``check_limit``/``check``: the parity check (an image folder,
    default the demo digits). ``calib*``: int8 calibration images, method, count and cache.
    ``ort_cpu``: also write ONNX Runtime CPU graphs (fp32, and int8 when asked) beside the
    portable ones (export/ort_cpu.py).
    ``input_format``/``output``: what every graph takes and gives (export/rawpixel.py).
    ``tensorrt``: the oldest TensorRT the portable graphs are written for ("8.5", "8.6", "10";
    export/portable.py); every portable graph passes the readiness check for it and each newer one.
    ``openvino``: also write an OpenVINO IR of each portable graph (export/openvino.py), gated on OpenVINO.
    ``time_cpu``: time the bundle's CPU paths on this CPU and record the fastest for ``load`` (runtimes/choice.py).
    ``rtx_build``: parse and build every TensorRT-bound graph with TensorRT-RTX where it is installed
    (trt/rtx.py): NVIDIA's own parser and builder, on the CPU.
    ``int8_keep_float``: layers every int8 graph leaves float: module names (``stage2.blocks.1.attn.proj``),
    module prefixes (``stage2.blocks.1``: every weighted layer inside) or ONNX node names; resolved
    against the fp32 graph by ``int8_plan.plan_int8`` (an unknown name fails the export, naming it);
    a str is a comma list, and the names are kept as a tuple. ``auto`` among them also keeps the fewest
    most costly layers float for the int8 gates (and ``int8_max_drop``, points of top-1 accuracy) to
    hold on the check images (export/int8_auto.py).
    """

    precisions: Sequence[str] = ("fp32",)
    opset: int = DEFAULT_OPSET
    batch: BatchRange = field(default_factory=BatchRange)
    data: str | None = None
    check: bool = True
    check_limit: int | None = None
    calib: str | None = None
    calib_method: str | None = None
    calib_count: int | None = None
    calib_cache: Path | None = None
    ort_cpu: bool = True
    input_format: str = "float"
    output: str = "logits"
    tensorrt: str = DEFAULT_TENSORRT
    openvino: bool = False
    time_cpu: bool = True
    rtx_build: bool = True
    int8_keep_float: Sequence[str] = ()
    int8_max_drop: float | None = None

    def __post_init__(self) -> None:
        from .int8 import check_cache_location
        from ..parity import GATES
        from .int8_auto import AUTO, DROP_FLAG, check_max_drop
        from .int8_plan import FLAG as KEEP_FLOAT, check_keep_float
        from .onnx import check_opset

        check_choice(self.input_format, INPUT_FORMATS, "--input-format")
        check_choice(self.output, OUTPUT_KINDS, "--output")
        object.__setattr__(self, "precisions", tuple(check_precision(p) for p in self.precisions) or ("fp32",))
        object.__setattr__(self, "int8_keep_float", check_keep_float(self.int8_keep_float))
        if self.int8_keep_float and "int8" not in self.precisions:
            raise CvtDeployError(f"{KEEP_FLOAT} (int8_keep_float) has no effect: no int8 graph is exported",
                                 "add int8 to the precisions (--precision int8)")
        if self.int8_max_drop is not None and not self.int8_auto:
            raise CvtDeployError(f"{DROP_FLAG} (int8_max_drop) bounds what {KEEP_FLOAT} {AUTO} chooses, and there is "
                                 f"no {AUTO}", f"add {KEEP_FLOAT} {AUTO}, or drop {DROP_FLAG}")
        gate = GATES["int8"].max_accuracy_drop
        object.__setattr__(self, "int8_max_drop", check_max_drop(self.int8_max_drop, gate if gate is not None else 100.0))
        for name, flag in (("check_limit", "--limit"), ("calib_count", "--calib-count")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CvtDeployError(f"{flag} {value!r} must be a whole number >= 1", f"omit {flag} for the default")
        check_opset(self.opset)
        object.__setattr__(self, "tensorrt", check_tensorrt_target(self.tensorrt))
        if self.tensorrt != "10" and self.opset > 17:
            # 8.x's importers predate opset 18: its ReduceMean ignores axes given as an input.
            raise CvtDeployError(f"--opset {self.opset} is newer than TensorRT {self.tensorrt} parses (opset 17 at most)",
                                 f"use --opset 17, or --tensorrt 10 if the graphs never meet TensorRT 8.x")
        if self.calib_cache is not None:
            check_cache_location(Path(self.calib_cache))
        if self.openvino:
            from ..errors import require

            require("openvino", "openvino", "--format openvino")  # before minutes of export, not after

    @property
    def int8_auto(self) -> bool:
        """Whether ``int8_keep_float`` asks for ``auto`` (export/int8_auto.py)."""
        from .int8_auto import AUTO

        return AUTO in self.int8_keep_float


def planned_files(options: ExportOptions) -> list[str]:
    """The files an export with ``options`` writes (checked against a user's files in --out first)."""
    from .openvino import FILES as IR_FILES, weights_file
    from .ort_cpu import FILES as ORT_CPU_FILES

    wanted = {"fp32", *options.precisions}
    return ["model.safetensors", *(f for p, f in ONNX_FILES.items() if p in wanted),
            *([INT8_FP16_FILE] if "int8" in wanted else []),
            *(f for p, f in ORT_CPU_FILES.items() if p in wanted and options.ort_cpu),
            *(f for p, xml in IR_FILES.items() if p in wanted and options.openvino for f in (xml, weights_file(xml)))]


def export_bundle(model: CvT, out: str | os.PathLike[str], options: ExportOptions | None = None, *,
                  source: str = "", progress: bool = True, **fields: Any) -> ExportResult:
    """Export ``model`` to a checked bundle in ``out`` (replacing a previous bundle there).

    ``options`` (or its fields as keyword arguments: ``precisions=("fp16",)``...) say how.
    """
    from ..checkpoints import save_checkpoint

    if options is not None and fields:
        raise TypeError("pass ExportOptions or its fields as keywords, not both")
    options = options or ExportOptions(**fields)
    precisions, opset, batch, data, check = options.precisions, options.opset, options.batch, options.data, options.check
    check_limit, calib, calib_method = options.check_limit, options.calib, options.calib_method
    calib_count, calib_cache = options.calib_count, options.calib_cache
    cfg = model.cfg
    eval_data = None
    if check or options.int8_auto:  # auto plans on the check images
        from ..data import DEFAULT_LIMIT, load_eval_data

        # Read the check's images first: a bad --data should fail before minutes of export.
        eval_data = load_eval_data(data, cfg, check_limit or DEFAULT_LIMIT, progress)
    src_hash = file_sha256(source) if source and Path(source).is_file() else ""
    extra: dict[str, Any] = {"source": {"checkpoint": source, "sha256": src_hash}, "created_by": tool_versions()}
    result: ExportResult
    with Bundle.create(out, cfg, batch, extra, planned=planned_files(options)) as bundle:
        for note in bundle.notes:
            if progress:
                print(f"  note: {note}", file=sys.stderr)
        save_checkpoint(model, bundle.root / "model.safetensors")
        bundle.add(Artifact("torch-fp32", "model.safetensors", "torch", "fp32"))
        fp32 = bundle.root / ONNX_FILES["fp32"]
        meta = {"source_sha256": src_hash, "versions": extra["created_by"], "batch": batch.to_dict()}
        with stage(f"exporting {cfg.variant} to ONNX (opset {opset})", progress):
            export_onnx(model, fp32, opset=opset, batch=batch, metadata=graph_metadata(cfg.to_json(), "fp32", meta))
        written = graph_opset(fp32)  # the manifest records what the graph is, not what was asked
        if written != opset:
            raise CvtDeployError(f"asked for opset {opset}, but torch's exporter wrote opset {written}",
                                 f"use --opset {written}, or another torch version")
        with stage("simplifying with onnxsim", progress):
            simp = simplify(fp32)
        if progress and not simp["simplified"]:
            print(f"  note: not simplified: {simp.get('reason')}", file=sys.stderr)
        with stage(f"writing the graph for TensorRT {options.tensorrt} and newer", progress):
            portable = portable_graph(fp32, options.tensorrt)
        bundle.add(Artifact(artifact_name("onnx", "fp32"), fp32.name, "onnx", "fp32",
                            info={"opset": written, "input": INPUT_NAME, "output": OUTPUT_NAME, "simplify": simp,
                                  **portable}))
        plan = _plan(fp32, options, progress) if "int8" in precisions else None
        for precision in [p for p in PRECISIONS if p in precisions and p != "fp32"]:
            # The stage writes the graph once, with what it is (config, batch, provenance) stamped in.
            graph_meta = graph_metadata(cfg.to_json(), precision, meta)
            info = _lower_precision(bundle, precision, calib, calib_method, calib_count, calib_cache, graph_meta,
                                    progress, portable.get("fp32_nodes", []), plan)
            if precision == "int8" and options.int8_auto and plan is not None and eval_data is not None:
                plan = _auto(bundle, plan, eval_data, options, progress)
                if plan.nodes:  # quantized for real with the plan: what every other int8 graph follows
                    info = _lower_precision(bundle, precision, calib, calib_method, calib_count, calib_cache,
                                            graph_meta, progress, portable.get("fp32_nodes", []), plan)
                else:
                    info = {**info, **plan.recorded()}
            dst = bundle.root / ONNX_FILES[precision]
            bundle.add(Artifact(artifact_name("onnx", precision), dst.name, "onnx", precision,
                                info={"opset": graph_opset(dst), "input": INPUT_NAME, "output": OUTPUT_NAME,
                                      **{k: v for k, v in portable.items() if k in ("tensorrt", "layernorm", "fp32_nodes")},
                                      **info}))
            if precision == "int8":
                _int8_fp16(bundle, graph_meta, portable.get("fp32_nodes", []), progress, plan)
        if options.ort_cpu:
            from .ort_cpu import write_ort_cpu_graphs

            write_ort_cpu_graphs(bundle, precisions, {p: graph_metadata(cfg.to_json(), p, meta) for p in ("fp32", "int8")},
                                 progress, plan)
        if options.input_format != "float" or options.output != "logits":
            from .rawpixel import embed_bundle_io

            embed_bundle_io(bundle, options.input_format, options.output, progress)
        if options.openvino:  # of the graphs as they are now: an IR is made of the final portable graph
            from .openvino import write_openvino_irs

            write_openvino_irs(bundle, precisions, progress)
        with stage(f"checking the portable graphs against the ONNX parsers of TensorRT {', '.join(portable['tensorrt'])}",
                   progress):
            require_ready(bundle)
        if options.rtx_build:
            from ..trt.rtx import require_builds

            with stage("parsing and building every TensorRT-bound graph with NVIDIA's TensorRT-RTX (on the CPU)",
                       progress):
                require_builds(bundle, progress)
        result = ExportResult(bundle)
        if check:
            # OpenVINO runs the same portable graphs with kernels of its own: where it is installed,
            # its figures are measured in the same pass and recorded beside ONNX Runtime's.
            from ..backends import backend_class

            also = [b for b in ADVISORY_BACKENDS if backend_class(b).unavailable_reason() is None]
            # an IR is gated on OpenVINO (its own backend), the portable graphs there only advised on
            result.reports = check_bundle(bundle, data=eval_data, progress=progress, reference_model=model,
                                          backends=("onnxruntime", *also))
            record_parity(bundle, "onnx", result.reports, show=progress, advisory=ADVISORY_BACKENDS)
        if options.time_cpu:
            from ..bench.cpu_paths import record_cpu_timings

            record_cpu_timings(bundle, progress=progress)
    if bundle.kept and progress:
        print(f"  note: kept {len(bundle.kept)} file(s) in {out} that are not part of the bundle: "
              + ", ".join(bundle.kept[:5]) + (" ..." if len(bundle.kept) > 5 else ""), file=sys.stderr)
    return result


# Backends the export also checks its graphs on, whose misses warn instead of failing it.
ADVISORY_BACKENDS = ("openvino",)


def _plan(fp32: Path, options: ExportOptions, progress: bool) -> Int8Plan:
    """The layers every int8 graph of the export keeps float (int8_plan.plan_int8), said on stderr."""
    from .int8_auto import AUTO
    from .int8_plan import plan_int8

    plan = plan_int8(fp32, [n for n in options.int8_keep_float if n != AUTO])
    if progress and plan.nodes:
        print(f"  {plan.describe()}", file=sys.stderr)
    return plan


def _auto(bundle: Bundle, base: Int8Plan, data: EvalData, options: ExportOptions, progress: bool) -> Int8Plan:
    """``auto``'s plan (export/int8_auto.py), from the int8 graph just quantized with ``base``, said on stderr."""
    from .int8_auto import auto_plan, explain

    if progress:
        print("choosing the layers int8 keeps float (auto): the quantized layers ranked, then kept float, the most "
              "costly first, until the int8 gates hold", file=sys.stderr)
    plan = auto_plan(bundle.root / ONNX_FILES["int8"], bundle.root / ONNX_FILES["fp32"], base, data,
                     max_drop=options.int8_max_drop, cache=default_cache_dir() / "sensitivity", progress=progress)
    if progress:
        print(explain(plan), file=sys.stderr)
    return plan


def _lower_precision(bundle: Bundle, precision: str, calib: str | None, calib_method: str | None,
                     calib_count: int | None, calib_cache: Path | None, metadata: dict[str, str],
                     progress: bool, fp32_nodes: Sequence[str] = (), plan: Int8Plan | None = None) -> dict[str, Any]:
    src, dst = bundle.root / ONNX_FILES["fp32"], bundle.root / ONNX_FILES[precision]
    if precision == "fp16":
        from .fp16 import convert_fp16

        with stage("converting to fp16 (LayerNorm/Softmax kept fp32)", progress):
            return convert_fp16(src, dst, metadata=metadata, keep_fp32_nodes=fp32_nodes)
    from ..calibration import DEFAULT_CALIB_COUNT, load_calibration
    from .int8 import check_cache_location, quantize_int8

    batch, description = load_calibration(calib, bundle.config, calib_count or DEFAULT_CALIB_COUNT, progress=progress)
    cache: Path | None = calib_cache
    if cache is None:
        cache = default_cache_dir() / "calibration"
        try:
            check_cache_location(cache)
        except CvtDeployError:  # the user's own file sits where the default cache goes: keep it, cache nothing
            print(f"  note: calibration cache not written: {cache} is a file that is not a cvt-deploy cache "
                  "(pass --calib-cache DIR to keep the ranges elsewhere)", file=sys.stderr)
            cache = None
    kwargs: dict[str, Any] = {"cache": cache, "progress": progress, "metadata": metadata, "plan": plan}
    if calib_method:
        kwargs["method"] = calib_method
    kept = f", {len(plan.nodes)} layer{'s' if len(plan.nodes) != 1 else ''} kept float" if plan and plan.nodes else ""
    with stage(f"quantizing to int8 (Q/DQ) with {len(batch)} calibration images{kept}", progress):
        info = quantize_int8(src, dst, batch, **kwargs)
    return {**info, "calibration_data": description}


def _int8_fp16(bundle: Bundle, metadata: dict[str, str], fp32_nodes: Sequence[str], progress: bool,
               plan: Int8Plan | None = None) -> None:
    """The int8 graph strongly typed TensorRT builds: the Q/DQ graph with fp16 outside Q/DQ (the
    layers ``plan`` keeps float included: fp16 there, as everything else outside Q/DQ)."""
    from .fp16 import convert_int8_fp16

    dst = bundle.root / INT8_FP16_FILE
    with stage("writing the int8+fp16 graph for TensorRT 10 (LayerNorm/Softmax kept fp32)", progress):
        info = convert_int8_fp16(bundle.root / ONNX_FILES["int8"], dst, keep_fp32_nodes=fp32_nodes, metadata=metadata)
    bundle.add(Artifact(artifact_name("onnx", "int8", "tensorrt-10"), dst.name, "onnx", "int8",
                        info={"target": "tensorrt-10", "input": INPUT_NAME, "output": OUTPUT_NAME, "tensorrt": ["10"],
                              "portable": artifact_name("onnx", "int8"), **info,
                              **(plan.recorded() if plan else {})}))
