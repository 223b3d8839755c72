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
from .precision import _check_fp32_source, _input_dims, _load, _node_precisions, _quiet, _verify

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
    model = wrapped.model
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
