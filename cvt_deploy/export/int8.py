"""``quantize_int8``: an explicitly quantized (Q/DQ) int8 graph the way TensorRT wants it, written
by ONNX Runtime's quantizer from ranges calibrated by :mod:`cvt_deploy.export.calibrate` (its own
ranges, in seconds), with a cache of the ranges (see :mod:`cvt_deploy.export.precision`)."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CvtDeployError, require
from ..progress import Progress, track
from ..util import atomic_output, encode_metadata, file_sha256, scratch_dir, write_failure
from .calibrate import METHODS as CALIBRATED_HERE, calibrate, save_ranges, tensors_to_calibrate
# check_cache_location and CACHE_FORMAT stay importable from here (export/pipeline.py imports the first).
from .int8_cache import CACHE_FORMAT, CACHE_VERSION, cache_file, check_cache_location, read_cache, write_cache
from .int8_plan import Int8Plan, float_consumers, qdq_counts
from .onnx import save_graph, set_metadata_props
from .portable import flatten_weight_matmuls
from .precision import _check_fp32_source, _input_dims, _load, _quiet, _verify

#
# What is quantized (TensorRT's explicit-quantization rules): Q/DQ on the inputs of Conv,
# MatMul and Gemm only, symmetric int8 with zero point 0, weights per output channel. The token
# MatMuls are written as 2-D GEMMs first ([B*N, K] @ [K, M]): TensorRT 8.x's guide allows
# per-channel weights on a MatMul only when both inputs are 2-D (export/portable.py).
# Biases stay float: TensorRT rejects a DequantizeLinear of an int32 bias ("only activation
# types allowed as input to this layer", onnx/onnx-tensorrt#850) and fuses a float bias
# itself. Outputs of those ops stay float too (ORT's own advice for TensorRT). Everything
# else (LayerNormalization, Softmax, QuickGELU, residual Adds) never sees a Q/DQ.
#
# Calibration method, measured on the demo model (256 calibration images; compared with
# fp32 on the 1541 demo images outside the calibration split: top-1 agreement / mean
# logit cosine / smallest per-image cosine; fp32 accuracy 99.94%) and on CvT-13 with
# randomised weights (32 calibration photos, 66 held-out photos):
#
#                          demo                          CvT-13 random
#   minmax               99.87%  0.999977  0.9979      97.0%  0.999567  0.9994
#   percentile 99.99     99.94%  0.999959  0.9970      98.5%  0.999358  0.9990
#   percentile 99.999    99.94%  0.999978  0.9987      95.5%  0.999570  0.9993
#   entropy              100.0%  0.999891  0.9982      95.5%  0.999578  0.9994
#
# (agreement differences are 1-2 images: CvT-13's random-weight logits are nearly tied.)
# On the demo held-out split (360 images, fp32 99.72%) every method stays within one image
# of fp32 accuracy. The methods are statistically tied here; percentile 99.999 is the
# default because it ties minmax (best mean cosine) while, unlike minmax, a few extreme
# activation values in the calibration set cannot stretch a tensor's range, and it is cheaper
# than entropy. 99.99 clips visibly more (lower mean cosine on both models).
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "percentile"
PERCENTILE = 99.999
QUANTIZED_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
# MatMuls between two activations (q @ k^T and attn @ v). TensorRT runs them in int8 only
# when both inputs carry Q/DQ. Measured (minmax / percentile 99.99, mean logit cosine):
# quantizing them lowers the cosine on both models (demo 0.999977 -> 0.999971 and
# 0.999959 -> 0.999955; CvT-13 random 0.999567 -> 0.999559 and 0.999358 -> 0.999338),
# the Softmax output it needs quantized is a [0, 1] probability that symmetric int8 serves
# with 7 bits, and they are a modest share of the work (k/v are squeezed 4x by the stride-2
# projection: ~12% of CvT-13's 4.3 G multiply-adds, most of it in stage 1 where 3136 query
# tokens meet 784 keys). So they stay float by default; attention_matmuls=True quantizes
# them (both inputs get Q/DQ, so TensorRT may pick int8 kernels there).
DEFAULT_ATTENTION_MATMULS = False
CALIB_BATCH = 8  # images per calibration forward pass (bounds the memory of histogram methods)
_read_cache = read_cache  # the name callers before export/int8_cache.py import



class _Reader:
    """ONNX Runtime CalibrationDataReader over an NCHW batch, with a progress bar.

    ``set_range`` lets ``quantize_static`` (``CalibStridedMinMax``) feed one forward pass at
    a time to the calibrator, so histogram methods never hold all activations at once.
    """

    def __init__(self, name: str, batches: list[np.ndarray], show: bool) -> None:
        self.name = name
        self.batches = batches
        self.pos = self.end = 0
        self.bar = track(range(len(batches)), len(batches), "  calibrating", show)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        batch = self.batches[self.pos]
        self.pos += 1
        next(self.bar, None)
        return {self.name: batch}

    def finish(self) -> None:
        for _ in self.bar:  # draws the last step and ends the line
            pass


def _calib_batches(calib: np.ndarray, fixed_batch: int | None) -> list[np.ndarray]:
    size = fixed_batch or CALIB_BATCH
    if fixed_batch and len(calib) % size:
        # A fixed-batch graph takes only full batches: wrap around to fill the last one.
        pad = size - len(calib) % size
        calib = np.concatenate([calib, calib[np.arange(pad) % len(calib)]])
    return [np.ascontiguousarray(calib[i:i + size]) for i in range(0, len(calib), size)]


def _validate_calib(calib: Any, chw: tuple[int, ...]) -> np.ndarray:
    if not isinstance(calib, np.ndarray):
        raise CvtDeployError(f"calibration data must be a numpy array, got {type(calib).__name__}",
                             "load it with cvt_deploy.calibration.load_calibration")
    if calib.ndim != 4 or tuple(calib.shape[1:]) != tuple(chw) or len(calib) == 0:
        raise CvtDeployError(f"calibration batch has shape {tuple(calib.shape)}, the graph takes (N, {', '.join(map(str, chw))}) "
                             f"with N >= 1", "preprocess the images with the model's config (load_calibration does)")
    if calib.dtype != np.float32:
        raise CvtDeployError(f"calibration batch has dtype {calib.dtype}, expected float32 (preprocessed)",
                             "preprocess the images with the model's config (load_calibration does)")
    if not np.isfinite(calib).all():
        raise CvtDeployError("calibration batch has NaN or infinite values", "check how the batch was made")
    return np.ascontiguousarray(calib)


def calibration_key(src: str | os.PathLike[str], calib: np.ndarray, method: str) -> str:
    """sha256 of everything the activation ranges depend on: graph bytes, data, method."""

    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}/{CACHE_VERSION}\n".encode())
    h.update(file_sha256(src).encode())
    h.update(f"{calib.dtype}{tuple(calib.shape)}".encode())
    h.update(np.ascontiguousarray(calib).tobytes())
    h.update(json.dumps(_method_settings(method), sort_keys=True).encode())
    return h.hexdigest()


def _method_settings(method: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"method": method, "ops": list(QUANTIZED_OPS), "batch": CALIB_BATCH, "matmuls_2d": True}
    if method == "percentile":
        settings["percentile"] = PERCENTILE
    return settings


def _ort_cache_supported() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], calib: np.ndarray, *,
                  method: str = DEFAULT_METHOD, per_channel: bool = True,
                  cache: str | os.PathLike[str] | None = None,
                  attention_matmuls: bool = DEFAULT_ATTENTION_MATMULS, plan: Int8Plan | None = None,
                  progress: bool = True,
                  metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write an explicitly quantized (Q/DQ) int8 copy of the fp32 graph ``src`` to ``dst``.

    ``calib``: preprocessed NCHW float32 images (``cvt_deploy.calibration.load_calibration``).
    ``method``: "minmax", "percentile" or "entropy". ``per_channel``: one weight scale per
    output channel. ``cache``: a folder (one file per key) or a ``.json`` file where the
    activation ranges are stored, keyed by the fp32 graph + calibration data + method; a
    hit skips the calibration pass. ``attention_matmuls``: also quantize q@k^T and attn@v.
    ``plan``: the nodes left float, with no Q/DQ on their inputs (``int8_plan.plan_int8`` makes it
    from ``src``; recorded in the facts and the graph's metadata). The ranges are calibrated and
    cached for every plan alike.
    ``metadata``: further ``metadata_props`` entries to write with the graph (written once).
    Returns the facts for the manifest (method, samples, per_channel, quantized ops, cache).
    """
    require("onnx", "onnx", "INT8 quantization")
    require("onnxruntime", "onnx", "INT8 quantization")
    if method not in METHODS:
        raise CvtDeployError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    src, dst = Path(src), Path(dst)
    g = _read_source(src, calib, plan, attention_matmuls)
    quantize = _quantizer(g, method, per_channel)
    r = _plan_ranges(src, g, method, cache)
    reader = None if r.cached is not None or r.ours else _Reader(g.input_name, r.batches, progress)

    # Scratch beside dst (in the bundle being assembled), so a killed run leaves nothing elsewhere.
    with scratch_dir(dst.parent, "int8") as scratch, atomic_output(dst) as tmp:
        ranges_file = Path(scratch) / "ranges.json"
        source = Path(scratch) / "fp32-2d.onnx"
        save_graph(g.model, source, g.external)
        g.model = None  # the quantizer reads the file: the graph in memory is no longer needed
        _write_ranges(r, ranges_file, source, method, progress)
        try:
            with _quiet():
                quantize(str(source), str(tmp), reader, **r.handed_over(ranges_file))
        except CvtDeployError:
            raise
        except Exception as e:
            raise _failure(e, src, dst, r) from None
        finally:
            if reader is not None:
                reader.finish()
        r.store(ranges_file, method, len(g.calib))

        import onnx

        qmodel = onnx.load(str(tmp))
        float_consumers(qmodel, QUANTIZED_OPS, g.kept)
        info = _facts(qmodel, g, r, method, per_channel, attention_matmuls, plan)
        # The graph records what it is, not how this run went (cache hit or miss, which calibrator
        # made the same ranges), so that a cache hit reproduces the calibrated graph byte for byte.
        set_metadata_props(qmodel, {**encode_metadata({"precision": "int8", "conversion": {
            k: v for k, v in info.items() if k not in ("cache", "calibrator")}}),
                                    **(metadata or {})})
        save_graph(qmodel, tmp)
        _verify(tmp, "int8", g.chw, g.fixed_batch)
    return info


@dataclass
class _Source:
    """The fp32 graph as the quantizer gets it (token MatMuls 2-D), and what quantizing it needs."""

    model: Any  # None once written for the quantizer
    fixed_batch: int | None
    chw: tuple[int, ...]
    calib: np.ndarray
    input_name: str
    external: bool  # weights in external data (over 2 GB)
    excluded: list[str]  # the activation MatMuls, left float unless attention_matmuls
    kept: list[str]  # the plan's nodes, left float
    flattened: int  # token MatMuls made 2-D


def _read_source(src: Path, calib: Any, plan: Int8Plan | None, attention_matmuls: bool) -> _Source:
    model = _load(src)
    _check_fp32_source(model, src)
    fixed_batch, chw = _input_dims(model)
    calib = _validate_calib(calib, chw)
    input_name = model.graph.input[0].name
    external = any(i.data_location == 1 for i in model.graph.initializer)
    # quantize_static ignores MatMulConstBOnly in QDQ mode: exclude those MatMuls by name.
    excluded = [] if attention_matmuls else _activation_matmuls(model)
    kept = [n for n in (plan.nodes if plan else ()) if n not in excluded]
    unknown = sorted(set(kept) - {n.name for n in model.graph.node})
    if unknown:
        raise CvtDeployError(f"keep_float names nodes {src} does not have: {', '.join(unknown)}",
                             "make the list with cvt_deploy.export.int8_plan.plan_int8 from this graph")
    # TensorRT 8.x takes per-channel weight scales on a MatMul only when both inputs are 2-D.
    flattened = flatten_weight_matmuls(model)
    return _Source(model, fixed_batch, chw, calib, input_name, external, excluded, kept, flattened)


def _quantizer(g: _Source, method: str, per_channel: bool) -> Callable[..., None]:
    """ONNX Runtime's ``quantize_static`` with the settings TensorRT wants (module comment) bound:
    call it with (source, destination, reader or None, [calibration_cache_path])."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {
        "ActivationSymmetric": True,      # zero point 0 for activations (TensorRT requires it)
        "WeightSymmetric": True,          # ... and for weights
        "QuantizeBias": False,            # Conv biases stay float: TensorRT fuses them, it has no int32 DQ
        # Q/DQ on the inputs of the weighted ops only; their outputs stay float.
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
        # One Q/DQ pair per consumer, as ORT recommends for TensorRT (a pair is not shared
        # between nodes, e.g. the q/k/v projections of one feature map).
        "DedicatedQDQPair": True,
        "CalibStridedMinMax": 1,          # one forward pass per collect: bounded memory, live progress
    }
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
        extra["CalibTensorRangeSymmetric"] = True
    ort_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[method]
    return functools.partial(quantize_static, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                             per_channel=per_channel, reduce_range=False, activation_type=QuantType.QInt8,
                             weight_type=QuantType.QInt8, calibrate_method=ort_method,
                             use_external_data_format=g.external, nodes_to_exclude=[*g.excluded, *g.kept],
                             extra_options=extra)


@dataclass(frozen=True)
class _Ranges:
    """Where the activation ranges come from: the cache, our calibrator, or ONNX Runtime's."""

    key: str
    cache_path: Path | None
    supported: bool  # this onnxruntime takes ranges from a calibration cache file
    cached: dict[str, Any] | None
    ours: bool
    batches: list[np.ndarray]
    tensors: list[str]  # what our calibrator measures (none on a cache hit or with ONNX Runtime's)

    def handed_over(self, ranges_file: Path) -> dict[str, Any]:
        """quantize_static's keyword that hands it the ranges in ``ranges_file`` (none: it calibrates)."""
        return {"calibration_cache_path": str(ranges_file)} if self.supported and (
            self.cache_path is not None or self.ours) else {}

    def store(self, ranges_file: Path, method: str, samples: int) -> None:
        """The ranges used into the cache, where one was asked for and missed."""
        if self.cache_path is not None and self.supported and self.cached is None:
            write_cache(self.cache_path, self.key, method, samples, json.loads(ranges_file.read_text()))


def _plan_ranges(src: Path, g: _Source, method: str, cache: str | os.PathLike[str] | None) -> _Ranges:
    key = calibration_key(src, g.calib, method)
    cache_path = cache_file(Path(cache), key) if cache is not None else None
    supported = _ort_cache_supported()
    cached = read_cache(cache_path, key) if cache_path is not None and supported else None
    # Our calibrator (export/calibrate.py: seconds, bounded memory) hands ONNX Runtime its ranges
    # through the calibration cache file; entropy, and an onnxruntime without that file, use its own.
    ours = supported and method in CALIBRATED_HERE
    batches = _calib_batches(g.calib, g.fixed_batch)
    tensors = tensors_to_calibrate(g.model, QUANTIZED_OPS, g.excluded) if ours and cached is None else []
    return _Ranges(key, cache_path, supported, cached, ours, batches, tensors)


def _write_ranges(r: _Ranges, ranges_file: Path, source: Path, method: str, progress: bool) -> None:
    """The cached ranges, or those our calibrator measures on ``source``, into ``ranges_file``."""
    if r.cached is not None:
        ranges_file.write_text(json.dumps(r.cached))
    elif r.tensors:
        bar = Progress(sum(len(b) for b in r.batches), "  calibrating", progress, unit="images")
        try:
            ranges = calibrate(source, r.batches, r.tensors, method, progress=bar,
                               percentile=PERCENTILE if method == "percentile" else None)
        finally:
            bar.close()
        save_ranges(ranges, method, ranges_file)


def _failure(e: Exception, src: Path, dst: Path, r: _Ranges) -> CvtDeployError:
    """What to say when the quantizer raised: a refused write, stale cached ranges, or its own error."""
    written = write_failure(e, dst)
    if written is not None:
        return written
    if r.cached is not None:
        return CvtDeployError(f"int8 quantization with the cached calibration ranges in {r.cache_path} failed "
                              f"({type(e).__name__}: {str(e)[:200]})",
                              f"delete {r.cache_path}: the next export calibrates again and rewrites it")
    return CvtDeployError(f"int8 quantization of {src} failed: {type(e).__name__}: {str(e)[:300]}",
                          "report this with the fp32 graph; try another --calib-method meanwhile")


def _facts(qmodel: Any, g: _Source, r: _Ranges, method: str, per_channel: bool, attention_matmuls: bool,
           plan: Int8Plan | None) -> dict[str, Any]:
    """What the manifest records of this int8 graph."""
    return {
        "precision": "int8",
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ)",
        "method": method,
        **({"percentile": PERCENTILE} if method == "percentile" else {}),
        "samples": int(len(g.calib)),
        "per_channel": bool(per_channel),
        "symmetric": True,
        "quantized_ops": list(QUANTIZED_OPS),
        "matmuls_2d": g.flattened,
        "attention_matmuls": bool(attention_matmuls),
        "calibrator": "cvt-deploy (export/calibrate.py)" if r.ours else "onnxruntime",
        "cache": ("hit" if r.cached is not None else "miss") if r.cache_path is not None and r.supported
        else ("unsupported by this onnxruntime" if r.cache_path is not None else "off"),
        "cache_key": r.key[:24],
        **qdq_counts(qmodel),
        **(plan.recorded() if plan else {}),
    }


def narrow_weights(model: Any, limit: int) -> int:
    """Requantize the int8 weights of a Q/DQ graph (in place) to ``-limit..limit``, their scales
    widened to match: ``q' = round(q * limit / 127)``, ``s' = s * 127 / limit``. Returns how many
    weight tensors changed. For kernels whose 8-bit products overflow (cvt_deploy.cpu: 7 bits,
    ``limit`` 64, for OpenVINO on CPUs without VNNI); the ranges of the activations stay as calibrated.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    factor = limit / 127.0
    done: set[str] = set()
    scales: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in done or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        scale_name = node.input[1]
        zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if q.dtype != np.int8 or scale_name not in inits or (zero is not None and np.any(zero)):
            continue  # only symmetric int8 weights (all quantize_int8 writes)
        scale = numpy_helper.to_array(inits[scale_name])
        narrowed = np.clip(np.round(q.astype(np.float32) * factor), -limit, limit).astype(np.int8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(narrowed, node.input[0]))
        if scale_name not in scales:  # a scale shared by several weights is widened once
            inits[scale_name].CopyFrom(numpy_helper.from_array((scale / factor).astype(scale.dtype), scale_name))
        done.add(node.input[0])
        scales.add(scale_name)
    return len(done)


def _activation_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls whose inputs are both activations (q @ k^T, attn @ v)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
