"""An int8 Q/DQ graph in node order, and the part of it that must run when chosen layers lose
their Q/DQ (``QdqGraph``): what :mod:`cvt_deploy.sensitivity` runs per layer and writes as a plan.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .errors import CvtDeployError

_CRUMB = 0.05  # at a cut, what is live besides its one activation is at most this share of it (bytes)


class QdqGraph:
    """An int8 Q/DQ graph in node order: what is constant, who produces what, the cuts, and the
    variant of each quantized layer (kept float) as the part of the graph that must run."""

    def __init__(self, model: Any, floats: dict[str, Any]) -> None:
        import onnx

        g, self.model, self.floats = model.graph, model, floats
        self.nodes, self.inits = list(g.node), {i.name: i for i in g.initializer}
        self.input, self.outputs = g.input[0].name, [o.name for o in g.output]
        self.static = set(self.inits) | {""}  # initializers and what is computed from them alone
        for n in self.nodes:
            if all(i in self.static for i in n.input):
                self.static.update(n.output)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.types = {v.name: v.type for v in (*inferred.value_info, *inferred.input, *inferred.output)}
        self.cuts = self._cuts()

    def _cuts(self) -> list[int]:
        """Node positions where what is live is one tensor and crumbs (bytes per image by shape
        inference; unknown: no crumb): position 0, the residual stream between blocks."""
        from onnx import helper

        batch = self.types[self.input].tensor_type.shape.dim[0]

        def size(t: str) -> float:
            tt = self.types[t].tensor_type if t in self.types else None
            dims = list(tt.shape.dim) if tt is not None else []
            if tt is None or not dims or dims[0] != batch or not all(d.HasField("dim_value") for d in dims[1:]):
                return math.inf
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
            return itemsize * float(np.prod([d.dim_value for d in dims[1:]]))

        last = {t: i for i, n in enumerate(self.nodes) for t in n.input if t not in self.static}
        live, cuts = {self.input}, [0]
        for p in range(1, len(self.nodes)):
            live = {t for t in (*live, *self.nodes[p - 1].output) if last.get(t, -1) >= p}
            sizes = sorted(map(size, live))
            if sizes and sum(sizes[:-1]) <= _CRUMB * sizes[-1] < math.inf:
                cuts.append(p)
        return cuts

    def float_inputs(self, index: int) -> dict[int, str]:
        """Input slot -> the float tensor it reads with the node's Q/DQ removed: an activation's
        QuantizeLinear input, a weight's fp32 initializer (added to ``self.inits``)."""
        node, out = self.nodes[index], {}
        for slot, name in enumerate(node.input):
            dq = self.nodes[self.producer[name]] if name in self.producer else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = self.nodes[self.producer[dq.input[0]]] if dq.input[0] in self.producer else None
            if q is not None and q.op_type == "QuantizeLinear":
                out[slot] = q.input[0]
            elif dq.input[0] in self.inits:
                out[slot] = self._float_weight(node.name, dq)
        return out

    def _float_weight(self, node: str, dq: Any) -> str:
        """The fp32 weight a DequantizeLinear's int8 weight was quantized from: the fp32 graph's
        initializer of that name, less ``_quantized``, which must round to the same integers."""
        from onnx import helper, numpy_helper

        base = dq.input[0].removesuffix("_quantized")
        q = numpy_helper.to_array(self.inits[dq.input[0]]).astype(np.float32)
        w = numpy_helper.to_array(self.floats[base]) if base in self.floats else None
        if w is not None and w.shape == q.shape and dq.input[1] in self.inits:
            scale = numpy_helper.to_array(self.inits[dq.input[1]]).astype(np.float32)
            if scale.size > 1:  # per channel, along the DequantizeLinear's axis (default 1)
                axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
                scale = scale.reshape([-1 if d == axis % q.ndim else 1 for d in range(q.ndim)])
            if np.abs(np.clip(np.round(w / scale), -128, 127) - q).max() <= 1:
                name = base if base not in self.inits else base + "_float"
                self.inits.setdefault(name, numpy_helper.from_array(w, name))
                self.static.add(name)
                return name
        raise CvtDeployError(f"the fp32 graph has no weight {base!r} that rounds to the int8 weight of {node}: it is "
                             "not the graph this int8 graph was quantized from",
                             "pass the fp32 graph the int8 one was made from (a bundle holds both)")

    def limit(self, index: int, inputs: dict[int, str]) -> int:
        """The latest cut a variant of node ``index`` may start from: before its Q/DQ nodes."""
        chain = [self.producer[self.nodes[index].input[s]] for s in inputs]
        chain += [self.producer[self.nodes[c].input[0]] for c in chain if self.nodes[c].input[0] in self.producer]
        return min([index, *(c for c in chain if self.nodes[c].output[0] not in self.static)])

    def suffix(self, edits: dict[int, dict[int, str]], start: int) -> tuple[list[int], list[str]]:
        """Nodes (in order) that compute the outputs from position ``start`` on, with the input
        ``edits`` (node -> slot -> tensor), and the tensors they need from before ``start``."""
        keep, frontier, todo, seen = set(), [], list(self.outputs), set()
        while todo:
            t = todo.pop()
            if t in seen or t in self.inits or t == "":
                continue
            seen.add(t)
            i = self.producer.get(t)
            if i is None or (i < start and t not in self.static):
                frontier.append(t)
                continue
            keep.add(i)
            todo += [edits.get(i, {}).get(s, x) for s, x in enumerate(self.nodes[i].input)]
        return sorted(keep), sorted(frontier)

    def subgraph(self, keep: list[int], inputs: list[Any], edits: dict[int, dict[int, str]]) -> Any:
        """A model of the nodes ``keep`` (with ``edits``) fed ``inputs`` (ValueInfoProtos)."""
        from onnx import NodeProto, helper

        nodes = [NodeProto() for _ in keep]
        for node, i in zip(nodes, keep):
            node.CopyFrom(self.nodes[i])
            for slot, name in edits.get(i, {}).items():
                node.input[slot] = name
        used = {x for n in nodes for x in n.input}
        graph = helper.make_graph(nodes, self.model.graph.name, inputs, list(self.model.graph.output),
                                  [self.inits[t] for t in sorted(used & set(self.inits))])
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        model.metadata_props.extend(self.model.metadata_props)
        return model

    def with_outputs(self, names: Sequence[str]) -> bytes:
        """The whole int8 graph with ``names`` as further outputs, serialized."""
        from onnx import ValueInfoProto

        g, before = self.model.graph, len(self.model.graph.output)
        g.output.extend(ValueInfoProto(name=t, type=self.types[t]) if t in self.types else ValueInfoProto(name=t)
                        for t in names)
        try:
            return bytes(self.model.SerializeToString())
        finally:
            del g.output[before:]
