"""``quantize_int8``: an explicitly quantized (Q/DQ) int8 graph the way TensorRT wants it, written
by ONNX Runtime's quantizer from ranges calibrated by :mod:`cvt_deploy.export.calibrate` (its own
ranges, in seconds), with a cache of the ranges (see :mod:`cvt_deploy.export.precision`)."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import CvtDeployError, require
from ..progress import Progress, track
from ..jsonio import read_json
from ..util import atomic_output, encode_metadata, file_sha256, scratch_dir, write_failure
from .calibrate import METHODS as CALIBRATED_HERE, calibrate, save_ranges, tensors_to_calibrate
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
CACHE_FORMAT = "cvt-deploy-calibration"
CACHE_VERSION = 1  # export/calibrate.py gives ONNX Runtime's ranges: caches of either serve both



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


def check_cache_location(cache: Path) -> Path:
    """``cache`` if it is a folder, a path to create, or one of our cache files; a user's
    other file is never overwritten with a cache."""
    if cache.is_dir() or not cache.exists():
        return cache
    if cache.is_file() and cache.suffix.lower() == ".json":
        with contextlib.suppress(OSError, ValueError):
            raw = read_json(cache)
            if isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT:
                return cache
    raise CvtDeployError(f"--calib-cache {cache} is an existing file that is not a cvt-deploy calibration cache; "
                         "refusing to overwrite it",
                         "pass a folder (one cache file per model and data is kept inside) or a new FILE.json; "
                         "if it is a damaged cache of ours, delete it")


def _cache_file(cache: Path, key: str) -> Path:
    """``cache`` is a folder (one file per key inside) or a single ``.json`` file."""
    check_cache_location(cache)
    if cache.is_dir() or (not cache.exists() and cache.suffix.lower() != ".json"):
        return cache / f"calib-{key[:24]}.json"
    return cache


def _finite_number(v: Any) -> bool:
    if isinstance(v, dict):  # ORT serialises numpy values as {"data": x or [x], "dtype": ..., "CLS": "numpy.array"}
        v = v.get("data")
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached ranges for ``key``; None (calibrate again, then rewrite it) when missing,
    for other data, or damaged (said on stderr, naming the file: a cache never fails an export)."""
    if not path.exists():
        return None
    try:
        raw = read_json(path)
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            raise ValueError("not a cvt-deploy calibration cache")
        if raw.get("key") != key:
            return None
        ranges = raw.get("ranges")
        data = ranges.get("data") if isinstance(ranges, dict) else None
        if not isinstance(data, dict) or not data:
            raise ValueError("it holds no ranges")
        for name, r in data.items():
            if not (isinstance(r, dict) and _finite_number(r.get("lowest")) and _finite_number(r.get("highest"))):
                raise ValueError(f"the range of {name!r} is not two finite numbers")
        return ranges
    except (OSError, ValueError) as e:
        print(f"  note: ignoring the damaged calibration cache {path} ({e}); calibrating again and rewriting it",
              file=sys.stderr)
        return None


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

    key = calibration_key(src, calib, method)
    cache_path = _cache_file(Path(cache), key) if cache is not None else None
    cache_supported = _ort_cache_supported()
    cached = _read_cache(cache_path, key) if cache_path is not None and cache_supported else None
    # Our calibrator (export/calibrate.py: seconds, bounded memory) hands ONNX Runtime its ranges
    # through the calibration cache file; entropy, and an onnxruntime without that file, use its own.
    ours = cache_supported and method in CALIBRATED_HERE
    batches = _calib_batches(calib, fixed_batch)
    reader = None if cached is not None or ours else _Reader(input_name, batches, progress)
    tensors = tensors_to_calibrate(model, QUANTIZED_OPS, excluded) if ours and cached is None else []

    # Scratch beside dst (in the bundle being assembled), so a killed run leaves nothing elsewhere.
    with scratch_dir(dst.parent, "int8") as scratch, atomic_output(dst) as tmp:
        kwargs: dict[str, Any] = {}
        ranges_file = Path(scratch) / "ranges.json"
        source = Path(scratch) / "fp32-2d.onnx"
        save_graph(model, source, external)
        del model
        if cached is not None:
            ranges_file.write_text(json.dumps(cached))
        elif tensors:
            bar = Progress(sum(len(b) for b in batches), "  calibrating", progress, unit="images")
            try:
                ranges = calibrate(source, batches, tensors, method, progress=bar,
                                   percentile=PERCENTILE if method == "percentile" else None)
            finally:
                bar.close()
            save_ranges(ranges, method, ranges_file)
        if cache_supported and (cache_path is not None or ours):
            kwargs["calibration_cache_path"] = str(ranges_file)
        try:
            with _quiet():
                quantize_static(str(source), str(tmp), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                                reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=ort_method, use_external_data_format=external,
                                nodes_to_exclude=[*excluded, *kept],
                                extra_options=extra, **kwargs)
        except CvtDeployError:
            raise
        except Exception as e:
            written = write_failure(e, dst)
            if written is not None:
                raise written from None
            if cached is not None:
                raise CvtDeployError(f"int8 quantization with the cached calibration ranges in {cache_path} failed "
                                     f"({type(e).__name__}: {str(e)[:200]})",
                                     f"delete {cache_path}: the next export calibrates again and rewrites it") from None
            raise CvtDeployError(f"int8 quantization of {src} failed: {type(e).__name__}: {str(e)[:300]}",
                                 "report this with the fp32 graph; try another --calib-method meanwhile") from None
        finally:
            if reader is not None:
                reader.finish()
        if cache_path is not None and cache_supported and cached is None:
            _write_cache(cache_path, key, method, len(calib), json.loads(ranges_file.read_text()))

        import onnx

        qmodel = onnx.load(str(tmp))
        float_consumers(qmodel, QUANTIZED_OPS, kept)
        info: dict[str, Any] = {
            "precision": "int8",
            "quantizer": "onnxruntime.quantization.quantize_static (QDQ)",
            "method": method,
            **({"percentile": PERCENTILE} if method == "percentile" else {}),
            "samples": int(len(calib)),
            "per_channel": bool(per_channel),
            "symmetric": True,
            "quantized_ops": list(QUANTIZED_OPS),
            "matmuls_2d": flattened,
            "attention_matmuls": bool(attention_matmuls),
            "calibrator": "cvt-deploy (export/calibrate.py)" if ours else "onnxruntime",
            "cache": ("hit" if cached is not None else "miss") if cache_path is not None and cache_supported
            else ("unsupported by this onnxruntime" if cache_path is not None else "off"),
            "cache_key": key[:24],
            **qdq_counts(qmodel),
            **(plan.recorded() if plan else {}),
        }
        # The graph records what it is, not how this run went (cache hit or miss, which calibrator
        # made the same ranges), so that a cache hit reproduces the calibrated graph byte for byte.
        set_metadata_props(qmodel, {**encode_metadata({"precision": "int8", "conversion": {
            k: v for k, v in info.items() if k not in ("cache", "calibrator")}}),
                                    **(metadata or {})})
        save_graph(qmodel, tmp)
        _verify(tmp, "int8", chw, fixed_batch)
    return info


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


def _write_cache(path: Path, key: str, method: str, samples: int, ranges: dict[str, Any]) -> None:
    import onnxruntime

    payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "method": method, "samples": samples,
               "onnxruntime": onnxruntime.__version__, "ranges": ranges}
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(payload))
    except (CvtDeployError, OSError) as e:  # an unwritable cache must not fail the export
        print(f"  note: calibration cache not written: {getattr(e, 'message', e)}", file=sys.stderr)
