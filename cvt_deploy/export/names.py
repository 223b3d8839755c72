"""Which PyTorch module each weighted node of an exported graph computes.

Users know their model by its ``state_dict`` names (``stage2.blocks.3.attn.proj``); tools speak
of ONNX nodes (``node_MatMul_127``). The export keeps the parameter names of biases and
convolution weights as initializer names, and every graph of a bundle (fp32, fp16, int8 Q/DQ,
int8+fp16, ONNX Runtime CPU) keeps the node names of the fp32 graph for its weighted nodes, so
one mapping, read from any of them, names a layer the same way in all of them.

A Conv names its module by its weight or bias (through a DequantizeLinear in a Q/DQ graph); a
MatMul or Gemm by the ``*.bias`` initializer its output is added to (the torch exporter folds a
Linear's transposed weight into an anonymous constant, but keeps the bias name). A weighted node
without such a name (an attention MatMul of two activations, a Linear without bias) keeps its
node name only.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence

from ..errors import CvtDeployError

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_SUFFIXES = (".weight_quantized", ".bias_quantized", ".weight", ".bias")


def _module(param: str) -> str | None:
    for suffix in _SUFFIXES:
        if param.endswith(suffix):
            return param[: -len(suffix)]
    return None


def module_names(model: Any) -> dict[str, str]:
    """Node name -> module name for every weighted node that carries one (an ONNX ModelProto)."""
    graph = model.graph
    params = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def param_name(tensor: str) -> str | None:
        """The parameter behind ``tensor``: itself, or what a DequantizeLinear/Cast/Transpose reads."""
        for _ in range(4):
            if tensor in params:
                return tensor
            node = producer.get(tensor)
            if node is None or node.op_type not in ("DequantizeLinear", "Cast", "Transpose", "Reshape"):
                return None
            tensor = node.input[0]
        return None

    out: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED or not node.name:
            continue
        found = [m for m in (_module(p) for p in map(param_name, node.input[1:]) if p) if m]
        if not found:  # a Linear: the bias added to its output (maybe through a 3-D reshape back)
            for user in consumers.get(node.output[0], []):
                chain = [user, *consumers.get(user.output[0], [])] if user.op_type == "Reshape" else [user]
                found += [m for u in chain if u.op_type == "Add"
                          for p in map(param_name, u.input) if p and p.endswith(".bias") for m in [_module(p)] if m]
        name = next((m for m in found if m), None)
        if name:
            out[node.name] = name
    return out


def resolve(model: Any, names: Iterable[str], what: str = "--int8-keep-float") -> list[str]:
    """The weighted node names that ``names`` mean: a node name, a module name, or a module prefix
    (``stage2.blocks.3`` takes every weighted node inside that block). An unknown name is refused
    by name, with the closest known names."""
    modules = module_names(model)
    nodes = [n.name for n in model.graph.node if n.op_type in WEIGHTED and n.name]
    chosen: list[str] = []
    unknown: list[str] = []
    for name in names:
        hits = [n for n in nodes if n == name or modules.get(n) == name or modules.get(n, "").startswith(name + ".")]
        (chosen.extend(hits) if hits else unknown.append(name))
    if unknown:
        known = sorted(set(modules.values())) + nodes
        close = {u: difflib.get_close_matches(u, known, n=3) for u in unknown}
        raise CvtDeployError(f"{what}: {', '.join(repr(u) for u in unknown)} "
                             f"{'is' if len(unknown) == 1 else 'are'} no layer of this model"
                             + "".join(f"; close to {repr(u)}: {', '.join(c)}" for u, c in close.items() if c),
                             "name a module (stage2.blocks.3.attn.proj, or a prefix such as stage2.blocks.3) or an ONNX "
                             "node (node_MatMul_127); cvt-check --layers lists them")
    return list(dict.fromkeys(chosen))


def describe(node: str, modules: dict[str, str]) -> str:
    """``stage2.blocks.3.attn.proj (node_MatMul_127)``, or the node name alone."""
    return f"{modules[node]} ({node})" if node in modules else node


def layer_table(model: Any) -> Sequence[tuple[str, str, str]]:
    """(node, op, module or '') of every weighted node, in graph order."""
    modules = module_names(model)
    return [(n.name, n.op_type, modules.get(n.name, "")) for n in model.graph.node if n.op_type in WEIGHTED and n.name]
