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

from ..artifacts import REFERENCE, RELEASE, TARGET, artifact_file
from ..bundle import Artifact, Bundle, artifact_name
from ..bundle_write import create
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
    from ..trt.builder import BuildOptions
    from ..trt.util import Toolkit
    from .int8_plan import Int8Plan

#: The int8 graph for strongly typed TensorRT >= 10: Q/DQ with fp16 outside it (export/fp16.py).
INT8_FP16 = "tensorrt-10"


#: What every typed graph inherits from the portable fp32 graph it is made from (manifest keys).
PORTABLE_FACTS = ("tensorrt", "layernorm", "fp32_nodes")


def _file(precision: str, target: str = "portable") -> str:
    return artifact_file("onnx", precision, target)


def _fp32_graph(bundle: Bundle) -> Path:
    """The portable fp32 graph every other graph of the export is made from (read, not written)."""
    return bundle.path(bundle.require("onnx", REFERENCE))  # decision: the export's source graph, by definition


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
        object.__setattr__(self, "precisions", tuple(check_precision(p) for p in self.precisions) or (REFERENCE,))
        object.__setattr__(self, "int8_keep_float", check_keep_float(self.int8_keep_float))
        # decision: the int8 options, checked against the int8 export they tune
        if self.int8_keep_float and "int8" not in self.precisions:
            raise CvtDeployError(f"{KEEP_FLOAT} (int8_keep_float) has no effect: no int8 graph is exported",
                                 "add int8 to the precisions (--precision int8)")
        if self.int8_max_drop is not None and not self.int8_auto:
            raise CvtDeployError(f"{DROP_FLAG} (int8_max_drop) bounds what {KEEP_FLOAT} {AUTO} chooses, and there is "
                                 f"no {AUTO}", f"add {KEEP_FLOAT} {AUTO}, or drop {DROP_FLAG}")
        gate = GATES["int8"].max_accuracy_drop  # decision: as above
        object.__setattr__(self, "int8_max_drop", check_max_drop(self.int8_max_drop, gate if gate is not None else 100.0))
        for name, flag in (("check_limit", "--limit"), ("calib_count", "--calib-count")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CvtDeployError(f"{flag} {value!r} must be a whole number >= 1", f"omit {flag} for the default")
        check_opset(self.opset)
        object.__setattr__(self, "tensorrt", check_tensorrt_target(self.tensorrt))
        release = RELEASE[self.tensorrt]
        if release.opset_is_limit and self.opset > release.max_opset:
            # 8.x's importers predate opset 18: its ReduceMean ignores axes given as an input.
            raise CvtDeployError(f"--opset {self.opset} is newer than TensorRT {self.tensorrt} parses "
                                 f"(opset {release.max_opset} at most)",
                                 f"use --opset {release.max_opset}, or --tensorrt 10 if the graphs never meet TensorRT 8.x")
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
    from .openvino import weights_file
    from .ort_cpu import TARGET as ORT_CPU

    wanted = [p for p in PRECISIONS if p in {REFERENCE, *options.precisions}]
    targets = [t for t in TARGET.values() if t.name != ORT_CPU or options.ort_cpu]  # --no-ort-cpu leaves its graphs out
    irs = [artifact_file("openvino", p) for p in wanted] if options.openvino else []
    return [artifact_file("torch", "fp32"), *(_file(p, t.name) for t in targets for p in wanted if p in t.precisions),
            *(f for xml in irs for f in (xml, weights_file(xml)))]


def export_bundle(model: CvT, out: str | os.PathLike[str], options: ExportOptions | None = None, *,
                  source: str = "", progress: bool = True, **fields: Any) -> ExportResult:
    """Export ``model`` to a checked bundle in ``out`` (replacing a previous bundle there).

    ``options`` (or its fields as keyword arguments: ``precisions=("fp16",)``...) say how.
    """
    if options is not None and fields:
        raise TypeError("pass ExportOptions or its fields as keywords, not both")
    options = options or ExportOptions(**fields)
    eval_data = None
    if options.check or options.int8_auto:  # auto plans on the check images
        from ..data import DEFAULT_LIMIT, load_eval_data

        # Read the check's images first: a bad --data should fail before minutes of export.
        eval_data = load_eval_data(options.data, model.cfg, options.check_limit or DEFAULT_LIMIT, progress)
    src_hash = file_sha256(source) if source and Path(source).is_file() else ""
    extra: dict[str, Any] = {"source": {"checkpoint": source, "sha256": src_hash}, "created_by": tool_versions()}
    with create(out, model.cfg, options.batch, extra, planned=planned_files(options)) as bundle:
        for note in bundle.notes if progress else ():
            print(f"  note: {note}", file=sys.stderr)
        run = _Run(bundle, options, model, {"source_sha256": src_hash, "versions": extra["created_by"],
                                            "batch": options.batch.to_dict()}, eval_data, progress)
        portable = _fp32_stage(run)
        _precision_stages(run, portable)
        _target_stages(run, portable, run.plan)
        result = ExportResult(bundle, _checked(run))
        if options.time_cpu:
            from ..bench.cpu_paths import record_cpu_timings

            record_cpu_timings(bundle, progress=progress)
    if bundle.kept and progress:
        print(f"  note: kept {len(bundle.kept)} file(s) in {out} that are not part of the bundle: "
              + ", ".join(bundle.kept[:5]) + (" ..." if len(bundle.kept) > 5 else ""), file=sys.stderr)
    return result


@dataclass
class _Run:
    """One export in progress: what every stage reads."""

    bundle: Bundle
    options: ExportOptions
    model: CvT
    meta: dict[str, Any]  # provenance stamped into every graph
    eval_data: EvalData | None
    progress: bool
    plan: Int8Plan | None = None  # the layers every int8 graph keeps float, once the int8 stage has run

    def graph_meta(self, precision: str) -> dict[str, str]:
        return graph_metadata(self.model.cfg.to_json(), precision, self.meta)


def _fp32_stage(run: _Run) -> dict[str, Any]:
    """The PyTorch weights and the portable fp32 graph; returns the portable rewrite's facts."""
    from ..checkpoints import save_checkpoint

    bundle, options, progress = run.bundle, run.options, run.progress
    weights = artifact_file("torch", "fp32")
    save_checkpoint(run.model, bundle.new_file(weights))
    bundle.add(Artifact(artifact_name("torch", "fp32"), weights, "torch", "fp32"))
    fp32 = bundle.new_file(_file("fp32"))
    with stage(f"exporting {run.model.cfg.variant} to ONNX (opset {options.opset})", progress):
        export_onnx(run.model, fp32, opset=options.opset, batch=options.batch, metadata=run.graph_meta("fp32"))
    written = graph_opset(fp32)  # the manifest records what the graph is, not what was asked
    if written != options.opset:
        raise CvtDeployError(f"asked for opset {options.opset}, but torch's exporter wrote opset {written}",
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
    return portable


def _precision_stages(run: _Run, portable: dict[str, Any]) -> None:
    """The typed graph of every precision asked for but the reference (fp32), each by its stage
    (:data:`LOWER`), stamped with what it is (config, batch, provenance)."""
    bundle, options = run.bundle, run.options
    for precision in [p for p in PRECISIONS if p in options.precisions and p != REFERENCE]:
        info = LOWER[precision](run, portable.get("fp32_nodes", []))
        dst = bundle.new_file(_file(precision))
        bundle.add(Artifact(artifact_name("onnx", precision), dst.name, "onnx", precision,
                            info={"opset": graph_opset(dst), "input": INPUT_NAME, "output": OUTPUT_NAME,
                                  **{k: v for k, v in portable.items() if k in PORTABLE_FACTS},
                                  **info}))


def _target_stages(run: _Run, portable: dict[str, Any], plan: Int8Plan | None) -> None:
    """What the graphs are made into for their targets, then NVIDIA's parsers' verdicts on them."""
    bundle, options, progress = run.bundle, run.options, run.progress
    if options.ort_cpu:
        from .ort_cpu import TARGET_INFO, write_ort_cpu_graphs

        write_ort_cpu_graphs(bundle, options.precisions, {p: run.graph_meta(p) for p in TARGET_INFO.precisions},
                             progress, plan)
    if options.input_format != "float" or options.output != "logits":
        from .rawpixel import embed_bundle_io

        embed_bundle_io(bundle, options.input_format, options.output, progress)
    if options.openvino:  # of the graphs as they are now: an IR is made of the final portable graph
        from .openvino import write_openvino_irs

        write_openvino_irs(bundle, options.precisions, progress)
    with stage(f"checking the portable graphs against the ONNX parsers of TensorRT {', '.join(portable['tensorrt'])}",
               progress):
        require_ready(bundle)
    if options.rtx_build:
        from ..trt.rtx import require_builds

        with stage("parsing and building every TensorRT-bound graph with NVIDIA's TensorRT-RTX (on the CPU)",
                   progress):
            require_builds(bundle, progress)


def _checked(run: _Run) -> list[ParityReport]:
    """Every graph's parity against PyTorch, recorded; :class:`ParityFailure` when a gate fails."""
    if not run.options.check:
        return []
    # OpenVINO runs the same portable graphs with kernels of its own: where it is installed,
    # its figures are measured in the same pass and recorded beside ONNX Runtime's.
    from ..backends import backend_class

    also = [b for b in ADVISORY_BACKENDS if backend_class(b).unavailable_reason() is None]
    # an IR is gated on OpenVINO (its own backend), the portable graphs there only advised on
    reports = check_bundle(run.bundle, data=run.eval_data, progress=run.progress, reference_model=run.model,
                           backends=("onnxruntime", *also))
    record_parity(run.bundle, "onnx", reports, show=run.progress, advisory=ADVISORY_BACKENDS)
    return reports


# Backends the export also checks its graphs on, whose misses warn instead of failing it.
ADVISORY_BACKENDS = ("openvino",)


def add_engines(bundle: Bundle, precisions: Sequence[str], build: BuildOptions, *, toolkit: Toolkit,
                check: bool = True, data: str | None = None, check_limit: int | None = None,
                progress: bool = True) -> list[Artifact]:
    """``--format trt|trt-rtx``: the engines built (trt/loader.py) and, with ``check``, checked
    (:func:`check_engines`). A missed gate keeps the engines, with the failing figures recorded,
    and raises :class:`ParityFailure` once they are in the bundle."""
    from ..bundle_write import changing
    from ..trt import loader

    missed: ParityFailure | None = None
    with changing(bundle):
        built = loader.build_engines(bundle, precisions, build, toolkit=toolkit, progress=progress)
        if check:
            try:
                check_engines(bundle, toolkit, precisions, data=data, check_limit=check_limit, progress=progress)
            except ParityFailure as e:
                missed = e
    if missed is not None:
        raise missed
    return built


def check_engines(bundle: Bundle, toolkit: Toolkit, precisions: Sequence[str], *, data: str | None = None,
                  check_limit: int | None = None, progress: bool = True) -> None:
    """The check of the engines an export built (trt/loader.py's ``build_engines``): parity of the
    ``toolkit`` engines of ``precisions`` against PyTorch fp32 on this GPU, recorded in the
    manifest; the same gates as the ONNX graphs (:class:`~cvt_deploy.parity.ParityFailure` when
    one fails). TensorRT-RTX engines built on a machine without a GPU are not checked: said so."""
    from .. import parity  # looked up at the call, as before the move: tests stand in for parity.check_bundle
    from ..backends import backend_class

    cannot_run = backend_class(toolkit.kind).unavailable_reason() if toolkit.aot else None
    if cannot_run is not None:
        print(f"  note: the {toolkit.name} engines are built and their graphs checked here, but not run: "
              f"{cannot_run}. Run cvt-check --bundle {bundle.root} --backend {toolkit.kind} on a machine with "
              "an RTX or Ampere-or-newer GPU", file=sys.stderr)
        return
    reports = parity.check_bundle(bundle, data=data, limit=check_limit, backends=[toolkit.kind], precisions=precisions,
                                  progress=progress)
    parity.record_parity(bundle, toolkit.kind, reports, show=True)


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
    plan = auto_plan(bundle.new_file(_file("int8")), _fp32_graph(bundle), base, data,
                     max_drop=options.int8_max_drop, cache=default_cache_dir() / "sensitivity", progress=progress)
    if progress:
        print(explain(plan), file=sys.stderr)
    return plan


def _fp16_graph(run: _Run, fp32_nodes: Sequence[str]) -> dict[str, Any]:
    """The fp16 stage: the typed fp16 graph (export/fp16.py)."""
    from .fp16 import convert_fp16

    with stage("converting to fp16 (LayerNorm/Softmax kept fp32)", run.progress):
        return convert_fp16(_fp32_graph(run.bundle), run.bundle.new_file(_file("fp16")),
                            metadata=run.graph_meta("fp16"), keep_fp32_nodes=fp32_nodes)


def _int8_graphs(run: _Run, fp32_nodes: Sequence[str]) -> dict[str, Any]:
    """The int8 stage: the plan of layers kept float (``auto``'s search included), the Q/DQ graph
    that follows it, and the int8+fp16 graph for strongly typed TensorRT; the Q/DQ graph's facts."""
    bundle, options, progress = run.bundle, run.options, run.progress
    plan = _plan(_fp32_graph(bundle), options, progress)
    info = _quantize(run, plan)
    if options.int8_auto and run.eval_data is not None:
        plan = _auto(bundle, plan, run.eval_data, options, progress)
        # quantized for real with the plan: what every other int8 graph follows
        info = _quantize(run, plan) if plan.nodes else {**info, **plan.recorded()}
    run.plan = plan
    _int8_fp16(bundle, run.graph_meta("int8"), fp32_nodes, progress, plan)
    return info


#: Each reduced precision's graph stage, called by :func:`_precision_stages` (a new precision adds one).
LOWER = {"fp16": _fp16_graph, "int8": _int8_graphs}  # decision: the stages are the export's to own


def _quantize(run: _Run, plan: Int8Plan) -> dict[str, Any]:
    from ..calibration import DEFAULT_CALIB_COUNT, load_calibration
    from .int8 import check_cache_location, quantize_int8

    bundle, options, progress = run.bundle, run.options, run.progress
    src, dst = _fp32_graph(bundle), bundle.new_file(_file("int8"))
    batch, description = load_calibration(options.calib, bundle.config, options.calib_count or DEFAULT_CALIB_COUNT,
                                          progress=progress)
    cache: Path | None = options.calib_cache
    if cache is None:
        cache = default_cache_dir() / "calibration"
        try:
            check_cache_location(cache)
        except CvtDeployError:  # the user's own file sits where the default cache goes: keep it, cache nothing
            print(f"  note: calibration cache not written: {cache} is a file that is not a cvt-deploy cache "
                  "(pass --calib-cache DIR to keep the ranges elsewhere)", file=sys.stderr)
            cache = None
    kwargs: dict[str, Any] = {"cache": cache, "progress": progress, "metadata": run.graph_meta("int8"), "plan": plan}
    if options.calib_method:
        kwargs["method"] = options.calib_method
    kept = f", {len(plan.nodes)} layer{'s' if len(plan.nodes) != 1 else ''} kept float" if plan and plan.nodes else ""
    with stage(f"quantizing to int8 (Q/DQ) with {len(batch)} calibration images{kept}", progress):
        info = quantize_int8(src, dst, batch, **kwargs)
    return {**info, "calibration_data": description}


def _int8_fp16(bundle: Bundle, metadata: dict[str, str], fp32_nodes: Sequence[str], progress: bool,
               plan: Int8Plan | None = None) -> None:
    """The int8 graph strongly typed TensorRT builds: the Q/DQ graph with fp16 outside Q/DQ (the
    layers ``plan`` keeps float included: fp16 there, as everything else outside Q/DQ)."""
    from .fp16 import convert_int8_fp16

    dst = bundle.new_file(_file("int8", INT8_FP16))
    with stage("writing the int8+fp16 graph for TensorRT 10 (LayerNorm/Softmax kept fp32)", progress):
        info = convert_int8_fp16(bundle.new_file(_file("int8")), dst, keep_fp32_nodes=fp32_nodes, metadata=metadata)
    bundle.add(Artifact(artifact_name("onnx", "int8", INT8_FP16), dst.name, "onnx", "int8",
                        info={"target": INT8_FP16, "input": INPUT_NAME, "output": OUTPUT_NAME, "tensorrt": ["10"],
                              "portable": artifact_name("onnx", "int8"), **info,
                              **(plan.recorded() if plan else {})}))
