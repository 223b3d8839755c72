"""Layer-by-layer parity (``cvt-check --layers``): where in the network a candidate graph of a
bundle (fp16, int8 Q/DQ, int8+fp16, ONNX Runtime CPU, an OpenVINO IR) leaves the fp32 graph.

Both graphs run on the same images and their intermediate tensors are compared at every named
weighted layer (the PyTorch module it computes, export/names.py: ``stage2.blocks.1.attn.proj``),
at every transformer block's output (``stage2.blocks.1``: the residual Add after its MLP) and at
the logits; ``mode="all"`` adds the unnamed weighted nodes (the attention MatMuls of two
activations). A point is found by ONNX node name, which every graph of a bundle keeps for the
nodes it does not fuse: a Linear's point is the output of its bias Add (the module's output;
a Q/DQ graph computes it on a 2-D view, compared image by image all the same), a Conv's its own
output. Points the candidate fused or renamed (the ONNX Runtime CPU graphs fold attention
into one op) are skipped and counted, never compared with something else.

The reference is the bundle's fp32 ONNX graph on ONNX Runtime's CPU provider; ONNX Runtime runs
every graph unoptimized, as written (``util.ort_session(optimize=False)``: fusions would rename
or remove the tensors compared), so an int8 Q/DQ graph is computed as its dequantized floats
there. An OpenVINO IR runs on OpenVINO's CPU plugin with the points added as outputs by tensor
name (``ov.Model.add_outputs``); an IR that lost the names is replaced by its portable ONNX graph
on OpenVINO, and the report says so.

Memory is bounded: never every tensor at once (marking every output is what runs out of memory,
NVIDIA/TensorRT#4443). At most :data:`GROUP` points are graph outputs in one pass; each pass runs
both graphs over the images ``data.CHUNK`` at a time and reduces each tensor pair to per-image
figures at once (layer_report.Stats), so memory is one chunk's ``GROUP`` tensors per graph.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .artifacts import REFERENCE as FP32, RUNS
from .errors import CvtDeployError, NotRightHere, require
from .layer_points import Probe, PointGraph, check_mode, probes
from .layer_report import LayerReport, LayerRow, Stats
from .progress import Progress, say
from .util import INPUT_FORMAT_KEY, PRECISIONS, ort_session

if TYPE_CHECKING:
    from .bundle import Artifact, Bundle
    from .data import EvalData

GROUP = 16  # points exposed as graph outputs per pass (the memory bound)
BACKENDS = ("onnxruntime", "openvino")  # what runs a candidate here; TensorRT engines expose no named tensors
REFERENCE = "fp32 ONNX graph (onnxruntime cpu, unoptimized)"

Run = Callable[[np.ndarray], list[np.ndarray]]


# --- running a graph with chosen tensors as outputs ----------------------------------------------

def _meta(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _static_batch(model: Any) -> int | None:
    dim = model.graph.input[0].type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].dim_value > 0 else None


def _ort_opener(model: Any) -> Callable[[Sequence[str]], Run]:
    """ONNX Runtime on ``model`` (a ModelProto, changed in place) with ``tensors`` as its outputs, unoptimized."""
    import onnx

    input_name = model.graph.input[0].name
    if model.ByteSize() > 2**31 - 1:
        raise CvtDeployError("the graph is over 2 GB in memory, too large to run with extra outputs",
                             "check layers of a smaller model, or report the size")

    def open_with(tensors: Sequence[str]) -> Run:
        del model.graph.output[:]
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
        session = ort_session(model.SerializeToString(), optimize=False)
        return lambda batch: list(session.run(list(tensors), {input_name: batch}))

    return open_with


def _ov_opener(model: Any, compute: str, batch: int) -> Callable[[Sequence[str]], Run]:
    """OpenVINO's CPU plugin on ``model`` (an ov.Model) with ``tensors`` added as outputs, for batches of ``batch``."""
    import openvino as ov

    from .runtimes.openvino import compile_config

    core = ov.Core()

    def open_with(tensors: Sequence[str]) -> Run:
        m = model.clone()
        m.add_outputs(list(tensors))
        m.reshape({m.inputs[0]: [batch, *m.inputs[0].get_partial_shape()[1:]]})
        compiled = core.compile_model(m, "CPU", compile_config(None, compute))
        ports = [compiled.output(t) for t in tensors]
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> list[np.ndarray]:
            res = request.infer({0: x}, share_inputs=False, share_outputs=False)
            return [np.asarray(res[p]) for p in ports]

        return run

    return open_with


def _ov_tensor_names(model: Any) -> set[str]:
    return {name for op in model.get_ops() for o in op.outputs() for name in o.get_names()}


@dataclass
class _Side:
    """One graph of the comparison: how to open it, what it is fed, and where its points are."""

    open: Callable[[Sequence[str]], Run]
    input_format: str
    batch: int | None  # a fixed batch it runs at (static graph, or OpenVINO compiled for one size)
    tensors: dict[int, str]  # probe index -> tensor


def _run(run: Run, x: np.ndarray, batch: int | None) -> list[np.ndarray]:
    """Each output of ``run`` on the images ``x`` as (images, values), in fixed batches where the graph needs them."""
    n = len(x)
    if batch is None or batch == n:
        return [np.asarray(o).reshape(n, -1) for o in run(x)]
    parts = []
    for i in range(0, n, batch):
        chunk = x[i:i + batch]
        m = len(chunk)
        if m < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - m, *chunk.shape[1:]), chunk.dtype)])
        parts.append([np.asarray(o).reshape(batch, -1)[:m] for o in run(chunk)])
    return [np.concatenate(p) for p in zip(*parts)]


# --- the comparison ------------------------------------------------------------------------------

def candidates(bundle: Bundle, backends: Sequence[str] = ("onnxruntime",),
               precisions: Sequence[str] | None = None) -> list[tuple[str, Artifact]]:
    """(backend, artifact) of every candidate graph: on onnxruntime each ONNX graph but the fp32
    reference, on openvino each OpenVINO IR; ``precisions``: only those."""
    reference = reference_artifact(bundle)
    plan = []
    for backend in backends:
        if backend not in BACKENDS:
            raise CvtDeployError(f"--layers runs graphs on {', '.join(BACKENDS)}, not {backend}",
                                 "a TensorRT engine exposes no named intermediate tensors: check the ONNX graph it "
                                 "was built from with --backend onnxruntime")
        kind = RUNS[backend][0]  # the backend's own form of the graph: ONNX on ONNX Runtime, the IR on OpenVINO
        # decision: --layers compares every graph a backend runs in its own form (one table row each)
        for art in sorted(bundle.artifacts.values(), key=lambda a: (PRECISIONS.index(a.precision), a.name)):
            if art.kind == kind and art is not reference and (not precisions or art.precision in precisions):
                plan.append((backend, art))
    if not plan:
        what = f" at {', '.join(precisions)}" if precisions else ""
        forms = {RUNS[b][0] for b in BACKENDS}
        # decision: the graphs an error lists, in the forms --layers runs
        have = ", ".join(f"{a.file} ({a.precision})" for a in bundle.artifacts.values() if a.kind in forms)
        raise CvtDeployError(f"bundle {bundle.root} has no candidate graph{what} for --layers on {', '.join(backends)} "
                             f"(it has: {have or 'no graphs'}; the fp32 ONNX graph is the reference)",
                             f"add an IR with: cvt-export --format openvino --bundle {bundle.root}" if backends == ["openvino"]
                             else "export one first (cvt-export --precision fp16,int8 ...), or pick another "
                                  "--precision/--backend")
    return plan


def reference_artifact(bundle: Bundle) -> Artifact:
    art = bundle.find("onnx", FP32)  # decision: the portable fp32 graph is --layers' reference, by definition
    if art is None:
        raise CvtDeployError(f"bundle {bundle.root} has no fp32 ONNX graph, the reference of --layers",
                             f"re-export the bundle: cvt-export --out {bundle.root} (with the same --weights)")
    return art


def _load_onnx(bundle: Bundle, art: Artifact) -> Any:
    require("onnx", "onnx", "cvt-check --layers")
    import onnx

    data = bundle.verified_bytes(art)
    try:
        return onnx.load_from_string(data) if data is not None else onnx.load(str(bundle.verified_path(art)))
    except Exception as e:
        raise CvtDeployError(f"{bundle.path(art)} is not a readable ONNX graph: {str(e)[:200]}",
                             f"re-export the bundle: cvt-export --out {bundle.root}") from None


def layer_parity(bundle: Bundle, artifact: str | Artifact, data: str | EvalData | None = None, *,
                 backend: str = "onnxruntime", mode: str = "named", limit: int | None = None,
                 progress: bool = True, group: int = GROUP) -> LayerReport:
    """Compare ``artifact`` (a graph of ``bundle``, run on ``backend``) with the bundle's fp32
    graph, point by point (module docstring), on ``data`` (as cvt-check: default the demo
    held-out digits, ``limit`` images)."""
    from .data import CHUNK, DEFAULT_LIMIT, EvalData, load_eval_data

    art = bundle.artifacts.get(artifact) if isinstance(artifact, str) else artifact
    if art is None:
        raise CvtDeployError(f"bundle {bundle.root} has no artifact {artifact!r}",
                             "choose one of: " + ", ".join(n for n, a in bundle.artifacts.items() if a.kind in ("onnx", "openvino")))
    if group < 1:
        raise CvtDeployError(f"group {group} must be at least 1", "leave the group size at its default")
    check_mode(mode)
    _check_candidate(bundle, backend, art)
    ref_art = reference_artifact(bundle)
    ref_model = _load_onnx(bundle, ref_art)
    points = probes(ref_model, mode)
    ref_graph = PointGraph(ref_model)
    ref_tensors = {i: ref_graph.locate(p)[0] for i, p in enumerate(points)}
    notes: list[str] = []
    rows = [LayerRow(i, p.kind, p.module, p.node, ref_tensors[i]) for i, p in enumerate(points)]
    ref_side = _Side(_ort_opener(ref_model), _meta(ref_model).get(INPUT_FORMAT_KEY, "float"), _static_batch(ref_model),
                     ref_tensors)
    ev = data if isinstance(data, EvalData) else load_eval_data(data, bundle.config, DEFAULT_LIMIT if limit is None else limit,
                                                                progress)
    ev = ev.held(progress=progress)
    # decision: how each backend --layers runs exposes a graph's intermediate tensors
    cand_side = _ort_side(bundle, art, points, rows) if backend == "onnxruntime" \
        else _openvino_side(bundle, art, points, rows, notes, min(len(ev), CHUNK))
    describe = f"{backend} {art.precision} ({art.file})"
    report = LayerReport(describe, art.name, backend, REFERENCE, len(ev), ev.description, mode, group, rows, notes)
    _compare(ref_side, cand_side, ev, rows, group, progress, f"comparing {describe} layer by layer", bundle)
    return report


def _check_candidate(bundle: Bundle, backend: str, art: Artifact) -> None:
    if backend not in BACKENDS:
        raise CvtDeployError(f"--layers runs graphs on {', '.join(BACKENDS)}, not {backend}",
                             "check the ONNX graph an engine was built from with --backend onnxruntime")
    if art.kind != RUNS[backend][0]:
        raise CvtDeployError(f"{art.name} ({art.file}) is a {art.kind} artifact, not what --layers runs on {backend}",
                             "pick an ONNX graph for onnxruntime, an OpenVINO IR for openvino (cvt-export --format "
                             f"openvino --bundle {bundle.root} adds them)")


def _locate(source: Any, points: Sequence[Probe], rows: list[LayerRow]) -> dict[int, str]:
    """Probe index -> the tensor of each point in ``source`` (an ONNX graph); the others' rows marked skipped."""
    g = PointGraph(source)
    tensors: dict[int, str] = {}
    for i, p in enumerate(points):
        tensor, why = g.locate(p)
        if tensor:
            tensors[i] = rows[i].candidate_tensor = tensor
        else:
            rows[i].skipped = why
    return tensors


def _ort_side(bundle: Bundle, art: Artifact, points: Sequence[Probe], rows: list[LayerRow]) -> _Side:
    model = _load_onnx(bundle, art)
    tensors = _locate(model, points, rows)
    return _Side(_ort_opener(model), _meta(model).get(INPUT_FORMAT_KEY, "float"), _static_batch(model), tensors)


def _openvino_side(bundle: Bundle, art: Artifact, points: Sequence[Probe], rows: list[LayerRow], notes: list[str],
                   batch: int) -> _Side:
    """An IR on OpenVINO; its points are found in the portable ONNX graph it was converted from, by tensor name."""
    from .runtimes.openvino import OpenVinoRuntime, read_ir, read_onnx

    # decision: an IR's points are those of the portable graph it was converted from (older manifests: by precision)
    src_art = bundle.artifacts.get(str(art.info.get("portable", ""))) or bundle.find("onnx", art.precision)
    if src_art is None or src_art.kind != "onnx":
        raise CvtDeployError(f"{art.file} names no ONNX graph of the bundle that it was converted from, so its tensors "
                             "cannot be matched to the fp32 graph's",
                             f"write the IRs again: cvt-export --format openvino --bundle {bundle.root}")
    source = _load_onnx(bundle, src_art)
    tensors = _locate(source, points, rows)
    runtime = OpenVinoRuntime.from_bundle(bundle, artifact=art.name)  # refuses what this CPU cannot run right
    compute, static = runtime.compute, _static_batch(source)
    runtime.close()
    model = read_ir(bundle.path(art), *bundle.verified_ir(art))
    names = _ov_tensor_names(model)
    kept = {i: t for i, t in tensors.items() if t in names}
    if 2 * len(kept) < len(tensors):  # the IR lost its names: its portable ONNX graph on OpenVINO
        notes.append(f"{art.file} keeps {len(kept)} of {len(tensors)} tensor names: its portable graph {src_art.file} "
                     "ran on OpenVINO in its place")
        OpenVinoRuntime.from_bundle(bundle, artifact=src_art.name).close()  # refuses 8-bit weights where they overflow
        model = read_onnx(bundle.verified_path(src_art))
        names = _ov_tensor_names(model)
        kept = {i: t for i, t in tensors.items() if t in names}
    for i in set(tensors) - set(kept):
        rows[i].skipped = f"no tensor {tensors[i]} in the OpenVINO model (renamed or folded)"
    if compute != "f32":
        notes.append(f"OpenVINO computed the {art.precision} graph in {compute}")
    return _Side(_ov_opener(model, compute, static or batch), _meta(source).get(INPUT_FORMAT_KEY, "float"),
                 static or batch, kept)


def _compare(ref: _Side, cand: _Side, ev: EvalData, rows: list[LayerRow], group: int, progress: bool, label: str,
             bundle: Bundle) -> None:
    """Fill ``rows`` with the figures of every point both sides have, ``group`` points per pass."""
    from .data import CHUNK
    from .preprocess import graph_input

    todo = [i for i in sorted(cand.tensors) if not rows[i].skipped and ref.tensors.get(i)]
    for i, r in enumerate(rows):
        if not r.skipped and i not in todo:
            r.skipped = "not in the candidate graph"
    passes = [todo[k:k + group] for k in range(0, len(todo), group)]
    say_progress = progress and len(passes) > 0
    if say_progress:
        say(f"{label}: {len(todo)} points, {len(passes)} passes of at most {group} over {len(ev)} images")
    bar = Progress(len(passes) * len(ev), label, say_progress, unit="images")
    cfg = bundle.config.preprocess
    try:
        for chosen in passes:
            ref_names = list(dict.fromkeys(ref.tensors[i] for i in chosen))
            cand_names = list(dict.fromkeys(cand.tensors[i] for i in chosen))
            ref_run, cand_run = ref.open(ref_names), cand.open(cand_names)
            stats = {i: Stats() for i in chosen}
            for x in ev.chunks(CHUNK):
                a = dict(zip(ref_names, _run(ref_run, graph_input(x, cfg, ref.input_format), ref.batch)))
                b = dict(zip(cand_names, _run(cand_run, graph_input(x, cfg, cand.input_format), cand.batch)))
                for i in chosen:
                    ta, tb = a[ref.tensors[i]], b[cand.tensors[i]]
                    if ta.shape != tb.shape:
                        rows[i].skipped = f"shapes differ per image: fp32 {ta.shape[1]} values, candidate {tb.shape[1]}"
                    elif not rows[i].skipped:
                        stats[i].add(ta, tb)
                del a, b
                bar.advance(len(x))
            del ref_run, cand_run
            for i in chosen:
                if not rows[i].skipped:
                    stats[i].fill(rows[i])
    finally:
        bar.close()


def check_layers(bundle: Bundle, *, backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
                 data: str | EvalData | None = None, limit: int | None = None, mode: str = "named",
                 progress: bool = True) -> list[LayerReport]:
    """:func:`layer_parity` of every candidate of the bundle (:func:`candidates`), the images read once."""
    from .data import DEFAULT_LIMIT, EvalData, load_eval_data

    plan = candidates(bundle, backends, precisions)
    check_mode(mode)  # before any image is read
    ev = data if isinstance(data, EvalData) else load_eval_data(data, bundle.config, DEFAULT_LIMIT if limit is None else limit,
                                                                progress)
    ev = ev.held(progress=progress)
    reports, refused = [], []
    for backend, art in plan:
        try:
            reports.append(layer_parity(bundle, art, ev, backend=backend, mode=mode, progress=progress))
        except NotRightHere as e:
            refused.append(e)
            print(f"  note: {art.name} not compared on {backend}: {e.message}", file=sys.stderr)
    if not reports and refused:
        raise refused[0]
    return reports
