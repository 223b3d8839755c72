"""``calibrate``: the activation ranges of an int8 graph, from one pass of ONNX Runtime over the
calibration images, with each statistic computed inside the graph.

Why not ONNX Runtime's own calibrator (what ``quantize_int8`` used before): it makes every input
and output of every Conv/MatMul/Gemm a graph output, copies them into numpy per batch, and bins
them with ``np.histogram`` against an array of edges (a binary search per value). On CvT-13 at
224 px, 256 images, 2 cores, that took 738 s on an AVX2 EPYC and 360 s on an AVX-512 one,
mostly on one core, with 2.9 GB resident; this takes 21 s on the AVX-512 one (its plain forward
pass: 15 s).

Here the fp32 graph gets, for each tensor that will be quantized (the activation inputs of the
quantized ops, nothing else), a few nodes that reduce it to what the method needs, and only
those few numbers leave the session: the forward pass runs on every core, and memory is the
forward pass's own.

* ``minmax``: ReduceMin and ReduceMax.
* ``percentile``: the ``k`` largest ``|x|`` (TopK), ``k`` sized so that every value above the
  percentile of the *whole* calibration set is among them whichever batch it comes from, and
  the first batch's smallest ``|x|``. From these the threshold is the one ONNX Runtime's
  histogram gives (2048 bins over the first batch's ``|x|``, grown batch by batch; the lower edge
  of the bin that holds the percentile): the same ranges, bit for bit (the graph runs unoptimized,
  as ONNX Runtime's calibrator runs it), as every bundle exported with its calibrator, so the int8
  graphs and their accuracy are unchanged.

``entropy`` needs whole histograms: it stays with ONNX Runtime's calibrator (``quantize_int8``).
Torch-free; needs onnx and onnxruntime.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..progress import Progress
from ..util import ort_session

METHODS = ("minmax", "percentile")  # what this module calibrates; entropy is ONNX Runtime's
HISTOGRAM_BINS = 2048  # ONNX Runtime's PercentileCalibrater num_bins (what its ranges are reproduced from)
TAIL_INPUT = "cvt_calib_tail"  # per batch: how many of its values per value of the whole set are kept


def tensors_to_calibrate(model: Any, ops: Sequence[str], excluded: Sequence[str] = ()) -> list[str]:
    """The activation inputs of the ``ops`` nodes (not ``excluded`` ones) that ONNX Runtime's QDQ
    quantizer asks a range for: no initializers, no constants, each tensor once, in graph order."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    skip = set(excluded)
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in ops and node.name not in skip:
            # Conv's third input and Gemm's C are biases: left float (QuantizeBias off).
            for name in node.input[:2]:
                if name and name not in constants and name not in out:
                    out.append(name)
    return out


def _augmented(model: Any, tensors: Sequence[str], method: str) -> Any:
    """``model`` with its outputs replaced by each tensor's statistics (names ``<t>:min``, ...)."""
    from onnx import TensorProto, helper

    g = model.graph
    del g.output[:]
    if method == "percentile":
        g.input.append(helper.make_tensor_value_info(TAIL_INPUT, TensorProto.FLOAT, []))
        # [-1]: a Reshape's "flatten" and a ReduceSum's "last axis"; [1]: one more
        g.initializer.extend([helper.make_tensor("cvt_calib_minus_one", TensorProto.INT64, [1], [-1]),
                              helper.make_tensor("cvt_calib_one", TensorProto.INT64, [1], [1])])
    nodes = []
    outs: list[tuple[str, list[Any] | None]]
    for i, t in enumerate(tensors):
        p = f"cvt_calib_{i}_"
        if method == "minmax":
            nodes += [helper.make_node("ReduceMin", [t], [f"{t}:min"], keepdims=0, name=p + "min"),
                      helper.make_node("ReduceMax", [t], [f"{t}:max"], keepdims=0, name=p + "max")]
            outs = [(f"{t}:min", []), (f"{t}:max", [])]
        else:
            # k = min(ceil(size * tail) + 1, size): the batch's share of the set's tail, and one more.
            nodes += [helper.make_node("Abs", [t], [p + "abs"]),
                      helper.make_node("Reshape", [p + "abs", "cvt_calib_minus_one"], [p + "flat"]),
                      helper.make_node("Size", [t], [f"{t}:size"]),
                      helper.make_node("Cast", [f"{t}:size"], [p + "sizef"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [p + "sizef", TAIL_INPUT], [p + "kf"]),
                      helper.make_node("Ceil", [p + "kf"], [p + "kc"]),
                      helper.make_node("Cast", [p + "kc"], [p + "k0"], to=TensorProto.INT64),
                      helper.make_node("Add", [p + "k0", "cvt_calib_one"], [p + "k1"]),
                      helper.make_node("Min", [p + "k1", f"{t}:size"], [p + "k"]),
                      helper.make_node("TopK", [p + "flat", p + "k"], [f"{t}:top", p + "idx"], axis=0),
                      helper.make_node("ReduceMin", [p + "abs"], [f"{t}:absmin"], keepdims=0, name=p + "absmin"),
                      # how many |x| fall below the histogram's first edge (fed in): ORT's histogram leaves
                      # them out. Counted in float along the last axis (each partial count exact), added
                      # up outside: ORT's int64 ReduceSum took a third of the pass on CvT-13.
                      helper.make_node("Less", [p + "abs", p + "floor"], [p + "below"]),
                      helper.make_node("Cast", [p + "below"], [p + "belowf"], to=TensorProto.FLOAT),
                      helper.make_node("ReduceSum", [p + "belowf", "cvt_calib_minus_one"], [f"{t}:below"], keepdims=0)]
            g.input.append(helper.make_tensor_value_info(p + "floor", TensorProto.FLOAT, []))
            outs = [(f"{t}:top", [None]), (f"{t}:size", []), (f"{t}:absmin", []), (f"{t}:below", None)]
        g.output.extend(helper.make_tensor_value_info(name, TensorProto.INT64 if name.endswith(":size") else
                                                      TensorProto.FLOAT, shape) for name, shape in outs)
    g.node.extend(nodes)
    return model


def calibrate(src: str | os.PathLike[str], batches: Sequence[np.ndarray], tensors: Sequence[str], method: str, *,
              percentile: float | None = None, progress: Progress | None = None) -> dict[str, tuple[float, float]]:
    """The range ``(lowest, highest)`` of each of ``tensors`` of the fp32 graph ``src`` over
    ``batches`` (preprocessed NCHW float32), by ``method`` (:data:`METHODS`). ``percentile``
    (that method's): the share of ``|x|`` inside the symmetric range ``(-t, t)``, e.g. 99.999.
    ``progress`` advances by images."""
    import onnx

    if method not in METHODS or (method == "percentile") != (percentile is not None):
        raise ValueError(f"calibrate() computes {', '.join(METHODS)} (percentile with a percentile), "
                         f"not {method!r} with percentile={percentile!r}")
    model = _augmented(onnx.load(str(src)), tensors, method)
    # Saved beside the source (its external data, if any, resolves there too), then dropped.
    aug = Path(src).with_name(Path(src).stem + ".calibrate.onnx")
    from .onnx import save_graph

    save_graph(model, aug)
    del model
    # Unoptimized, as ONNX Runtime's calibrator runs it: the same tensors to the last bit, so the same
    # ranges (fusing made ranges one float step apart, which moved a random CvT-13's agreement by an
    # image); no slower here (CvT-13, 256 images: 21.0 s against 21.9 s optimized).
    session = ort_session(aug, optimize=False)  # ONNX Runtime's default threads, as its calibrator: every core
    input_name = session.get_inputs()[0].name
    total = sum(len(b) for b in batches)
    tail = (100.0 - (percentile or 0.0)) / 100.0
    lo = dict.fromkeys(tensors, math.inf)
    hi = dict.fromkeys(tensors, -math.inf)
    tails = {t: _Tail() for t in tensors}
    names = [o.name for o in session.get_outputs()]
    try:
        for batch in batches:
            feed: dict[str, Any] = {input_name: batch}
            if method == "percentile":
                feed[TAIL_INPUT] = np.array(tail * total / len(batch), np.float32)
                feed.update({f"cvt_calib_{i}_floor": np.array(tails[t].floor(), np.float32) for i, t in enumerate(tensors)})
            got = dict(zip(names, session.run(names, feed)))
            for t in tensors:
                if method == "minmax":
                    lo[t] = min(lo[t], float(got[f"{t}:min"]))
                    hi[t] = max(hi[t], float(got[f"{t}:max"]))
                else:
                    below = int(got[f"{t}:below"].astype(np.int64).sum())
                    tails[t].add(got[f"{t}:top"], got[f"{t}:absmin"], int(got[f"{t}:size"]) - below)
            if progress is not None:
                progress.advance(len(batch))
    finally:
        del session
        aug.unlink(missing_ok=True)
        aug.with_name(aug.name + ".data").unlink(missing_ok=True)
    if method == "minmax":
        return {t: (lo[t], hi[t]) for t in tensors}
    assert percentile is not None
    return {t: (-edge, edge) for t in tensors for edge in [tails[t].threshold(percentile)]}


class _Tail:
    """What decides one tensor's threshold in ONNX Runtime's percentile histogram of ``|x|``
    (``HistogramCollector``: 2048 bins over the first batch's ``|x|``, bins of the same width
    appended as later batches reach further; the threshold is the lower edge of the first bin
    where the cumulative share reaches the percentile): the bins its largest values fall in,
    each batch's binned as ONNX Runtime bins that batch, and how many values it counts.

    Every value above the threshold is among the ``k`` largest kept of its batch (``k`` exceeds
    the whole set's tail), so the counts from the top down are exact where the share crosses the
    percentile: the same bin, hence the same range, as ONNX Runtime's calibrator gives."""

    def __init__(self) -> None:
        self.edges: np.ndarray | None = None  # as ONNX Runtime stores them after each batch (float32)
        self.bins: list[np.ndarray] = []
        self.count = 0  # values its histogram holds: those below its first edge or past its last are left out

    def floor(self) -> float:
        return 0.0 if self.edges is None else float(self.edges[0])

    def add(self, largest: np.ndarray, smallest: np.ndarray, count: int) -> None:
        used, self.edges = _grow_edges(self.edges, smallest, largest.max())
        # np.histogram leaves out values past the last edge (np.arange can stop short of the largest)
        over = int(np.count_nonzero(largest > used[-1]))
        self.count += count - over
        j = np.searchsorted(used, largest, side="right") - 1
        j[largest == used[-1]] = len(used) - 2  # np.histogram's last bin is closed on the right
        self.bins.append(j[(j >= 0) & (j < len(used) - 1)])

    def threshold(self, percentile: float) -> float:
        assert self.edges is not None, "no batch was added"
        counts = np.bincount(np.concatenate(self.bins), minlength=len(self.edges) - 1)
        above = np.append(np.cumsum(counts[::-1])[::-1][1:], 0)  # [j]: kept values in bins above j
        j = int(np.searchsorted((self.count - above) / self.count, percentile / 100.0))
        return float(self.edges[min(j, len(self.edges) - 2)])


def _grow_edges(edges: np.ndarray | None, smallest: np.ndarray, largest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bin edges ONNX Runtime bins a batch with, and those it keeps afterwards, made by its
    own numpy calls (``collect_absolute_value``): the first batch's 2048 bins in float32; bins
    appended by ``np.arange``, which gives float64 (that batch is binned with them), kept as float32."""
    if edges is None:
        first = np.histogram_bin_edges(np.array([smallest, largest], np.float32), bins=HISTOGRAM_BINS)
        return first, first.astype(np.float32)
    if largest > edges[-1]:
        width = edges[1] - edges[0]
        used = np.hstack((edges, np.arange(edges[-1] + width, largest + width, width)))
        return used, used.astype(np.float32)
    return edges, edges


def save_ranges(ranges: dict[str, tuple[float, float]], method: str, path: str | os.PathLike[str]) -> None:
    """Write ``ranges`` as ONNX Runtime's calibration cache (``quantize_static(calibration_cache_path=)``
    reads it and skips its own calibration), in ONNX Runtime's own format, by its own writer."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    ort_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    data = {t: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for t, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(ort_method, data), path)
