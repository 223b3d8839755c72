"""Reduced precision that lives in the ONNX graph: ``convert_fp16`` and ``quantize_int8``.

TensorRT >= 10 builds strongly typed networks exactly as the graph says, and TensorRT 11 has
no other way (no FP16/INT8 builder flags, no calibrators). So the precision is decided here,
where it can be measured on the CPU before any GPU sees the model:

* fp16: weights and activations in float16, with LayerNormalization and Softmax (the ops
  that overflow or lose accuracy in fp16 in vision transformers) kept in float32 behind
  Casts, and float32 graph inputs/outputs. The mechanics are ONNX Runtime's own converter
  (``onnxruntime.transformers.float16`` through ``OnnxModel``).
* int8: explicit quantization, QuantizeLinear/DequantizeLinear pairs placed the way
  TensorRT wants them: symmetric int8, zero point 0 everywhere, per-channel weights, on the
  inputs of Conv/MatMul/Gemm only. LayerNormalization, Softmax, GELU and the residual Adds
  stay float (TensorRT fuses the DQ into the consumer and the Q into the producer's epilogue).
  Calibration (activation ranges) is ONNX Runtime's ``quantize_static``; its result can be
  cached and reused, keyed by the fp32 graph, the calibration batch and the method.

Both outputs are checked with ``onnx.checker`` and run in ONNX Runtime (CPU) at batches
1, 3 and 8 before they are kept; a failed conversion leaves ``dst`` untouched.

Measurements behind the defaults are in the comments next to them (2-core CPU, ONNX Runtime
1.32, onnx 1.23; "demo" = the bundled CvT-tiny digits model on its 360 held-out images,
"CvT-13" = random weights on 66 real photographs (scikit-image samples and LFW faces).
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..errors import CvtDeployError
from .onnx import trial_run

# What the precision stages share: loading the fp32 source, quieting the converters, and the
# check every output passes (onnx.checker, then a run at these batch sizes).
CHECK_BATCHES = (1, 3, 8)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's converters print to stdout and log warnings on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _load(src: Path) -> Any:
    import onnx

    if not src.is_file():
        raise CvtDeployError(f"ONNX graph {str(src)!r} does not exist", "export the fp32 graph first (cvt-export)")
    try:
        return onnx.load(str(src))
    except Exception as e:
        raise CvtDeployError(f"{src} is not a readable ONNX file (truncated or corrupt?): {str(e)[:200]}",
                             "re-export it with cvt-export") from None


def _check_fp32_source(model: Any, src: Path) -> None:
    """Refuse graphs that are already reduced precision: converting twice compounds errors."""
    from onnx import TensorProto

    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}:
        raise CvtDeployError(f"{src} is already quantized (it has Q/DQ or integer ops)",
                             "pass the fp32 graph (model.onnx of the bundle)")
    types = {i.data_type for i in model.graph.initializer}
    inputs = [i.type.tensor_type.elem_type for i in model.graph.input]
    if TensorProto.FLOAT16 in types or TensorProto.FLOAT16 in inputs or TensorProto.FLOAT not in inputs:
        raise CvtDeployError(f"{src} is not an fp32 graph (its inputs or weights are not float32)",
                             "pass the fp32 graph (model.onnx of the bundle)")


def _input_dims(model: Any) -> tuple[int | None, tuple[int, ...]]:
    """(fixed batch or None if dynamic, (C, H, W)) of the graph's first input."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return batch, tuple(int(d.dim_value) for d in dims[1:])


def _verify(path: Path, what: str, chw: tuple[int, ...], fixed_batch: int | None) -> None:
    """onnx.checker plus a run in ONNX Runtime CPU at several batch sizes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise CvtDeployError(f"the {what} graph fails onnx.checker: {str(e)[:300]}",
                             "report this with the fp32 graph that caused it") from None
    trial_run(path, what, chw, [fixed_batch] if fixed_batch else CHECK_BATCHES,
              "report this with the fp32 graph that caused it")


def _node_precisions(model: Any) -> dict[str, int]:
    """How many compute nodes produce fp16 / fp32 / int8 tensors, and how many Casts there are."""
    import onnx
    from onnx import TensorProto

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # > 2 GB or unknown ops: counts are informative only
        inferred = model
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    names = {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32", TensorProto.INT8: "int8"}
    counts: Counter[str] = Counter()
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            counts["cast"] += 1
            continue
        t = types.get(node.output[0]) if node.output else None
        counts[names.get(t, "other") if t is not None else "other"] += 1
    return {f"nodes_{k}": counts.get(k, 0) for k in ("fp16", "fp32", "int8", "other", "cast")}


def _drop_unread(model: Any, op_types: tuple[str, ...]) -> None:
    """Remove the nodes of ``op_types`` whose output nobody reads (repeatedly), then the
    initializers nobody reads: what a rewrite that rerouted their consumers leaves behind."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in op_types and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
