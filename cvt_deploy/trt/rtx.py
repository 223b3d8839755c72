"""NVIDIA's own ONNX parser and builder on every graph a TensorRT engine is built from, on any CPU.

TensorRT-RTX (``pip install 'cvt-deploy[rtx]'``) parses with NVIDIA's current ONNX parser and
builds ahead of time with no GPU, through the same build code as ``--format trt``
(:mod:`.builder`). The export runs it on each TensorRT-bound graph (:func:`require_builds`: a
graph that does not parse or build fails the export, nothing written) and records the verdict
in the manifest; ``cvt-check --tensorrt`` shows it beside the static readiness check.

What a pass proves: NVIDIA's current parser and builder take these exact bytes, strongly
typed, as TensorRT 11 builds. It is not TensorRT 8.5/8.6/10.3 (what Jetsons run, which the
static rules in :mod:`.readiness` model), and nothing is run: deserializing needs a GPU.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import CvtDeployError
from ..progress import say
from .builder import PlanSource, build_plan, network_flags, parse_into, serialize_into, set_rtx_targets
from .report import BuildFailed, BuildReport
from .util import TENSORRT_RTX, dims, require_tensorrt, tensorrt_unavailable_reason, tensorrt_version, trt_logger

if TYPE_CHECKING:
    from ..bundle import Artifact, Bundle

MANIFEST_KEY = "tensorrt_rtx"


def rtx_missing() -> str | None:
    """None where TensorRT-RTX can parse and build here; else why not, with the extra to add."""
    reason = tensorrt_unavailable_reason(TENSORRT_RTX)
    return None if reason is None else f"{reason}; to have NVIDIA's parser and builder check every graph: {TENSORRT_RTX.hint}"


def check_graph(bundle: Bundle, art: Artifact, progress: bool = False) -> BuildReport:
    """Parse and build one ONNX artifact of ``bundle`` with TensorRT-RTX (plan discarded); the report
    says what the parser and builder said, pass or fail."""
    from ..preprocess import graph_dims

    chw = graph_dims(bundle.config.preprocess, str(art.info.get("input_format", "float")))
    try:
        graph = PlanSource(bundle.verified_path(art), art.precision, bundle.batch, art.info.get("input"), chw,
                           onnx_sha256=art.sha256 or None)
        return build_plan(graph, toolkit=TENSORRT_RTX, strongly_typed=True, progress=progress).report
    except BuildFailed as e:
        return e.report
    except CvtDeployError as e:  # our own check of the parsed network (inputs, outputs, shapes)
        return BuildReport(art.file, TENSORRT_RTX.name, tensorrt_version(TENSORRT_RTX), art.precision, parsed=True,
                           errors=[e.message])


def check_builds(bundle: Bundle, precisions: Sequence[str] | None = None, progress: bool = True) -> list[BuildReport]:
    """:func:`check_graph` for every graph of ``bundle`` a TensorRT engine is built from
    (:func:`~cvt_deploy.trt.readiness.portable_graphs`), one line each as it goes."""
    from .readiness import portable_graphs

    reports = []
    for art in portable_graphs(bundle):
        if precisions and art.precision not in precisions:
            continue
        report = check_graph(bundle, art)
        if progress:
            say(f"  {report.graph}: {report.verdict}" + (f" ({report.layers} layers, {report.seconds:.1f}s"
                + (f", {len(report.warnings)} warning(s)" if report.warnings else "") + ")" if report.parsed else ""))
        reports.append(report)
    return reports


def probe(graph: str | os.PathLike[str] | Any, name: str | None = None) -> BuildReport:
    """Parse and build any ONNX graph (a path or a ModelProto) with TensorRT-RTX, strongly typed,
    each dynamic input dimension profiled 1..4: the real parser's verdict on a graph that is not a
    bundle's (the readiness tests' planted violations). Nothing is kept."""
    trt: Any = require_tensorrt("a real parse and build", TENSORRT_RTX)
    with tempfile.TemporaryDirectory(prefix="cvt-rtx-") as tmp:
        if isinstance(graph, (str, os.PathLike)):
            path = Path(graph)
        else:
            import onnx

            path = Path(tmp) / "graph.onnx"
            onnx.save(graph, str(path))
        report = BuildReport(name or path.name, TENSORRT_RTX.name, str(trt.__version__), "-")
        start = time.perf_counter()
        logger = trt_logger(TENSORRT_RTX)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, report.version, True, TENSORRT_RTX))
        parser = trt.OnnxParser(network, logger)
        if not parse_into(report, parser, network, path):
            return report
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = dims(tensor.shape)
            if -1 in shape:
                lo, opt, hi = ([n if n >= 0 else k for n in shape] for k in (1, 2, 4))
                profile.set_shape(tensor.name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
        config.add_optimization_profile(profile)
        set_rtx_targets(trt, config)
        serialize_into(report, builder, network, config, start)
    return report


def require_builds(bundle: Bundle, progress: bool = True) -> list[BuildReport]:
    """The export's stage: every TensorRT-bound graph must parse and build on TensorRT-RTX where it
    is installed; the verdict is recorded per graph (``tensorrt_rtx`` in the manifest). Where it is
    not installed, says so (the static check stands alone) and returns []."""
    missing = rtx_missing()
    if missing is not None:
        if progress:
            say(f"  note: no real TensorRT parse or build: {missing}")
        return []
    reports = check_builds(bundle, progress=progress)
    failed = [r for r in reports if not r]
    if failed:
        raise CvtDeployError(
            "NVIDIA's parser and builder (TensorRT-RTX) refused the exported graphs: "
            + "; ".join(f"{r.graph}: {r.verdict}: {'; '.join(r.errors) or 'no message'}" for r in failed),
            "the errors above name the node: report them with the model; meanwhile export for another TensorRT "
            "(--tensorrt 10) or precision, or skip this check with --no-rtx-build")
    by_file = {r.graph: r for r in reports}
    from .readiness import portable_graphs

    from ..bundle_write import changing

    with changing(bundle):
        for art in portable_graphs(bundle):
            if art.file in by_file:
                art.info[MANIFEST_KEY] = record(by_file[art.file])
    return reports


def record(report: BuildReport) -> dict[str, Any]:
    """What the manifest keeps of one build: which TensorRT-RTX built it, and what it said."""
    return {"version": report.version, "built": report.built, "layers": report.layers,
            "seconds": round(report.seconds, 2), "warnings": report.warnings}


def summary(reports: Sequence[BuildReport]) -> str:
    """A table graph x verdict, and the line that says what this check is."""
    from ..table import format_table

    rows = [[r.graph, f"{r.toolkit} {r.version}", r.verdict, str(r.layers) if r.parsed else "-", f"{r.seconds:.1f}",
             str(len(r.warnings)), str(len(r.errors))] for r in reports]
    return format_table(["graph", "real parser", "verdict", "layers", "seconds", "warnings", "errors"], rows) + \
        "\n(NVIDIA's current ONNX parser and builder, strongly typed, ahead of time on this CPU; not the TensorRT " \
        "8.5/8.6/10.3 of a Jetson, and nothing is run)"
