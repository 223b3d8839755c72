"""One graph through NVIDIA's parser and builder, every message kept: the static readiness findings
said first, the parse into a network (:func:`parse_into`), the check that the network is the CvT
classifier the bundle describes (:func:`check_io`), the build of the plan (:func:`serialize_into`).
Shared by a full build (:mod:`.builder`) and TensorRT-RTX's checks (:mod:`.rtx`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CvtDeployError
from ..util import BatchRange
from .report import BuildReport, counted
from .util import MESSAGES, dims

if TYPE_CHECKING:
    import tensorrt


def static_findings(onnx_path: Path, version: str, progress: bool) -> list[str]:
    """What the static readiness check says about this graph on this TensorRT (printed as
    warnings before parsing; the real parser decides, and a failure repeats them)."""
    from .readiness import check_readiness, release_of

    key = release_of(version)
    if key is None:
        return []
    report = check_readiness(onnx_path, key)
    errors = [str(f) for f in report.errors]
    if progress:
        for line in errors:
            print(f"warning: {line}", file=sys.stderr)
    return errors


def parse_into(report: BuildReport, parser: tensorrt.OnnxParser, network: tensorrt.INetworkDefinition,
               onnx_path: Path) -> bool:
    """Parse ``onnx_path`` into ``network``; the verdict, the layer count and every parser message
    (errors with node names and operators, warnings counted) go into ``report``."""
    start = time.perf_counter()
    with MESSAGES.capture(warnings=True) as logged:
        report.parsed = bool(parser.parse_from_file(str(onnx_path)))
    report.seconds += time.perf_counter() - start
    report.warnings += counted(logged.warnings)
    if report.parsed:
        report.layers = int(network.num_layers)
    else:
        report.errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or list(logged)
    return report.parsed


def serialize_into(report: BuildReport, builder: tensorrt.Builder, network: tensorrt.INetworkDefinition,
                   config: tensorrt.IBuilderConfig, start: float) -> tensorrt.IHostMemory | None:
    """Build the plan; the verdict, the time since ``start`` and the builder's messages go into ``report``."""
    with MESSAGES.capture(warnings=True) as logged:
        plan: tensorrt.IHostMemory | None = builder.build_serialized_network(network, config)
    report.seconds = time.perf_counter() - start
    report.warnings += counted(logged.warnings)
    report.built = plan is not None
    if plan is None:
        report.errors = counted(logged) or ["the builder returned no engine and logged no error"]
    return plan


def _parser_error(err: tensorrt.ParserError) -> str:
    where = f"node {err.node()}" if err.node() >= 0 else "graph"
    # node_name / node_operator exist from TensorRT 10 on only.
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where += f" {name!r}" if name else ""
    where += f" ({op})" if op else ""
    return f"{where}: {err.desc()} [{err.code()}]"


def check_io(network: tensorrt.INetworkDefinition, onnx_path: Path, input_name: str | None,
             chw: tuple[int, int, int], batch: BatchRange) -> str:
    """The image input's name, after checking the graph is one NCHW image in, one tensor out."""
    fix = "re-export the bundle with cvt-export (one NCHW image input, one logits output)"
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    if len(ins) != 1 or network.num_outputs != 1:
        raise CvtDeployError(f"{onnx_path.name} has {len(ins)} inputs and {network.num_outputs} outputs; a CvT "
                             "classifier graph has one of each", fix)
    tensor = ins[0]
    if input_name and tensor.name != input_name:
        raise CvtDeployError(f"{onnx_path.name}'s input is {tensor.name!r}, but the bundle says {input_name!r}", fix)
    shape = dims(tensor.shape)
    if len(shape) != 4 or any(s not in (-1, want) for s, want in zip(shape[1:], chw)):
        raise CvtDeployError(f"{onnx_path.name}'s input {tensor.name!r} has shape {shape}; expected (N, {chw[0]}, "
                             f"{chw[1]}, {chw[2]}) for this model", fix)
    if shape[0] != -1 and not batch.min == batch.max == shape[0]:
        raise CvtDeployError(f"{onnx_path.name} has a fixed batch of {shape[0]}, but the engine should take batches "
                             f"{batch.min}..{batch.max}",
                             "re-export with a dynamic batch (cvt-export --batch-range 1:8:32) or the same fixed --batch-range")
    return tensor.name
