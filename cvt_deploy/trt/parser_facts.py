"""What the readiness rules share: onnx-tensorrt's per-release table, its citations, a finding,
and the facts of a graph the rules read (types, shapes, producers, constants).

The rules themselves live in :mod:`.readiness` (ops, types, attributes, inputs) and
:mod:`.qdq_rules` (explicit quantization); both cite the table through :func:`source_of` and
:func:`note_of`, so every finding names the release ref, commit, file and line it rests on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..artifacts import release_name

TABLE = Path(__file__).with_name("parser_ops.json")
GUIDE_8 = "TensorRT 8.6 developer guide, 'Explicit Quantization' (Q/DQ layer placement, per-channel weights)"
GUIDE_10 = "TensorRT 10 developer guide, 'Explicit Quantization'"
#: ONNX element types by the names operators.md uses.
TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64",
         16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4"}


@dataclass(frozen=True)
class Finding:
    """One reason a release's parser would refuse (``error``) or change (``note``) the graph."""

    version: str
    node: str
    op: str
    rule: str
    message: str
    source: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] TensorRT {self.version}: {self.node} ({self.op}): {self.rule}: {self.message} " \
               f"(source: {self.source})"

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


@lru_cache(maxsize=1)
def parser_table() -> dict[str, Any]:
    """The per-release operator table and importer facts (read once)."""
    return json.loads(TABLE.read_text())


def release_refs() -> list[str]:
    """The onnx-tensorrt refs the table was read from, oldest release first."""
    sources = parser_table()["sources"]
    return [sources[v]["ref"] for v in sorted(sources, key=lambda v: tuple(int(p) for p in v.split(".")))]


def release_of(version: str) -> str | None:
    """The parser table a TensorRT version is checked against ("8.5.2.2" -> "8.5", "10.3.0" -> "10");
    None for releases the table does not describe (older than 8.5, newer than 10)."""
    key = release_name(version)
    return key if key is not None and key in parser_table()["ops"] else None


def source_of(version: str, what: str = "docs/operators.md") -> str:
    src = parser_table()["sources"][version]
    return f"onnx-tensorrt {src['ref']} ({src['commit'][:10]}) {what}"


def note_of(version: str, op: str, about: str = "") -> str:
    """The importer-source citation recorded for ``op`` in ``version`` (or the operator table):
    the first such note, or the first whose fact contains ``about`` (graph-wide facts are
    recorded under op "*")."""
    for note in parser_table().get("notes", []):
        if version in note.get("versions", []) and note.get("op") == op and about in note.get("fact", ""):
            return f"onnx-tensorrt {note['source']}"
    return source_of(version)


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def label(node: Any) -> str:
    return f"node {node.name!r}" if node.name else f"node producing {node.output[0]!r}"


class Graph:
    """What the rules need to know about a graph: types, shapes, producers, consumers, constants."""

    def __init__(self, model: Any, folder: str = "") -> None:
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # unknown ops or > 2 GB: use what the file records
            inferred = model
        values = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        self.types = {v.name: v.type.tensor_type.elem_type for v in values}
        self.shapes: dict[str, list[int | None]] = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in values if v.type.tensor_type.HasField("shape")}
        # Constants by name, read only when a rule needs the values (scales, zero points): the
        # weights themselves (external data for big models) are never loaded.
        self.tensors: dict[str, Any] = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = n.attribute[0].t
        for name, t in self.tensors.items():
            self.types.setdefault(name, t.data_type)
            self.shapes.setdefault(name, list(t.dims))
        self.ranks = {name: len(dims) for name, dims in self.shapes.items()}
        self.folder = folder
        self.opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def type_name(self, tensor: str) -> str | None:
        t = self.types.get(tensor)
        return TYPES.get(t, str(t)) if t else None

    def is_weight(self, tensor: str) -> bool:
        """A constant, possibly behind a DequantizeLinear of a constant (ORT writes int8 weights + DQ)."""
        node = self.producer.get(tensor)
        return tensor in self.tensors or (node is not None and node.op_type == "DequantizeLinear"
                                          and node.input[0] in self.tensors)

    def value(self, name: str) -> Any:
        """The constant ``name`` as a numpy array (external data read from the graph's folder); None if not constant."""
        from onnx import numpy_helper

        t = self.tensors.get(name)
        return None if t is None else numpy_helper.to_array(t, self.folder)
