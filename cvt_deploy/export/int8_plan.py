"""``plan_int8``: which weighted layers an int8 export leaves float, and how every int8 graph of
a bundle follows that plan.

A plan is a list of node names of the fp32 graph (``model.onnx``). Every int8 graph of a bundle
keeps those names for its weighted nodes (:mod:`cvt_deploy.export.names`), so one list serves
them all:

* ``model.int8.onnx`` (Q/DQ, :func:`cvt_deploy.export.int8.quantize_int8`): the planned nodes
  are excluded from ONNX Runtime's quantizer and read their float input and weight, with no
  Q/DQ pair (:func:`float_consumers`);
* ``model.int8-fp16.onnx``: derived from that graph, so the planned nodes are fp16 there, as
  everything outside Q/DQ is in that graph;
* ``model.ort-cpu.int8.onnx`` (dynamic quantization): the same nodes are excluded;
* the OpenVINO int8 IR: converted from ``model.int8.onnx``, it follows.

Calibration does not depend on the plan: the ranges of every quantizable tensor are measured
(and cached) once, whatever is kept float, so one cache serves every plan.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import CvtDeployError

FLAG = "--int8-keep-float"


@dataclass(frozen=True)
class Int8Plan:
    """``keep_float``: the names as given (modules, module prefixes, node names); ``nodes``: the
    weighted nodes they resolve to, in graph order; ``modules``: node -> module name (where known)."""

    keep_float: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    modules: dict[str, str] = field(default_factory=dict)
    auto: dict[str, Any] | None = None  # how ``auto`` chose (export/int8_auto.py), None for a plan named in full

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records on each int8 artifact (``info["int8_plan"]``)."""
        return {"keep_float": list(self.keep_float), "nodes": list(self.nodes), "modules": dict(self.modules),
                **({"auto": self.auto} if self.auto is not None else {})}

    def recorded(self) -> dict[str, Any]:
        """``{"int8_plan": ...}`` for an int8 artifact's info; {} when nothing is kept float by name or by ``auto``."""
        return {"int8_plan": self.to_dict()} if self.nodes or self.auto is not None else {}

    def describe(self, most: int = 8) -> str:
        """``keeping 2 layers float: head (node_linear_36), node_matmul_3`` (the first ``most``
        of them); '' for an empty plan."""
        from .names import describe

        if not self.nodes:
            return ""
        shown = [describe(n, self.modules) for n in self.nodes[:most]]
        more = f" and {len(self.nodes) - most} more (the manifest lists them)" if len(self.nodes) > most else ""
        return f"keeping {len(self.nodes)} layer{'s' if len(self.nodes) != 1 else ''} float: {', '.join(shown)}{more}"


def check_keep_float(names: Any) -> tuple[str, ...]:
    """``names`` as a tuple of non-empty names (a str is a comma list), else an error: what can
    be refused before the fp32 graph exists to resolve them against."""
    if isinstance(names, str):
        names = names.split(",")
    if not isinstance(names, Iterable):
        raise CvtDeployError(f"{FLAG}: {names!r} is not a list of layer names",
                             "pass module or node names, e.g. ('stage2.blocks.1.attn.proj', 'head')")
    out = []
    for name in names:
        if not isinstance(name, str):
            raise CvtDeployError(f"{FLAG}: {name!r} is not a layer name", "pass module or node names as strings")
        if not name.strip() or name != name.strip() or "," in name:
            raise CvtDeployError(f"{FLAG}: {name!r} is no layer name (empty, blank or with spaces around it)",
                                 "name modules (stage2.blocks.1.attn.proj, or a prefix: stage2.blocks.1) or ONNX "
                                 "nodes (node_MatMul_127), as a comma list or repeated")
        out.append(name)
    return tuple(dict.fromkeys(out))


def plan_int8(fp32: str | os.PathLike[str] | Any, keep_float: Sequence[str] = ()) -> Int8Plan:
    """The int8 plan of an export: the weighted nodes of the fp32 graph ``fp32`` (a path or an
    ONNX ModelProto) that every int8 graph keeps float. ``keep_float``: module names, module
    prefixes (every weighted layer inside) or node names; an unknown one is refused by name, with
    the closest known names (:func:`cvt_deploy.export.names.resolve`)."""
    from .names import module_names, resolve

    keep_float = check_keep_float(keep_float)
    if not keep_float:
        return Int8Plan()
    if isinstance(fp32, (str, os.PathLike)):
        import onnx

        fp32 = onnx.load(str(Path(fp32)), load_external_data=False)
    chosen = set(resolve(fp32, keep_float, FLAG))
    nodes = tuple(n.name for n in fp32.graph.node if n.name in chosen)
    modules = module_names(fp32)
    return Int8Plan(keep_float, nodes, {n: modules[n] for n in nodes if n in modules})


def float_consumers(model: Any, quantized_ops: Sequence[str], keep_float: Sequence[str] = ()) -> None:
    """Feed ops other than ``quantized_ops``, and the ``keep_float`` nodes, from the float tensor,
    not from its Q/DQ pair; then drop the pairs nobody reads (in place).

    quantize_static reroutes *every* consumer of a tensor it quantizes for one node through the
    DequantizeLinear: the Shape node that reads the batch size for the class token, or a kept
    q projection whose k and v siblings are quantized. TensorRT should see Q/DQ only where it
    will run int8 kernels, and a layer kept float must read what fp32 reads.
    """
    from .precision import _drop_unread

    keep = set(keep_float)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or \
                (node.op_type in quantized_ops and node.name not in keep):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    _drop_unread(model, ("QuantizeLinear", "DequantizeLinear"))  # and then their scales


def qdq_counts(model: Any) -> dict[str, Any]:
    """Quantized nodes by type, and the Q/DQ node counts."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized: Counter[str] = Counter()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            for c in consumers.get(n.output[0], []):
                quantized[c.name] = 1
    by_type: Counter[str] = Counter(n.op_type for n in model.graph.node if n.name in quantized)
    ops = Counter(n.op_type for n in model.graph.node)
    return {"quantized_nodes": dict(sorted(by_type.items())), "quantize_linear": ops["QuantizeLinear"],
            "dequantize_linear": ops["DequantizeLinear"]}
