"""TensorRT readiness without TensorRT: a graph checked against what each ONNX parser release imports.

This is a *static* check of the documented parser, not TensorRT: it reads the graph and
compares every node with onnx-tensorrt's own operator table and importer source for the
release (``parser_ops.json`` beside this file, written by ``tools/trt_parser_table.py`` from
the release tags ``release/8.5-GA``, ``release/8.6-GA`` and ``release/10.0-GA``, whose
commits it records). The "10" target means JetPack 6.1/6.2's TensorRT 10.3, but its table is
``release/10.0-GA``, the oldest 10.x release: the source snapshot read ends at 10.1, so 10.3's
parser was not read. A graph that passes can still fail in TensorRT's builder (memory,
tactics, a bug); one that fails would stop at the parser, at the node named. Rules:

* op: every node's operator has an importer in that release (standard domain only: a custom
  domain needs a plugin);
* dtype: the data input's type is one the release lists for the op (INT64 is narrowed to
  INT32 by 8.x, which is noted, not refused);
* attribute: attributes an importer ignores or refuses (``Shape`` start/end before 10.0), or
  needs (``kernel_shape`` on a Conv whose weights come through a DequantizeLinear);
* rank: input ranks an importer refuses (Conv on 2-D/3-D images);
* quantization (TensorRT's explicit-quantization rules, :mod:`.qdq_rules`): symmetric int8 with
  zero point 0, constant positive scales of the type the release reads, per-channel scales
  only on weights of Conv/ConvTranspose/Gemm or of a MatMul whose inputs are both 2-D (8.x
  guide), on the consumer's output-channel axis with one scale per channel, every
  DequantizeLinear feeding an op TensorRT fuses it into, every QuantizeLinear followed by a
  DequantizeLinear;
* input: dynamic dims only on the batch (the engine's optimization profile sets the batch
  alone), input types the release takes;
* fp16-cast (a note, 8.x): what a weakly typed build needs for a graph that casts to FP16.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..artifacts import RELEASE, tensorrt_bound
from ..errors import CvtDeployError, require
from .parser_facts import TYPES, Finding, Graph, attr, label, note_of, parser_table, release_of, release_refs, \
    source_of
from .qdq_rules import check_qdq

if TYPE_CHECKING:
    from ..bundle import Bundle

# Finding, parser_table and release_of moved to parser_facts; callers keep importing them from here.
__all__ = ["Finding", "ReadinessReport", "check_bundle_readiness", "check_readiness", "parser_table", "portable_graphs",
           "release_of", "require_ready", "summary"]
PROFILE = "cvt-deploy: the engine's optimization profile sets the batch only (trt/sidecar.py profile_shapes)"
# Rank rules of the importers (operators.md restrictions), as (op, allowed ranks of input 0).
RANKS = {"Conv": (3, 4, 5), "ConvTranspose": (3, 4, 5)}
#: The newest opset each release's docs claim (its docs/operators.md header; the importer itself
#: only warns, so a newer graph is a note, not an error).
MAX_OPSET = {r.name: r.max_opset for r in RELEASE.values()}  # the registry's (artifacts.RELEASE)
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"})
# Issues where NVIDIA explains how 8.x builds a graph that casts to FP16 (weakly typed).
FP16_CAST_ISSUES = "NVIDIA/TensorRT#1823, #1196"


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
    g = Graph(model, folder)
    add = report.findings.append
    if g.opset > MAX_OPSET[version]:
        add(Finding(version, "graph", "opset", "opset", f"the graph declares opset {g.opset}; this release's docs "
                    f"claim opsets up to {MAX_OPSET[version]} (the importer does not check)",
                    note_of(version, "*", "opset"), "note"))
    _check_inputs(model, g, version, add)
    int64 = False
    for node in model.graph.node:
        where = label(node)
        if node.domain not in ("", "ai.onnx"):
            add(Finding(version, where, f"{node.domain}.{node.op_type}", "op", f"custom-domain op {node.domain!r} has "
                        "no built-in importer (it needs a TensorRT plugin)", source_of(version)))
            continue
        entry = table.get(node.op_type)
        if entry is None:
            add(Finding(version, where, node.op_type, "op", f"{node.op_type} has no importer in TensorRT {version}",
                        source_of(version)))
            continue
        int64 |= any(g.types.get(t) == 7 for t in (*node.input, *node.output) if t)
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast") and node.input and node.input[0]:
            t = g.type_name(node.input[0])
            narrowed = t == "INT64" and version != "10" and "INT32" in entry["types"]  # said once below
            if t and entry["types"] and t not in entry["types"] and not narrowed:
                add(Finding(version, where, node.op_type, "dtype", f"input {node.input[0]!r} is {t}; TensorRT "
                            f"{version} imports {node.op_type} for {', '.join(entry['types'])}", source_of(version)))
        _check_attributes(node, g, version, where, add)
        rank = g.ranks.get(node.input[0]) if node.input else None
        if node.op_type in RANKS and rank is not None and rank not in RANKS[node.op_type]:
            add(Finding(version, where, node.op_type, "rank", f"input {node.input[0]!r} has rank {rank}; the importer "
                        f"takes ranks {RANKS[node.op_type]}", source_of(version)))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            check_qdq(node, g, version, where, add)
    if int64 and version != "10":
        add(Finding(version, "graph", "INT64", "dtype", "INT64 tensors (shapes, indices) are narrowed to INT32 by the "
                    "8.x parser, with a warning (values outside INT32 are clamped)", note_of(version, "*", "INT64"),
                    "note"))
    if version != "10":
        _check_fp16_casts(model, g, version, report.graph, add)
    return report


def _check_inputs(model: Any, g: Graph, version: str, add: Any) -> None:
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
                        note_of(version, "*", "UINT8 graph input")))
        if t == "UINT8":
            users = g.consumers.get(inp.name, [])
            if not users or any(u.op_type != "Cast" or attr(u, "to") not in (1, 10) for u in users):
                add(Finding(version, f"input {inp.name!r}", "input", "uint8-input", "a UINT8 network input must go "
                            "straight into Casts to FP32/FP16", note_of(version, "*", "UINT8 graph input")))


def _check_attributes(node: Any, g: Graph, version: str, where: str, add: Any) -> None:
    if node.op_type == "Shape" and version != "10" and ({"start", "end"} & {a.name for a in node.attribute}):
        add(Finding(version, where, "Shape", "attribute", f"Shape with start={attr(node, 'start', 0)}, "
                    f"end={attr(node, 'end')}: the {version} importer ignores start/end and returns the whole shape "
                    "(first honoured in 10.0); use Shape + Slice", note_of(version, "Shape")))
    if node.op_type == "Cast":
        src, dst = g.type_name(node.input[0]), TYPES.get(attr(node, "to"))
        allowed = parser_table()["ops"][version]["Cast"]["types"]
        for t in (src, dst):
            narrowed = t == "INT64" and version != "10"
            pixels = t == src == "UINT8" and dst in ("FP32", "FP16")  # what 8.5 allows a UINT8 source
            if t and allowed and t not in allowed and not narrowed and not pixels:
                add(Finding(version, where, "Cast", "dtype", f"Cast {src} -> {dst}: {t} is not a type the {version} "
                            f"Cast importer takes ({', '.join(allowed)})", note_of(version, "Cast")))
    if node.op_type == "Conv" and attr(node, "kernel_shape") is None \
            and any(i and i not in g.tensors for i in node.input[1:3]):
        add(Finding(version, where, "Conv", "attribute", f"no kernel_shape, and its weights {node.input[1]!r} (or "
                    "bias) are a tensor, not an initializer (the output of a DequantizeLinear, say): the importer's "
                    "multi-input path takes the kernel size from kernel_shape alone"
                    + (" (still so in 10.1, the newest source read; reported fixed in 10.4, after JetPack 6's 10.3)"
                       if version == "10" else "") + "; write kernel_shape = the weight's dims[2:]",
                    note_of(version, "Conv", "kernel_shape")))
    if version == "10":
        return
    if node.op_type in REDUCE_OPS and len(node.input) > 1 and node.input[1]:
        add(Finding(version, where, node.op_type, "attribute", f"axes given as an input (opset 18): the {version} "
                    "importer ignores it and reduces over every axis, silently; write axes as the attribute (opset "
                    "<= 17)", note_of(version, "ReduceMean")))
    if node.op_type == "Constant" and {"value_int", "value_ints"} & {a.name for a in node.attribute}:
        add(Finding(version, where, "Constant", "attribute", f"value_int/value_ints: the {version} importer reads them "
                    "as floats (0 / empty, by reading the source); use a `value` tensor", note_of(version, "Constant")))


def _check_fp16_casts(model: Any, g: Graph, version: str, graph: str, add: Any) -> None:
    """8.x builds a graph weakly typed: a Cast to FP16 is a precision constraint there, and the
    ops written in FP32 between Casts are kept so only as far as the build obeys constraints."""
    casts = [n for n in model.graph.node if n.op_type == "Cast" and TYPES.get(attr(n, "to")) == "FP16"]
    if not casts:
        return
    fp32 = [n.name or n.output[0] for n in model.graph.node
            if n.op_type not in ("Cast", "Constant") and n.output and g.type_name(n.output[0]) == "FP32"]
    layers = ",".join(f"{n}:fp32" for n in fp32[:3]) + (",..." if len(fp32) > 3 else "") if fp32 else "NODE:fp32,..."
    add(Finding(version, "graph", "Cast", "fp16-cast", f"{len(casts)} Cast(s) to FP16: TensorRT {version} builds this "
                "graph weakly typed, where they are precision constraints: without the FP16 builder flag (trtexec "
                f"without --fp16) the build fails, and with it the {len(fp32)} node(s) left in FP32 are only hints "
                f"unless constraints are obeyed: trtexec --onnx={graph} --fp16 --precisionConstraints=obey "
                f"--layerPrecisions={layers} (every one of them). cvt-deploy's builder instead builds {version} fp16 "
                "engines from the fp32 graph (model.onnx) with the FP16 flag and LayerNorm/Softmax pinned to FP32",
                f"{note_of(version, 'Cast')}; {FP16_CAST_ISSUES}", "note"))


def portable_graphs(bundle: Bundle) -> list[Any]:
    """The bundle's ONNX artifacts TensorRT builds from: the portable graphs and those written
    for TensorRT 10 alone (the int8+fp16 graph)."""
    return tensorrt_bound(bundle)


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
        f"\n(a static check against the ONNX parser sources of onnx-tensorrt {', '.join(release_refs())} (the " \
        "last read for all of 10.x), not TensorRT: the builder can still fail)"


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
    from ..bundle_write import changing

    with changing(bundle):  # the files are unchanged: no re-hashing, one manifest write
        for art in portable_graphs(bundle):
            art.info["tensorrt_ready"] = [r.version for r in reports if r.graph == art.file]
    return reports
