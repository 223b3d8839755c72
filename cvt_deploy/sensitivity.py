"""Which layers int8 costs: every quantized layer of an int8 (Q/DQ) graph ranked by what keeping
that one layer float gives back (``rank_int8_layers``); the Q/DQ graph with chosen layers float
(``keep_float``), to try a choice without quantizing again.

Measured per quantized Conv/MatMul/Gemm: the int8 graph's logits with *only that layer float*
against the fp32 graph on the check images (smallest and mean per-image cosine, top-1 agreement:
what the int8 gate judges, parity.py), ranked by ``gain``, the share of int8's cosine error
(``1 - mean cosine``) it removes. Not the other way round (only that layer int8): this answers
what to name in ``--int8-keep-float`` with the figure the gate will see, at the same cost.

Cheap enough for CvT-13's 121 quantized layers (docs/precision.md has the times):

* No calibration, no quantizer per layer. A variant is the int8 graph with the layer's Q/DQ
  removed: activations read the float tensor their QuantizeLinear read, the weight is the fp32
  graph's initializer its int8 one was rounded from; every other scale stays. That is what
  ``quantize_static`` writes with the layer excluded (tested: the same logits, bit for bit).
* Only what changes runs. Up to a layer its variant computes what the int8 graph does: that runs
  once, keeping the tensors at its *cuts* (where one activation holds all the state: the input,
  the residual stream between blocks); each variant runs from the last cut before its layer,
  longest first, then shortest, and so on, so the time left shown is right early.
* ``cache``: per-layer results keyed by both graphs, the images and ONNX Runtime's version: an
  interrupted ranking resumes where it stopped.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .config import CvtConfig
from .errors import CvtDeployError, require
from .progress import Progress, stage
from .qdq_graph import QdqGraph
from .table import format_table
from .util import CONFIG_KEY, INPUT_FORMAT_KEY, OUTPUT_KIND_KEY, atomic_output, file_sha256, ort_session

if TYPE_CHECKING:
    from .bundle import Bundle
    from .data import EvalData

DEFAULT_IMAGES = 64  # check images a ranking runs by default (each layer runs them once)
CHUNK = 32  # images per forward pass
CACHE_FORMAT = "cvt-deploy-int8-sensitivity"
CACHE_VERSION = 1


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantized layer, kept float with every other layer int8, against fp32."""

    node: str
    module: str  # the PyTorch module (export/names.py), "" when the node carries none
    op: str
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    gain: float  # share of the int8 graph's mean cosine error (1 - cos) this layer's int8 accounts for


@dataclass
class SensitivityReport:
    """Quantized layers, the most costly first, and the int8 graph's own figures."""

    rows: list[LayerSensitivity]
    int8_min_cosine: float
    int8_mean_cosine: float
    int8_top1_agreement: float
    images: int
    data: str
    graph: str
    reference: str
    seconds: float = 0.0
    cached: int = 0  # layers whose figures came from the cache
    cuts: int = 0  # positions the variants could start from (1: the graph input only; each ran all)

    def rank(self, name: str) -> int:
        """1-based rank of a layer by module or node name (0: not ranked)."""
        return next((i for i, r in enumerate(self.rows, 1) if name in (r.module, r.node)), 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [{"rank": i, **asdict(r)} for i, r in enumerate(self.rows, 1)]}

    def __str__(self) -> str:
        rows = [[str(i), r.module or "-", r.node, r.op, f"{r.min_cosine:.6f}", f"{r.mean_cosine:.6f}",
                 f"{100 * r.top1_agreement:.2f}%", f"{100 * r.gain:.1f}%"] for i, r in enumerate(self.rows, 1)]
        rows.append(["", "(every layer int8)", "", "", f"{self.int8_min_cosine:.6f}", f"{self.int8_mean_cosine:.6f}",
                     f"{100 * self.int8_top1_agreement:.2f}%", ""])
        title = (f"int8 layers of {self.graph}, each kept float alone, vs {self.reference} on {self.images} images "
                 f"({self.data}); gain: share of int8's cosine error it removes")
        return format_table(["rank", "module", "node", "op", "min cos", "mean cos", "top-1 agree", "gain"], rows, title)


def quantized_layers(model: Any) -> list[tuple[str, str, str]]:
    """(node, op, module or '') of every weighted node with a Q/DQ input, in graph order."""
    from .export.names import layer_table

    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inputs = {n.name: n.input for n in model.graph.node}
    return [(node, op, module) for node, op, module in layer_table(model) if any(i in dq for i in inputs[node])]


def keep_float(int8: str | os.PathLike[str], reference: str | os.PathLike[str], names: Sequence[str],
               dst: str | os.PathLike[str]) -> list[str]:
    """Write the int8 Q/DQ graph ``int8`` to ``dst`` with the layers ``names`` (modules, module
    prefixes or nodes, as ``--int8-keep-float`` takes them) float: their Q/DQ removed, their
    weights the fp32 graph ``reference``'s. Every other scale stays as calibrated. Returns the nodes."""
    from .export.names import resolve
    from .export.onnx import save_graph

    model, floats = _load(int8, reference)
    chosen = resolve(model, names)
    g = QdqGraph(model, floats)
    edits = {i: g.float_inputs(i) for i, n in enumerate(g.nodes) if n.name in chosen}
    keep, _ = g.suffix(edits, 0)  # what the outputs still read: the layers' own Q/DQ are gone
    with atomic_output(dst) as tmp:
        save_graph(g.subgraph(keep, list(model.graph.input), edits), tmp)
    return chosen


# --- measuring ------------------------------------------------------------------------------

def rank_int8_layers(source: Bundle | str | os.PathLike[str], reference: str | os.PathLike[str] | None = None, *,
                     data: EvalData | np.ndarray | str | os.PathLike[str] | None = None,
                     limit: int = DEFAULT_IMAGES, layers: Sequence[str] | None = None,
                     cache: str | os.PathLike[str] | None = None, threads: int | None = None,
                     progress: bool = True) -> SensitivityReport:
    """Rank the quantized layers of an int8 Q/DQ graph by what each costs (module docstring).

    ``source``: a bundle (its portable int8 graph, against its fp32 graph) or an int8 ``.onnx``
    file, then with ``reference``, the fp32 graph it was quantized from. ``data``: the check
    images: EvalData, a preprocessed NCHW float32 array, an image folder, or None for the
    demo held-out digits as cvt-check reads them; at most ``limit`` of them. ``layers``: only
    these (modules, module prefixes, nodes). ``cache``: a folder for per-layer results.
    ``threads``: ONNX Runtime intra-op threads (default: every core).
    """
    for module in ("onnx", "onnxruntime"):
        require(module, "onnx", "int8 layer sensitivity")

    start_time = time.perf_counter()
    int8_path, ref_path, config = _paths(source, reference)
    model, floats = _load(int8_path, ref_path)
    meta = {p.key: p.value for p in model.metadata_props}
    config = _float_input_config(int8_path, meta, config)
    images, description = _images(data, config, limit, int8_path, progress)
    table = _layers_to_rank(model, int8_path, layers)
    probs = meta.get(OUTPUT_KIND_KEY, "logits") == "probs"
    g = QdqGraph(model, floats)
    fixed = g.types[g.input].tensor_type.shape.dim[0].dim_value or None
    feeds = [{g.input: b} for b in _chunks(images, fixed or CHUNK, fixed is not None)]
    key = _cache_key(int8_path, ref_path, images)
    cache_file = Path(cache) / f"sensitivity-{key[:24]}.json" if cache is not None else None
    done = _read_cache(cache_file, key)

    with stage(f"running {ref_path.name} (reference) on {len(images)} images", progress):
        ref = graph_logits(ref_path, images, threads)

    def score(outs: list[list[np.ndarray]]) -> tuple[float, float, float]:
        return _metrics(ref, _logits(outs, len(images), probs))

    plans = _variant_plans(g, table, done)
    with stage(f"running {int8_path.name} (every layer int8) on {len(images)} images", progress):
        outs, stored = _run_int8(g, plans, feeds, threads)
    base = score(outs)
    del outs
    _score_variants(g, plans, stored, score, done, functools.partial(_write_cache, cache_file, key), threads, progress)
    err = 1.0 - base[1]
    rows = [LayerSensitivity(node, module, op, *done[node], gain=(done[node][1] - base[1]) / err if err > 0 else 0.0)
            for node, op, module in table]
    rows.sort(key=lambda r: (-r.gain, -r.min_cosine, -r.top1_agreement))
    return SensitivityReport(rows, *base, images=len(images), data=description, graph=str(int8_path),
                             reference=str(ref_path), seconds=time.perf_counter() - start_time,
                             cached=len(table) - len(plans), cuts=len(g.cuts))


def _float_input_config(int8_path: Path, meta: dict[str, str], config: CvtConfig | None) -> CvtConfig | None:
    """The config to read check images with (a graph file's own, from its metadata), once the
    graph is known to take preprocessed float images."""
    if meta.get(INPUT_FORMAT_KEY, "float") != "float":
        raise CvtDeployError(f"{int8_path} takes {meta[INPUT_FORMAT_KEY]} pixels, not preprocessed float images",
                             "rank the float graphs (export without --input-format, rank, then embed the input)")
    if config is None and CONFIG_KEY in meta:
        config = CvtConfig.from_json(meta[CONFIG_KEY], f"{int8_path} (metadata_props {CONFIG_KEY})")
    return config


def _layers_to_rank(model: Any, int8_path: Path, layers: Sequence[str] | None) -> list[tuple[str, str, str]]:
    """The quantized layers, ``layers`` only where given (each must be quantized)."""
    table = quantized_layers(model)
    if layers is not None:
        from .export.names import resolve

        wanted = set(resolve(model, layers, "--rank-layers (layers=)"))
        if wanted - {n for n, _, _ in table}:
            raise CvtDeployError(f"not quantized in {int8_path}: {', '.join(sorted(wanted - {n for n, _, _ in table}))}",
                                 "name quantized layers (cvt-check --rank-int8 without --rank-layers lists them)")
        table = [row for row in table if row[0] in wanted]
    if not table:
        raise CvtDeployError(f"{int8_path} has no quantized layer (no Conv/MatMul/Gemm behind a DequantizeLinear)",
                             "rank an int8 Q/DQ graph (cvt-export --precision int8 writes model.int8.onnx)")
    return table


def _variant_plans(g: QdqGraph, table: list[tuple[str, str, str]],
                   done: dict[str, Any]) -> dict[str, tuple[dict[int, str], list[int], list[str]]]:
    """Per layer not yet measured: its float inputs, and the nodes its variant runs from the last
    cut before it, with the tensors they start from."""
    index = {n.name: i for i, n in enumerate(g.nodes)}
    plans = {}
    for node, _, _ in table:
        if node not in done:
            inputs = g.float_inputs(index[node])
            cut = g.cuts[bisect.bisect_right(g.cuts, g.limit(index[node], inputs)) - 1]
            plans[node] = (inputs, *g.suffix({index[node]: inputs}, cut))
    return plans


def _run_int8(g: QdqGraph, plans: dict[str, tuple[Any, list[int], list[str]]], feeds: list[dict[str, np.ndarray]],
              threads: int | None) -> tuple[list[list[np.ndarray]], list[dict[str, np.ndarray]]]:
    """The int8 graph once: its outputs per batch, and per batch the tensors the variants start from."""
    kept = sorted({t for _, _, frontier in plans.values() for t in frontier} - {g.input})
    session = ort_session(g.with_outputs(kept), threads)
    outs = [session.run([g.outputs[0], *kept], f) for f in feeds]
    return outs, [{**f, **dict(zip(kept, o[1:]))} for f, o in zip(feeds, outs)]


def _score_variants(g: QdqGraph, plans: dict[str, tuple[dict[int, str], list[int], list[str]]],
                    stored: list[dict[str, np.ndarray]], score: Callable[[list[list[np.ndarray]]], tuple[float, float, float]],
                    done: dict[str, tuple[float, float, float]], persist: Callable[[dict[str, Any]], None],
                    threads: int | None, progress: bool) -> None:
    """Each layer's variant run from its cut and scored into ``done``, persisted after each layer
    (an interrupted ranking resumes there)."""
    from onnx import helper

    index = {n.name: i for i, n in enumerate(g.nodes)}
    bar = Progress(len(plans), "  keeping each int8 layer float in turn", progress, unit="layers")
    try:
        for node in _interleaved(plans):
            inputs, keep, frontier = plans[node]
            typed = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(a.dtype), [None, *a.shape[1:]]
                                                   if a.ndim else []) for t in frontier for a in [stored[0][t]]]
            sess = ort_session(g.subgraph(keep, typed, {index[node]: inputs}).SerializeToString(), threads)
            done[node] = score([sess.run(None, {t: s[t] for t in frontier}) for s in stored])
            persist(done)
            bar.advance()
    finally:
        bar.close()


def graph_logits(graph: str | os.PathLike[str] | bytes, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    """A graph's logits on preprocessed ``images``, in batches it takes, as float64 (a probabilities
    graph's centred log-probabilities: what parity compares)."""
    session = ort_session(graph, threads)
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    probs = session.get_modelmeta().custom_metadata_map.get(OUTPUT_KIND_KEY, "logits") == "probs"
    feeds = _chunks(images, fixed or CHUNK, fixed is not None)
    return _logits([session.run(None, {inp.name: b}) for b in feeds], len(images), probs)


def _interleaved(plans: dict[str, tuple[Any, list[int], Any]]) -> list[str]:
    """Longest run first, shortest second, ...: Progress's time left is right early on."""
    order = sorted(plans, key=lambda n: -len(plans[n][1]))
    return [order[i // 2] if i % 2 == 0 else order[-1 - i // 2] for i in range(len(order))]


def _paths(source: Any, reference: Any) -> tuple[Path, Path, Any]:
    """int8 graph, fp32 graph, and the bundle's model config (None for graph files)."""
    from .bundle import Bundle

    if not isinstance(source, Bundle) and Path(source).is_dir():
        source = Bundle.open(source)
    if isinstance(source, Bundle):
        if reference is not None:
            raise CvtDeployError("a bundle brings its own fp32 graph: reference= is for an int8 graph file",
                                 "pass the bundle alone")
        # decision: the ranking is of the portable int8 graph against the portable fp32 graph, by definition
        int8, fp32 = source.find("onnx", "int8"), source.find("onnx", "fp32")
        if int8 is None or fp32 is None:
            raise CvtDeployError(f"{source.root} has no {'int8' if int8 is None else 'fp32'} ONNX graph to rank",
                                 f"export it with one: cvt-export --weights <its checkpoint> --precision int8 --out {source.root}")
        return source.verified_path(int8), source.verified_path(fp32), source.config
    if reference is None:
        raise CvtDeployError(f"ranking {source} needs the fp32 graph it was quantized from",
                             "pass reference=model.onnx, or rank the bundle folder")
    return Path(source), Path(reference), None


def _images(data: Any, config: Any, limit: int, where: Path, progress: bool) -> tuple[np.ndarray, str]:
    from .data import EvalData, load_eval_data

    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data[:limit], np.float32), f"{len(data[:limit])} given images"
    if config is None and not isinstance(data, EvalData):
        raise CvtDeployError(f"{where} carries no cvt-deploy config to read check images with",
                             "pass data= (EvalData or a preprocessed array), or rank a bundle")
    ev = (data if isinstance(data, EvalData) else load_eval_data(data, config, limit, progress)).held(progress=progress)
    images = ev.batch[:limit]
    return images, ev.description if len(images) == len(ev) else f"{ev.description}, the first {len(images)}"


def _load(int8: Any, reference: Any) -> tuple[Any, dict[str, Any]]:
    import onnx

    return onnx.load(str(int8)), {i.name: i for i in onnx.load(str(reference)).graph.initializer}


def _chunks(images: np.ndarray, size: int, fill: bool) -> list[np.ndarray]:
    """Batches of ``size`` images; ``fill``: the last one filled up with repeats (a fixed-batch graph)."""
    parts = [images[i:i + size] for i in range(0, len(images), size)]
    if fill and len(parts[-1]) < size:
        parts[-1] = np.concatenate([parts[-1], parts[-1][np.arange(size - len(parts[-1])) % len(parts[-1])]])
    return [np.ascontiguousarray(b) for b in parts]


def _logits(outs: list[list[np.ndarray]], n: int, probs: bool) -> np.ndarray:
    y = np.concatenate([o[0] for o in outs])[:n].astype(np.float64)
    if probs:  # a probabilities graph: log-probabilities, less their mean (parity.comparable)
        y = np.log(np.maximum(y, 1e-30))
        y -= y.mean(axis=1, keepdims=True)
    return y


def _metrics(ref: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(min cosine, mean cosine, top-1 agreement) of ``y`` against ``ref``."""
    if not np.isfinite(y).all():
        return (-1.0, -1.0, 0.0)
    cos = (ref * y).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return float(cos.min()), float(cos.mean()), float((ref.argmax(1) == y.argmax(1)).mean())


def _cache_key(int8: Path, ref: Path, images: np.ndarray) -> str:
    import onnxruntime

    parts = [CACHE_FORMAT, str(CACHE_VERSION), onnxruntime.__version__, file_sha256(int8), file_sha256(ref),
             str(images.shape), hashlib.sha256(images.tobytes()).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_cache(path: Path | None, key: str) -> dict[str, tuple[float, float, float]]:
    try:  # none, another key's or damaged: measured again (and rewritten)
        raw = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        ok = raw.get("format") == CACHE_FORMAT and raw.get("key") == key
        return {str(k): (float(v[0]), float(v[1]), float(v[2])) for k, v in raw["layers"].items()} if ok else {}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


def _write_cache(path: Path | None, key: str, done: dict[str, tuple[float, float, float]]) -> None:
    if path is not None:
        with contextlib.suppress(CvtDeployError, OSError):  # an unwritable cache costs a rerun, never the ranking
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
                                           "layers": {k: list(v) for k, v in done.items()}}))
