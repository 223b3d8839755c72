"""``convert_fp16``: an fp16 graph with LayerNorm/Softmax kept fp32 and fp32 inputs/outputs
(see :mod:`cvt_deploy.export.precision` for why precision lives in the graph)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import CvtDeployError, require
from ..util import atomic_output, encode_metadata
from .onnx import save_graph, set_metadata_props
from .precision import _check_fp32_source, _drop_unread, _input_dims, _load, _node_precisions, _quiet, _verify

#
# Block list chosen by measurement. fp16 vs fp32 logits (top-1 agreement / mean cosine /
# max |diff|), ONNX Runtime CPU:
#
#                                      demo (360 test)        CvT-13 random (66 photos)
#   nothing blocked                    100%  1.000000 2.5e-3   98.5%  1.000000 1.7e-3
#   LayerNorm                          100%  1.000000 3.3e-3   98.5%  1.000000 1.7e-3
#   LayerNorm + Softmax (default)      100%  1.000000 3.2e-3   98.5%  1.000000 1.5e-3
#   + the MatMul/Mul feeding Softmax   100%  1.000000 4.8e-3   98.5%  1.000000 1.5e-3
#   + the residual Adds feeding LN     100%  1.000000 4.8e-3   98.5%  1.000000 1.5e-3
#   (CvT-13 with LayerNorm/BatchNorm/Linear weights randomised to order-1 activations:
#    100% agreement and max |diff| 3.0e-3 to 3.5e-3 for every row.)
#   (the 98.5% is one photo whose top two CvT-13 logits are 5e-4 apart in fp32.)
#
# No row is measurably better on this CPU: ONNX Runtime's CPU provider has few fp16
# kernels and computes most fp16 nodes in fp32 behind Casts it inserts itself (the CvT-13
# fp16 graph holds 86 Casts, its optimised session 228), so what the CPU shows is fp16
# *storage* rounding and overflow, not fp16 arithmetic as a GPU does it. The
# largest activations measured in fp32 are far from fp16's 65504: Softmax inputs <= 19,
# q@k^T <= 135, LayerNorm inputs <= 22 with (x - mean)^2 <= 463 (demo; CvT-13 random:
# 13, 28, 159). So the default keeps exactly what fp16 *arithmetic* is known to break in
# transformers and what TensorRT warns about ("layernorm in FP16 may overflow"): the
# LayerNormalization (x^2 of the variance) and Softmax (exp and the row sum) nodes. Keeping
# also the q@k^T MatMul in fp32 costs 16-26 more Casts and an fp32 attention GEMM with no
# measured benefit; when a real checkpoint needs more, pass more op types in keep_fp32_ops
# or single nodes (by name) in keep_fp32_nodes.
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")


def _drop_initializer_value_info(model: Any) -> None:
    """Remove value_info entries that restate an initializer's type.

    torch's exporter writes them; the fp16 converter retypes every float value_info to
    fp16, including those of the initializers it keeps fp32 (LayerNorm scale and bias),
    which strict shape inference (onnx.checker full_check) then rejects.
    """
    names = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                 keep_fp32_ops: Sequence[str] = DEFAULT_FP32_OPS, keep_io_fp32: bool = True,
                 keep_fp32_nodes: Sequence[str] = (), metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write an fp16 copy of the fp32 graph ``src`` to ``dst``; return what was done.

    ``keep_fp32_ops``: op types computed in fp32 (Casts around them). ``keep_fp32_nodes``:
    node names also kept fp32. ``keep_io_fp32``: graph inputs/outputs stay float32 (Casts
    at the boundary), so callers feed and read the same arrays as for the fp32 graph.
    The result has the ``cvt_deploy.precision`` metadata set to ``fp16``; ``metadata``:
    further ``metadata_props`` entries to write with it (the graph is written once).
    """
    require("onnx", "onnx", "FP16 conversion")
    require("onnxruntime", "onnx", "FP16 conversion")
    src, dst = Path(src), Path(dst)
    model = _load(src)
    _check_fp32_source(model, src)
    fixed_batch, chw = _input_dims(model)
    present = Counter(n.op_type for n in model.graph.node)

    model = _to_fp16(model, src, keep_fp32_ops, keep_fp32_nodes, keep_io_fp32)
    info: dict[str, Any] = {
        "precision": "fp16",
        "converter": "onnxruntime.transformers.float16",
        "fp32_ops": [op for op in keep_fp32_ops],
        "fp32_ops_present": {op: present[op] for op in keep_fp32_ops if present[op]},
        "fp32_nodes": list(keep_fp32_nodes),
        "io": "fp32" if keep_io_fp32 else "fp16",
    }
    info.update(_node_precisions(model))
    set_metadata_props(model, {**encode_metadata({"precision": "fp16", "conversion": info}), **(metadata or {})})
    with atomic_output(dst) as tmp:
        save_graph(model, tmp)
        _verify(tmp, "fp16", chw, fixed_batch)
    return info


def _to_fp16(model: Any, src: Path, keep_fp32_ops: Sequence[str], keep_fp32_nodes: Sequence[str],
             keep_io_fp32: bool = True) -> Any:
    """ONNX Runtime's float16 converter with ``keep_fp32_ops`` / ``keep_fp32_nodes`` behind Casts."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # ORT's default list holds ops with no fp16 kernels at all (TopK, Range, ...); keep it.
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    # Without this the converter retypes the value_info of the initializers it keeps fp32
    # (LayerNorm scale/bias) and then "casts" them float -> float: 60 no-op Casts on CvT-13.
    _drop_initializer_value_info(model)
    wrapped = OnnxModel(model)
    try:
        with _quiet():
            wrapped.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=bool(keep_io_fp32),
                                             op_block_list=block, node_block_list=list(keep_fp32_nodes))
            wrapped.topological_sort()
    except Exception as e:
        raise CvtDeployError(f"fp16 conversion of {src} failed: {type(e).__name__}: {str(e)[:300]}",
                             "report this with the fp32 graph; meanwhile use the fp32 graph") from None
    return wrapped.model


#: Q/DQ with float16 scales (so DequantizeLinear writes fp16 and QuantizeLinear reads it) is opset 19.
INT8_FP16_OPSET = 19


def convert_int8_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                      keep_fp32_ops: Sequence[str] = DEFAULT_FP32_OPS, keep_fp32_nodes: Sequence[str] = (),
                      metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the Q/DQ int8 graph ``src`` with everything outside Q/DQ in fp16 (``keep_fp32_ops`` and
    ``keep_fp32_nodes`` in fp32) to ``dst``: the int8 graph for strongly typed TensorRT (>= 10).

    A strongly typed network runs what lies outside the Q/DQ pairs in the graph's own type, so
    the fp32 Q/DQ graph runs LayerNorm, Softmax, GELU, residuals and the attention MatMuls in fp32
    there. Here the scales are fp16 (opset 19), so DequantizeLinear hands fp16 straight to the
    int8 GEMMs and QuantizeLinear reads fp16, with no Casts between; inputs and outputs stay fp32.
    """
    require("onnx", "onnx", "the int8+fp16 graph")
    require("onnxruntime", "onnx", "the int8+fp16 graph")
    from onnx import version_converter

    src, dst = Path(src), Path(dst)
    model = _load(src)
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        raise CvtDeployError(f"{src} has no Q/DQ nodes", "pass the int8 graph (model.int8.onnx of the bundle)")
    fixed_batch, chw = _input_dims(model)
    try:
        model = version_converter.convert_version(model, INT8_FP16_OPSET)
    except Exception as e:
        raise CvtDeployError(f"{src} cannot be converted to opset {INT8_FP16_OPSET}: {str(e)[:300]}",
                             "report this with the int8 graph; the fp32 Q/DQ graph still builds on TensorRT") from None
    model = _to_fp16(model, src, [*keep_fp32_ops, "QuantizeLinear", "DequantizeLinear"], keep_fp32_nodes)
    moved = _fp16_scales(model)
    info: dict[str, Any] = {"precision": "int8", "float": "fp16", "opset": INT8_FP16_OPSET,
                            "converter": "onnxruntime.transformers.float16", "fp32_ops": list(keep_fp32_ops),
                            "fp32_nodes": list(keep_fp32_nodes), "fp16_scales": moved, "io": "fp32"}
    info.update(_node_precisions(model))
    set_metadata_props(model, {**encode_metadata({"precision": "int8", "conversion": info}), **(metadata or {})})
    with atomic_output(dst) as tmp:
        save_graph(model, tmp)
        _verify(tmp, "int8+fp16", chw, fixed_batch)
    return info


def _fp16_scales(model: Any) -> int:
    """Give each Q/DQ that the converter wrapped in Casts fp16 scales and drop those Casts;
    returns how many Q/DQ nodes now read or write fp16 directly."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    half: dict[str, str] = {}

    def to(node: Any) -> Any:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)

    def fp16_scale(name: str) -> str:
        if name not in half:  # a Q and its DQ share one scale: one fp16 copy for both
            half[name] = f"{name}_fp16"
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16),
                                                         half[name]))
        return half[name]

    moved = 0
    for node in list(g.node):
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "DequantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "Cast" or to(u) != TensorProto.FLOAT16 for u in users):
                continue
            node.input[1] = fp16_scale(node.input[1])
            for cast in users:
                for user in consumers.get(cast.output[0], []):
                    user.input[:] = [node.output[0] if i == cast.output[0] else i for i in user.input]
            moved += 1
        elif node.op_type == "QuantizeLinear":
            cast = producer.get(node.input[0])
            if cast is None or cast.op_type != "Cast" or to(cast) != TensorProto.FLOAT:
                continue
            node.input[0], node.input[1] = cast.input[0], fp16_scale(node.input[1])
            moved += 1
    _drop_unread(model, ("Cast",))  # and then the fp32 scales
    del g.value_info[:]  # the converter's types of the removed Casts' tensors; re-inferred on load
    OnnxModel(model).topological_sort()
    return moved
