"""OpenVINO backend: a bundle's portable ONNX graphs on an x86 CPU. Imports no torch and no
onnx: ``cvt-deploy`` and ``openvino`` alone run it.

OpenVINO reads the ONNX graphs as they are (its ONNX frontend) and compiles them for its
CPU plugin; a Q/DQ int8 graph runs its quantized MatMuls and convolutions as int8. The
ONNX Runtime CPU graphs of a bundle (export/ort_cpu.py) are built for ORT's kernels and
are not used here.

Precision is what the graph says, never less: OpenVINO's CPU plugin would compute an fp32
graph in bf16 on CPUs with AMX or AVX512-BF16 (its default ``INFERENCE_PRECISION_HINT``),
which misses the fp32 parity gate by ~40x, so fp32 and int8 graphs are compiled with the
hint f32 (int8: the ops left unquantized, as on ONNX Runtime). fp16 graphs compute in f16
where the CPU has fp16 arithmetic (AVX512-FP16, AMX-FP16) and in f32 elsewhere; describe()
says which, since f32 is then more precise than the graph.

Thread safety: a compiled model serves any number of infer requests at once; one request
runs one call at a time. ``run`` takes an idle request from a pool (making one when all are
busy) and puts it back afterwards, so one runtime serves several threads, each call on its
own request.
"""
from __future__ import annotations

import importlib.util
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config import CvtConfig
from ..errors import CvtDeployError, require
from ..util import INPUT_FORMAT_KEY, OUTPUT_KIND_KEY, BatchRange
from .base import Runtime
from .graph import check_graph_io, graph_identity

if TYPE_CHECKING:
    from ..bundle import Bundle

DEVICES = {"cpu": "CPU"}
# OpenVINO's own words for the arithmetic the CPU plugin is asked to use.
F32, F16 = "f32", "f16"
MAX_STATIC_BATCHES = 8  # batch sizes kept compiled for a graph that compiles only with a static batch


def _message(e: BaseException) -> str:
    """The sentence in an OpenVINO error, without its source-file locations and check expressions."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    said = [ln for ln in lines if ln and not ln.startswith(("Exception from ", "Check '", "FrontEnd API failed"))]
    return " ".join(said or lines[:1])[:300] or type(e).__name__


def compile_config(threads: int | None, precision_hint: str) -> dict[str, Any]:
    """The CPU plugin's settings for one latency-bound call at a time (cvt-bench's rows, cvt-predict)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRuntime(Runtime):
    backend: ClassVar[str] = "openvino"
    artifact_kind: ClassVar[str] = "onnx"
    install_hint: ClassVar[str] = "pip install 'cvt-deploy[openvino]'"

    def __init__(self, path: str | os.PathLike[str], config: CvtConfig | None = None, precision: str | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        """``config``/``precision`` None: read from the graph's cvt-deploy metadata_props."""
        require("openvino", "openvino", "The OpenVINO backend")
        import openvino as ov
        from openvino.frontend import FrontEndManager

        try:
            # The ONNX frontend itself, not Core.read_model: that one tries every other frontend
            # (TensorFlow, PaddlePaddle ...) on a file ONNX cannot parse, and they print to stderr.
            frontend = FrontEndManager().load_by_framework("onnx")
            model = frontend.convert(frontend.load(str(path)))
        except Exception as e:  # OpenVINO raises GeneralFailure, RuntimeError ...
            raise CvtDeployError(f"OpenVINO cannot read {path}: {_message(e)}",
                                 "the file is truncated or corrupt, or not an ONNX model: re-export it with cvt-export") from None
        # OpenVINO hands the graph's metadata_props over as the model's "framework" rt_info.
        meta = {k: v.astype(str) for k, v in model.get_rt_info(["framework"]).astype(dict).items()} \
            if model.has_rt_info(["framework"]) else {}
        config, precision = graph_identity(meta, path, config, precision)
        super().__init__(config, precision, device)
        self.set_io(meta.get(INPUT_FORMAT_KEY), meta.get(OUTPUT_KIND_KEY), f"{path} (metadata_props)")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise CvtDeployError(f"{path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs, not one of each",
                                 "the graph was edited after export: re-export it with cvt-export")
        inp, out = model.inputs[0], model.outputs[0]
        in_shape, out_shape = _dims(inp.get_partial_shape()), _dims(out.get_partial_shape())
        check_graph_io(path, config, self.input_format, str(inp.get_element_type()),
                       inp.get_element_type() == ov.Type.u8, in_shape, out_shape)
        if isinstance(in_shape[0], int):  # a static batch: the base class pads and splits to it
            self.batch_range = BatchRange(in_shape[0], in_shape[0], in_shape[0])
        core = ov.Core()
        self.compute = F16 if precision == "fp16" and "FP16" in _capabilities(core) else F32
        self.compiled: Any = None
        self._compile = lambda m: core.compile_model(m, DEVICES[device], compile_config(threads, self.compute))  # noqa: E731
        # Per batch size, when the graph compiles only with a static batch (see _compiled_for).
        self._model: Any = None
        self._by_batch: dict[int, tuple[Any, queue.SimpleQueue[Any]]] = {}
        self._lock = threading.Lock()
        self.threads = threads
        self.path = str(path)
        try:
            self.compiled = self._compile(model)
        except Exception as e:
            # OpenVINO 2026.4's low-precision passes fail on some int8 graphs with a dynamic batch
            # (a dequantizing Multiply moved through a head-splitting Reshape) and compile them
            # with a static one: then the runtime compiles one model per batch size it is given.
            if in_shape[0] is None:
                try:
                    self._model = model
                    self._compiled_for(1)
                except Exception:
                    self._model = None
            if self._model is None:
                raise CvtDeployError(f"OpenVINO cannot compile {path} for its {DEVICES[device]} plugin: {_message(e)}",
                                     "run cvt-check on the bundle with --backend onnxruntime; if that passes, "
                                     "report the graph and the OpenVINO version") from None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed"
        device = device or "cpu"
        if device not in DEVICES:
            return f"the openvino backend runs on {', '.join(DEVICES)}, not {device!r}"
        return None

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> OpenVinoRuntime:
        """The bundle's portable ONNX graph of ``precision`` (default the most precise one)."""
        device = device or "cpu"
        reason = cls.unavailable_reason(device)
        if reason is not None:
            raise CvtDeployError(f"backend openvino cannot run here: {reason}", cls.install_hint)
        art = bundle.require("onnx", precision)
        return cls(bundle.verified_path(art), bundle.config, art.precision, device, threads)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str], device: str | None = None, threads: int | None = None) -> OpenVinoRuntime:
        """A runtime for a bare .onnx exported by cvt-deploy (its metadata_props say what it is)."""
        return cls(path, None, None, device or "cpu", threads)

    def describe(self) -> str:
        if self.precision == "fp16" and self.compute == F32:
            return super().describe() + " (computed in f32: this CPU has no fp16 arithmetic)"
        if self._model is not None:
            return super().describe() + " (compiled per batch size: OpenVINO cannot compile this graph with a dynamic batch)"
        return super().describe()

    def _compiled_for(self, n: int) -> tuple[Any, queue.SimpleQueue[Any]]:
        """The model compiled for batches of exactly ``n`` and its idle requests (made once, kept;
        the oldest is dropped beyond :data:`MAX_STATIC_BATCHES` sizes)."""
        with self._lock:
            if n not in self._by_batch:
                model = self._model.clone()
                model.reshape({model.inputs[0]: [n, *model.inputs[0].get_partial_shape()[1:]]})
                if len(self._by_batch) >= MAX_STATIC_BATCHES:
                    self._by_batch.pop(next(iter(self._by_batch)))
                self._by_batch[n] = (self._compile(model), queue.SimpleQueue())
            return self._by_batch[n]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        compiled, idle = (self.compiled, self._idle) if self.compiled is not None else self._compiled_for(len(batch))
        try:
            request = idle.get_nowait()
        except queue.Empty:  # every request is busy in another thread (or none made yet)
            request = compiled.create_infer_request()
        try:
            # share_outputs=False: the result is a copy, not the request's buffer the next call reuses.
            out = request.infer({0: batch}, share_inputs=True, share_outputs=False)[0]
        except Exception as e:
            raise CvtDeployError(f"OpenVINO failed on a batch of shape {batch.shape} with {self.path}: {_message(e)}",
                                 "run cvt-check on the bundle; if it fails too, re-export it with cvt-export") from None
        idle.put(request)
        return np.asarray(out)

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait()
        self.compiled = None
        with self._lock:
            self._by_batch.clear()
        self._model = None


def _dims(shape: Any) -> list[int | None]:
    """An OpenVINO PartialShape as numbers, None where a dimension is dynamic."""
    return [d.get_length() if d.is_static else None for d in shape]


def _capabilities(core: Any) -> list[str]:
    try:
        return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # an older plugin without the property: assume no fp16 arithmetic
        return []
