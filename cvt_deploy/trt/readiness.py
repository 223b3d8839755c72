"""TensorRT readiness without TensorRT: a graph checked against what each ONNX parser release imports.

This is a *static* check of the documented parser, not TensorRT: it reads the graph and
compares every node with onnx-tensorrt's own operator table and importer source for the
release (``parser_ops.json`` beside this file, written by ``tools/trt_parser_table.py`` from
the release branches ``release/8.5-GA``, ``release/8.6-GA`` and ``release/10.3-GA``, whose
commits it records). A graph that passes can still fail in TensorRT's builder (memory,
tactics, a bug); one that fails would stop at the parser, at the node named. Rules:

* op: every node's operator has an importer in that release (standard domain only: a custom
  domain needs a plugin);
* dtype: the data input's type is one the release lists for the op (INT64 is narrowed to
  INT32 by 8.x, which is noted, not refused);
* attribute: attributes an importer ignores or refuses (``Shape`` start/end before 10.0);
* rank: input ranks an importer refuses (Conv on 2-D/3-D images);
* quantization (TensorRT's explicit-quantization rules): symmetric int8 with zero point 0,
  constant positive scales, per-channel scales only on weights of Conv/ConvTranspose/Gemm or
  of a MatMul whose inputs are both 2-D (8.x guide), every DequantizeLinear feeding an op
  TensorRT fuses it into, every QuantizeLinear followed by a DequantizeLinear;
* input: dynamic dims only on the batch (the engine's optimization profile sets the batch
  alone), input types the release takes.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import CvtDeployError, require

if TYPE_CHECKING:
    from ..bundle import Bundle

TABLE = Path(__file__).with_name("parser_ops.json")
GUIDE_8 = "TensorRT 8.6 developer guide, 'Explicit Quantization' (Q/DQ layer placement, per-channel weights)"
GUIDE_10 = "TensorRT 10 developer guide, 'Explicit Quantization'"
PROFILE = "cvt-deploy: the engine's optimization profile sets the batch only (trt/sidecar.py profile_shapes)"
# Ops TensorRT fuses a DequantizeLinear into (as its quantized input) or propagates Q/DQ through.
QUANTIZABLE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool", "MaxPool",
                         "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                         "Relu", "LeakyRelu", "Sigmoid", "Resize"})
PER_CHANNEL_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
# Rank rules of the importers (operators.md restrictions), as (op, allowed ranks of input 0).
RANKS = {"Conv": (3, 4, 5), "ConvTranspose": (3, 4, 5)}
#: The newest opset each release's docs claim (its docs/operators.md header; the importer itself
#: only warns, so a newer graph is a note, not an error).
MAX_OPSET = {"8.5": 17, "8.6": 17, "10": 20}
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"})


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


@dataclass
class ReadinessReport:
    """The findings for one graph and one TensorRT release."""

    graph: str
    version: str
    ops: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def __bool__(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "tensorrt": self.version, "ready": bool(self), "ops": self.ops,
                "findings": [f.to_dict() for f in self.findings]}

    def __str__(self) -> str:
        head = f"{self.graph} on TensorRT {self.version}: " + ("ready" if self else f"{len(self.errors)} error(s)")
        notes = len(self.findings) - len(self.errors)
        return "\n".join([head + (f", {notes} note(s)" if notes else "")] + [f"  {f}" for f in self.findings])


@lru_cache(maxsize=1)
def parser_table() -> dict[str, Any]:
    """The per-release operator table and importer facts (read once)."""
    return json.loads(TABLE.read_text())


def release_of(version: str) -> str | None:
    """The parser table a TensorRT version is checked against ("8.5.2.2" -> "8.5", "10.3.0" -> "10");
    None for releases the table does not describe (older than 8.5, newer than 10)."""
    parts = version.split(".")
    key = "10" if parts[0] == "10" else ".".join(parts[:2])
    return key if key in parser_table()["ops"] else None


def _source(version: str, what: str = "docs/operators.md") -> str:
    src = parser_table()["sources"][version]
    return f"onnx-tensorrt {src['ref']} ({src['commit'][:10]}) {what}"


def _note(version: str, op: str, about: str = "") -> str:
    """The importer-source citation recorded for ``op`` in ``version`` (or the operator table);
    graph-wide facts are recorded under op "*" and found by a word of theirs (``about``)."""
    for note in parser_table().get("notes", []):
        if version in note.get("versions", []) and (note.get("op") == op if not about
                                                     else note.get("op") == "*" and about in note.get("fact", "")):
            return f"onnx-tensorrt {note['source']}"
    return _source(version)


_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64",
          16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4"}


class _Graph:
    """What the rules need to know about a graph: types, ranks, producers, consumers, constants."""

    def __init__(self, model: Any, folder: str = "") -> None:
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # unknown ops or > 2 GB: use what the file records
            inferred = model
        values = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        self.types = {v.name: v.type.tensor_type.elem_type for v in values}
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}
        # Constants by name, read only when a rule needs the values (scales, zero points): the
        # weights themselves (external data for big models) are never loaded.
        self.tensors: dict[str, Any] = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = n.attribute[0].t
        for name, t in self.tensors.items():
            self.types.setdefault(name, t.data_type)
            self.ranks.setdefault(name, len(t.dims))
        self.folder = folder
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def type_name(self, tensor: str) -> str | None:
        t = self.types.get(tensor)
        return _TYPES.get(t, str(t)) if t else None

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


def _label(node: Any) -> str:
    return f"node {node.name!r}" if node.name else f"node producing {node.output[0]!r}"


def check_readiness(graph: str | os.PathLike[str] | Any, version: str, *, name: str | None = None) -> ReadinessReport:
    """Check one ONNX graph (a path or a ModelProto) against TensorRT ``version``'s parser ("8.5", "8.6", "10")."""
    from ..export.portable import check_tensorrt_target

    require("onnx", "onnx", "the TensorRT readiness check")
    import onnx

    version = check_tensorrt_target(version)
    if isinstance(graph, (str, os.PathLike)):
        try:
            model = onnx.load(str(graph), load_external_data=False)
        except Exception as e:
            raise CvtDeployError(f"{graph} is not a readable ONNX file: {str(e)[:200]}", "re-export it with cvt-export") from None
        name, folder = name or Path(graph).name, str(Path(graph).parent)
    else:
        model, folder = graph, ""
    report = ReadinessReport(name or model.graph.name or "graph", version,
                             dict(sorted(Counter(n.op_type for n in model.graph.node).items())))
    table = parser_table()["ops"][version]
    g = _Graph(model, folder)
    add = report.findings.append
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > MAX_OPSET[version]:
        add(Finding(version, "graph", "opset", "opset", f"the graph declares opset {opset}; this release's docs claim "
                    f"opsets up to {MAX_OPSET[version]} (the importer does not check)", _note(version, "*", "opset"),
                    "note"))
    _check_inputs(model, g, version, add)
    int64 = False
    for node in model.graph.node:
        where = _label(node)
        if node.domain not in ("", "ai.onnx"):
            add(Finding(version, where, f"{node.domain}.{node.op_type}", "op", f"custom-domain op {node.domain!r} has "
                        "no built-in importer (it needs a TensorRT plugin)", _source(version)))
            continue
        entry = table.get(node.op_type)
        if entry is None:
            add(Finding(version, where, node.op_type, "op", f"{node.op_type} has no importer in TensorRT {version}",
                        _source(version)))
            continue
        int64 |= any(g.types.get(t) == 7 for t in (*node.input, *node.output) if t)
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast") and node.input and node.input[0]:
            t = g.type_name(node.input[0])
            narrowed = t == "INT64" and version != "10" and "INT32" in entry["types"]  # said once below
            if t and entry["types"] and t not in entry["types"] and not narrowed:
                add(Finding(version, where, node.op_type, "dtype", f"input {node.input[0]!r} is {t}; TensorRT "
                            f"{version} imports {node.op_type} for {', '.join(entry['types'])}", _source(version)))
        _check_attributes(node, g, version, where, add)
        rank = g.ranks.get(node.input[0]) if node.input else None
        if node.op_type in RANKS and rank is not None and rank not in RANKS[node.op_type]:
            add(Finding(version, where, node.op_type, "rank", f"input {node.input[0]!r} has rank {rank}; the importer "
                        f"takes ranks {RANKS[node.op_type]}", _source(version)))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, g, version, where, add)
    if int64 and version != "10":
        add(Finding(version, "graph", "INT64", "dtype", "INT64 tensors (shapes, indices) are narrowed to INT32 by the "
                    "8.x parser, with a warning (values outside INT32 are clamped)", _note(version, "*", "INT64"),
                    "note"))
    return report


def _check_inputs(model: Any, g: _Graph, version: str, add: Any) -> None:
    initializers = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if k and not (d.HasField("dim_value") and d.dim_value > 0):
                add(Finding(version, f"input {inp.name!r}", "input", "dynamic-dim",
                            f"dimension {k} is dynamic ({d.dim_param or '?'}); only the batch (dimension 0) may be",
                            PROFILE))
        t = g.type_name(inp.name)
        allowed = ("FP32", "FP16", "INT32", "BOOL", "UINT8", "INT64") if version != "10" else \
            ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8", "INT8")
        if t and t not in allowed:
            add(Finding(version, f"input {inp.name!r}", "input", "dtype", f"a {t} network input is not accepted",
                        _note(version, "*", "UINT8 graph input")))
        if t == "UINT8":
            users = g.consumers.get(inp.name, [])
            if not users or any(u.op_type != "Cast" or _attr(u, "to") not in (1, 10) for u in users):
                add(Finding(version, f"input {inp.name!r}", "input", "uint8-input", "a UINT8 network input must go "
                            "straight into Casts to FP32/FP16", _note(version, "*", "UINT8 graph input")))


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _check_attributes(node: Any, g: _Graph, version: str, where: str, add: Any) -> None:
    if node.op_type == "Shape" and version != "10" and ({"start", "end"} & {a.name for a in node.attribute}):
        add(Finding(version, where, "Shape", "attribute", f"Shape with start={_attr(node, 'start', 0)}, "
                    f"end={_attr(node, 'end')}: the {version} importer ignores start/end and returns the whole shape "
                    "(first honoured in 10.0); use Shape + Slice", _note(version, "Shape")))
    if node.op_type == "Cast":
        src, dst = g.type_name(node.input[0]), _TYPES.get(_attr(node, "to"))
        allowed = parser_table()["ops"][version]["Cast"]["types"]
        for t in (src, dst):
            narrowed = t == "INT64" and version != "10"
            pixels = t == src == "UINT8" and dst in ("FP32", "FP16")  # what 8.5 allows a UINT8 source
            if t and allowed and t not in allowed and not narrowed and not pixels:
                add(Finding(version, where, "Cast", "dtype", f"Cast {src} -> {dst}: {t} is not a type the {version} "
                            f"Cast importer takes ({', '.join(allowed)})", _note(version, "Cast")))
    if version == "10":
        return
    if node.op_type in REDUCE_OPS and len(node.input) > 1 and node.input[1]:
        add(Finding(version, where, node.op_type, "attribute", f"axes given as an input (opset 18): the {version} "
                    "importer ignores it and reduces over every axis, silently; write axes as the attribute (opset "
                    "<= 17)", _note(version, "ReduceMean")))
    if node.op_type == "Constant" and {"value_int", "value_ints"} & {a.name for a in node.attribute}:
        add(Finding(version, where, "Constant", "attribute", f"value_int/value_ints: the {version} importer reads them "
                    "as floats (0 / empty, by reading the source); use a `value` tensor", _note(version, "Constant")))


def _check_qdq(node: Any, g: _Graph, version: str, where: str, add: Any) -> None:
    import numpy as np

    guide = GUIDE_10 if version == "10" else GUIDE_8
    op = node.op_type
    scale = g.value(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        add(Finding(version, where, op, "qdq-scale", f"scale {node.input[1] if len(node.input) > 1 else ''!r} is not "
                    "a constant; TensorRT needs build-time scales", guide))
    elif not (np.isfinite(scale).all() and (scale > 0).all()):
        add(Finding(version, where, op, "qdq-scale", "scale has values that are not finite and positive", guide))
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = g.value(zp_name) if zp_name else None
    # Without a zero point, QuantizeLinear writes UINT8 (the ONNX default).
    int_type = g.type_name(zp_name) if zp_name else ("UINT8" if op == "QuantizeLinear" else g.type_name(node.input[0]))
    if not zp_name and version != "10":
        add(Finding(version, where, op, "qdq-zero-point", f"no zero point input: the {version} importer needs all "
                    "three inputs (x, scale, zero point 0)", _note(version, "QuantizeLinear")))
    if zp_name and zp is None:
        add(Finding(version, where, op, "qdq-zero-point", f"zero point {zp_name!r} is not a constant", guide))
    elif zp is not None and np.any(zp != 0):
        add(Finding(version, where, op, "qdq-zero-point", f"zero point {np.unique(zp)[:4].tolist()} is not 0: "
                    "TensorRT quantizes symmetrically (zero point 0 only)", guide))
    if int_type and int_type != "INT8" and not (version == "10" and int_type in ("FP8", "INT4")):
        add(Finding(version, where, op, "qdq-type", f"quantized type {int_type}; TensorRT {version} takes INT8"
                    + (" (and FP8/INT4)" if version == "10" else ""), guide))
    per_channel = scale is not None and scale.size > 1
    if op == "QuantizeLinear":
        users = g.consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            add(Finding(version, where, op, "qdq-pair", "a QuantizeLinear must be followed by DequantizeLinear only",
                        guide))
        return
    users = g.consumers.get(node.output[0], [])
    if not any(u.op_type in QUANTIZABLE for u in users):
        add(Finding(version, where, op, "qdq-consumer", "this DequantizeLinear feeds "
                    + (", ".join(sorted({u.op_type for u in users})) or "nothing")
                    + ", no op TensorRT runs quantized: the Q/DQ pair only costs time", guide))
    if not per_channel:
        return
    if not any(a.name == "axis" for a in node.attribute):
        add(Finding(version, where, op, "qdq-axis", "per-channel scales without an explicit axis: ONNX means axis 1, "
                    "the importer takes axis 0", _note(version, "QuantizeLinear")))
    if not g.is_weight(node.output[0]):
        add(Finding(version, where, op, "qdq-per-channel", "per-channel scales on an activation; TensorRT takes them "
                    "for weights only", guide))
        return
    for user in users:
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


def portable_graphs(bundle: Bundle) -> list[Any]:
    """The bundle's ONNX artifacts TensorRT builds from: the portable graphs and those written
    for TensorRT 10 alone (the int8+fp16 graph)."""
    return [a for a in bundle.artifacts.values() if a.kind == "onnx" and a.target in ("portable", "tensorrt-10")]


def check_bundle_readiness(bundle: Bundle, versions: Iterable[str] | None = None,
                           precisions: Sequence[str] | None = None) -> list[ReadinessReport]:
    """:func:`check_readiness` for every portable graph of ``bundle`` on each of ``versions``
    (default: the releases the bundle's graphs were written for)."""
    from ..export.portable import DEFAULT_TENSORRT, targets_from

    reports = []
    for art in portable_graphs(bundle):
        if precisions and art.precision not in precisions:
            continue
        written_for = art.info.get("tensorrt") or targets_from(DEFAULT_TENSORRT)
        # A graph written for TensorRT 10 alone is checked for the asked releases it serves.
        wanted = [v for v in versions if art.target == "portable" or v in written_for] if versions else written_for
        path = bundle.verified_path(art)
        for version in dict.fromkeys(wanted):
            reports.append(check_readiness(path, version, name=art.file))
    return reports


def summary(reports: Sequence[ReadinessReport]) -> str:
    """A table graph x release, and the line that says what this check is."""
    from ..table import format_table

    rows = [[r.graph, r.version, "ready" if r else "NOT READY", str(len(r.errors)), str(len(r.findings) - len(r.errors))]
            for r in reports]
    return format_table(["graph", "tensorrt", "parser", "errors", "notes"], rows) + \
        "\n(a static check of the documented ONNX parser of each release, not TensorRT: the builder can still fail)"


def require_ready(bundle: Bundle) -> list[ReadinessReport]:
    """The export's last graph stage: every portable graph must pass for the releases it was
    written for; recorded per graph in the manifest (``tensorrt_ready``), else an error listing
    every finding."""
    reports = check_bundle_readiness(bundle)
    failed = [r for r in reports if not r]
    if failed:
        raise CvtDeployError("the exported graphs would not parse on the TensorRT they were written for: "
                             + "; ".join(str(f) for r in failed for f in r.errors),
                             "export for a newer TensorRT (--tensorrt 10) meanwhile, and report this with the model")
    for art in portable_graphs(bundle):  # the files are unchanged: no re-hashing, one manifest write
        art.info["tensorrt_ready"] = [r.version for r in reports if r.graph == art.file]
    bundle.save()
    return reports
