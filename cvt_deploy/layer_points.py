"""The points where ``cvt-check --layers`` compares two graphs of a bundle (cvt_deploy.layers),
found by ONNX node name, which every graph of a bundle keeps for the nodes it does not fuse.

Each named weighted layer (export/names.py: the PyTorch module it computes) is compared at the
module's output: a Linear's bias Add (in a Q/DQ graph, an Add on a 2-D view of the tokens; it is
compared image by image all the same), a Conv's own output. Each transformer block
(``stageS.blocks.B``) is compared at its output, the residual Add that reads its ``mlp.fc2``;
and the logits at the graph output. ``mode="all"`` adds the weighted nodes without a module
(the attention MatMuls of two activations). A candidate's point is the node of the same name
when it is still the same op (and adds the same bias): what a candidate fused or renamed is
skipped, never compared with something else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import CvtDeployError
from .export.names import WEIGHTED, module_names

MODES = ("named", "all")  # named: modules, blocks, logits; all: every weighted node too


@dataclass(frozen=True)
class Probe:
    """One compared point of the network, found in the fp32 graph.

    ``kind``: the weighted op (Conv, MatMul, Gemm), ``block`` (a transformer block's output: the
    residual Add after its MLP) or ``logits`` (the graph output). ``node`` is the ONNX node the
    row is named by (the weighted node, the residual Add); ``compared`` the node whose output is
    compared (the bias Add after a Linear: the module's output); ``bias`` that Add's bias."""

    kind: str
    module: str
    node: str
    compared: str = ""
    bias: str = ""
    op: str = ""  # the op of ``compared`` in the fp32 graph: a candidate's node of that name must be one too


def probes(model: Any, mode: str = "named") -> list[Probe]:
    """The points of the fp32 graph ``model`` to compare, in graph order."""
    check_mode(mode)
    g = PointGraph(model)
    modules = module_names(model)
    out: list[Probe] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED or not node.name:
            continue
        module = modules.get(node.name, "")
        if not module and mode == "named":
            continue
        add, bias = g.bias_add(node.output[0])
        out.append(Probe(node.op_type, module, node.name, add.name if add is not None else node.name, bias,
                         "Add" if add is not None else node.op_type))
        if module.endswith(".mlp.fc2"):  # a block ends at the residual Add after its MLP
            res = g.residual_add(add.output[0] if add is not None else node.output[0])
            if res is not None and res.name:
                out.append(Probe("block", module[: -len(".mlp.fc2")], res.name, res.name, op="Add"))
    out.append(Probe("logits", "", model.graph.output[0].name))
    return out


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise CvtDeployError(f"layer mode {mode!r} is not one of {', '.join(MODES)}",
                             "use named (modules, blocks, logits) or all (every weighted node too)")


class PointGraph:
    """Who produces and who reads each tensor of an ONNX graph, and what parameter feeds it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.params = {i.name for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.consumers: dict[str, list[Any]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def param(self, tensor: str) -> str | None:
        """The initializer behind ``tensor``: itself, or what a DequantizeLinear/Cast reads."""
        for _ in range(4):
            if tensor in self.params:
                return tensor
            node = self.producer.get(tensor)
            if node is None or node.op_type not in ("DequantizeLinear", "Cast"):
                return None
            tensor = node.input[0]
        return None

    def bias_add(self, tensor: str) -> tuple[Any, str]:
        """The Add of a ``*.bias`` parameter that reads ``tensor`` (maybe through a Reshape), and that bias."""
        users = self.consumers.get(tensor, [])
        for user in users + [u for r in users if r.op_type == "Reshape" for u in self.consumers.get(r.output[0], [])]:
            if user.op_type == "Add":
                bias = next((p for p in map(self.param, user.input) if p and p.endswith(".bias")), None)
                if bias:
                    return user, bias
        return None, ""

    def residual_add(self, tensor: str) -> Any:
        """The Add of two activations that reads ``tensor``, through Reshapes."""
        for _ in range(3):
            users = self.consumers.get(tensor, [])
            add = next((u for u in users if u.op_type == "Add" and not any(map(self.param, u.input))), None)
            if add is not None:
                return add
            reshape = next((u for u in users if u.op_type == "Reshape"), None)
            if reshape is None:
                return None
            tensor = reshape.output[0]
        return None

    def locate(self, probe: Probe) -> tuple[str, str]:
        """(tensor, '') for ``probe`` in this graph, or ('', why not)."""
        if probe.kind == "logits":
            return self.model.graph.output[0].name, ""
        node = self.nodes.get(probe.compared)
        what = probe.compared if probe.compared == probe.node else f"{probe.compared} (its bias Add)"
        if node is None:
            return "", f"no {what} in the candidate: fused or renamed"
        if node.op_type != probe.op:
            return "", f"{what} is a {node.op_type} in the candidate, a {probe.op} in fp32"
        if probe.bias and probe.bias not in map(self.param, node.input):
            return "", f"{what} adds no {probe.bias} in the candidate"
        return node.output[0], ""
