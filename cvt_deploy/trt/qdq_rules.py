"""The explicit-quantization rules of the readiness check: each QuantizeLinear/DequantizeLinear
against TensorRT's developer guide ('Explicit Quantization') and the release's Q/DQ importer.

* qdq-scale / qdq-zero-point / qdq-type: constant positive scales, symmetric int8 (zero point 0);
* qdq-scale-type: 8.x reads every constant scale as float32, so only FP32 scales import; and
  a strongly typed TensorRT 10 network takes a QuantizeLinear of opset >= 19 with its input
  and scale as written, which must then share one type;
* qdq-pair / qdq-consumer: every Q followed by DQ only, every DQ feeding an op TensorRT fuses;
* per-channel scales: only on weights (qdq-per-channel) of Conv/ConvTranspose/Gemm or a MatMul
  (2-D on 8.x), with an explicit axis that is the consumer's output-channel axis (qdq-axis)
  and one scale per channel of it (qdq-scale-count).
"""
from __future__ import annotations

from typing import Any, Callable

from .parser_facts import GUIDE_8, GUIDE_10, Finding, Graph, attr, note_of

# Ops TensorRT fuses a DequantizeLinear into (as its quantized input) or propagates Q/DQ through.
QUANTIZABLE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool", "MaxPool",
                         "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                         "Relu", "LeakyRelu", "Sigmoid", "Resize"})
PER_CHANNEL_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def check_qdq(node: Any, g: Graph, version: str, where: str, add: Callable[[Finding], None]) -> None:
    """Every rule above for one QuantizeLinear/DequantizeLinear ``node``."""
    import numpy as np

    guide = GUIDE_10 if version == "10" else GUIDE_8
    op = node.op_type
    scale_name = node.input[1] if len(node.input) > 1 else ""
    scale = g.value(scale_name) if scale_name else None
    if scale is None:
        add(Finding(version, where, op, "qdq-scale", f"scale {scale_name!r} is not a constant; TensorRT needs "
                    "build-time scales", guide))
    elif not (np.isfinite(scale).all() and (scale > 0).all()):
        add(Finding(version, where, op, "qdq-scale", "scale has values that are not finite and positive", guide))
    _check_scale_type(node, g, version, where, add)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = g.value(zp_name) if zp_name else None
    # Without a zero point, QuantizeLinear writes UINT8 (the ONNX default).
    int_type = g.type_name(zp_name) if zp_name else ("UINT8" if op == "QuantizeLinear" else g.type_name(node.input[0]))
    if not zp_name and version != "10":
        add(Finding(version, where, op, "qdq-zero-point", f"no zero point input: the {version} importer needs all "
                    "three inputs (x, scale, zero point 0)", note_of(version, "QuantizeLinear")))
    if zp_name and zp is None:
        add(Finding(version, where, op, "qdq-zero-point", f"zero point {zp_name!r} is not a constant", guide))
    elif zp is not None and np.any(zp != 0):
        add(Finding(version, where, op, "qdq-zero-point", f"zero point {np.unique(zp)[:4].tolist()} is not 0: "
                    "TensorRT quantizes symmetrically (zero point 0 only)", guide))
    if int_type and int_type != "INT8" and not (version == "10" and int_type in ("FP8", "INT4")):
        add(Finding(version, where, op, "qdq-type", f"quantized type {int_type}; TensorRT {version} takes INT8"
                    + (" (and FP8/INT4)" if version == "10" else ""), guide))
    users = g.consumers.get(node.output[0], [])
    if op == "QuantizeLinear":
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            add(Finding(version, where, op, "qdq-pair", "a QuantizeLinear must be followed by DequantizeLinear only",
                        guide))
    elif not any(u.op_type in QUANTIZABLE for u in users):
        add(Finding(version, where, op, "qdq-consumer", "this DequantizeLinear feeds "
                    + (", ".join(sorted({u.op_type for u in users})) or "nothing")
                    + ", no op TensorRT runs quantized: the Q/DQ pair only costs time", guide))
    if scale is not None and scale.size > 1:
        axis = _check_axis_and_count(node, g, version, where, scale, add)
        if op == "DequantizeLinear":
            _check_per_channel_weight(node, g, version, where, axis, add)


def _check_scale_type(node: Any, g: Graph, version: str, where: str, add: Callable[[Finding], None]) -> None:
    op, x = node.op_type, node.input[0]
    scale_name = node.input[1] if len(node.input) > 1 else ""
    t_scale = g.type_name(scale_name) if scale_name in g.tensors else None
    if version != "10" and t_scale and t_scale not in ("FP32", "FP64"):  # 8.x narrows FP64 weights to FP32
        add(Finding(version, where, op, "qdq-scale-type", f"scale {scale_name!r} is {t_scale}: TensorRT {version} "
                    f"reads Q/DQ scales as float32 whatever their type, so these {t_scale} values are misread; write "
                    "FP32 scales (FP16 scales, as in the int8+fp16 graph, are for TensorRT 10)",
                    note_of(version, op, "float32")))
    t_x = g.type_name(x)
    if version == "10" and op == "QuantizeLinear" and g.opset >= 19 and t_x and t_scale and t_x != t_scale:
        add(Finding(version, where, op, "qdq-scale-type", f"input {x!r} is {t_x} and its scale {t_scale}: from "
                    f"opset 19 (this graph: opset {g.opset}) the importer no longer casts the scale to the input's "
                    "type, and the Quantize layer of a strongly typed network takes one type for both; write the "
                    f"scale as {t_x}", note_of(version, op, "strongly typed")))


def _output_axis(user: Any, weight: str, g: Graph) -> tuple[int, str] | None:
    """The axis of ``weight`` that indexes ``user``'s output channels, and the weight's layout;
    None where the weight is not the operand TensorRT scales per channel."""
    if len(user.input) < 2 or user.input[1] != weight:
        return None
    if user.op_type == "Conv":
        return 0, "[C_out, C_in/group, k...]"
    if user.op_type == "ConvTranspose":
        # ONNX writes ConvTranspose weights [C_in, C_out/group, k...]: the importer's own comment
        # ("Weights order is CKRS") and its output count, dim[1] * group, read them so.
        return 1, "[C_in, C_out/group, k...]"
    if user.op_type == "MatMul":
        rank = g.ranks.get(weight, 2)
        return rank - 1, "[..., K, N]"
    if user.op_type == "Gemm":
        return (0, "B = [N, K] (transB=1)") if attr(user, "transB", 0) else (1, "B = [K, N] (transB=0)")
    return None


def _check_axis_and_count(node: Any, g: Graph, version: str, where: str, scale: Any,
                          add: Callable[[Finding], None]) -> int | None:
    """The explicit axis (made non-negative), or None where the node leaves it to the default."""
    op, x = node.op_type, node.input[0]
    axis = attr(node, "axis")
    if axis is None:
        # No count check against the default: this finding already says the importer reads axis 0.
        add(Finding(version, where, op, "qdq-axis", "per-channel scales without an explicit axis: ONNX means axis 1, "
                    "the importer takes axis 0", note_of(version, op, "`axis` omitted")))
        return None
    dims = g.shapes.get(x)
    axis = axis + len(dims) if dims is not None and axis < 0 else axis
    blocked = version == "10" and dims is not None and scale.ndim == len(dims) > 1  # 10.x block quantization
    if dims is not None and 0 <= axis < len(dims) and dims[axis] is not None and not blocked \
            and scale.size != dims[axis]:
        add(Finding(version, where, op, "qdq-scale-count", f"{scale.size} scales for {x!r}, whose dim[{axis}] = "
                    f"{dims[axis]}: per-channel quantization takes one scale per channel of the axis",
                    note_of(version, op, "dim[axis]")))
    return int(axis)


def _check_per_channel_weight(node: Any, g: Graph, version: str, where: str, axis: int | None,
                              add: Callable[[Finding], None]) -> None:
    guide = GUIDE_10 if version == "10" else GUIDE_8
    op = node.op_type
    if not g.is_weight(node.output[0]):
        add(Finding(version, where, op, "qdq-per-channel", "per-channel scales on an activation; TensorRT takes them "
                    "for weights only", guide))
        return
    for user in g.consumers.get(node.output[0], []):
        expected = _output_axis(user, node.output[0], g)
        if axis is not None and expected is not None and axis != expected[0]:
            add(Finding(version, where, op, "qdq-axis", f"per-channel scales on axis {axis} of the weight of "
                        f"{user.op_type} {user.name!r}, laid out {expected[1]}: TensorRT scales the output channels, "
                        f"axis {expected[0]}", guide))
        if user.op_type in PER_CHANNEL_OPS:
            continue
        if user.op_type == "MatMul":
            ranks = [g.ranks.get(i) for i in user.input]
            if version == "10" or all(r == 2 for r in ranks):
                continue
            add(Finding(version, where, op, "qdq-per-channel", f"per-channel weights on MatMul {user.name!r} whose "
                        f"inputs have ranks {ranks}; TensorRT 8.x takes them on a MatMul only when both inputs are "
                        "2-D (write the token MatMul as a 2-D GEMM)", guide))
        else:
            add(Finding(version, where, op, "qdq-per-channel", f"per-channel weights feeding {user.op_type} "
                        f"{user.name!r}; TensorRT takes them for Conv, ConvTranspose, Gemm and 2-D MatMul", guide))
