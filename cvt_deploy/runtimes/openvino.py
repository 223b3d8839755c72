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

int8 on x86 CPUs without VNNI: OpenVINO's int8 kernels sum pairs of 8-bit products in 16 bits
there, which 8-bit weights overflow (cvt_deploy/cpu.py; the demo model's min logit cosine fell
to 0.71). A graph with 8-bit weights (the portable Q/DQ graph) is refused on such a CPU with
:class:`NotRightHere`, naming the feature and what to run instead: the bundle's int8 IR, whose
weights are 7-bit (export/openvino.py), or ONNX Runtime.

Batch sizes: a graph with a dynamic batch is compiled once per batch size it is given, with that
size fixed (kept for :data:`MAX_STATIC_BATCHES` sizes; further sizes share one model compiled
with the batch left dynamic). Measured on CvT-13, 2 threads, an AMX CPU: the int8 graph ran
16.4 ms at batch 1 compiled for it, 28.2 ms compiled dynamic (109 vs 175 ms at batch 8), fp32
38.0 vs 44.2 ms (268 vs 297); each compile takes about a second, on the first call of a size.
It is also what some int8 graphs need: OpenVINO 2026.4's low-precision passes fail on them with
a dynamic batch (a dequantizing Multiply moved through a head-splitting Reshape).

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

from ..artifacts import KIND, PRECISION, runnable, runs
from ..config import CvtConfig
from ..cpu import SAFE_INT8_WEIGHT, int8_saturation
from ..errors import CvtDeployError, NotRightHere, require
from ..util import INPUT_FORMAT_KEY, OUTPUT_KIND_KEY, BatchRange
from ..export.openvino import _message, read_onnx  # noqa: F401  (the IR writer reads graphs as this backend does)
from .base import Runtime
from .graph import check_graph_io, graph_identity

if TYPE_CHECKING:
    from ..bundle import Bundle

DEVICES = {"cpu": "CPU"}
# OpenVINO's own words for the arithmetic the CPU plugin is asked to use.
F32, F16 = "f32", "f16"
MAX_STATIC_BATCHES = 4  # batch sizes compiled each with its size fixed (each holds its own weights)


def compile_config(threads: int | None, precision_hint: str) -> dict[str, Any]:
    """The CPU plugin's settings for one latency-bound call at a time (cvt-bench's rows, cvt-predict)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


#: The backend this file is, by name: what the registry (artifacts.RUNS) says it runs; the plain reference runs the same.
BACKEND = "openvino"


class OpenVinoRuntime(Runtime):
    backend: ClassVar[str] = BACKEND
    per_batch: ClassVar[bool] = True  # compile a dynamic-batch graph per batch size (module docstring)
    install_hint: ClassVar[str] = "pip install 'cvt-deploy[openvino]'"

    def __init__(self, path: str | os.PathLike[str], config: CvtConfig | None = None, precision: str | None = None,
                 device: str = "cpu", threads: int | None = None, ir: tuple[bytes, bytes] | None = None) -> None:
        """``config``/``precision`` None: read from the graph's cvt-deploy metadata_props.
        ``path``: an ONNX graph, or (with ``ir``: its .xml and .bin bytes, checked by the caller) an IR."""
        require("openvino", "openvino", "The OpenVINO backend")
        import openvino as ov

        model = read_onnx(path) if ir is None else read_ir(path, *ir)
        # OpenVINO hands the graph's metadata_props over as the model's "framework" rt_info
        # (an IR keeps them: export/openvino.py).
        meta = {k: v.astype(str) for k, v in model.get_rt_info(["framework"]).astype(dict).items()} \
            if model.has_rt_info(["framework"]) else {}
        config, precision = graph_identity(meta, path, config, precision)
        if PRECISION[precision].integer:
            _check_int8_weights(model, path)
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
        # decision: OpenVINO's f16 inference hint is for fp16 graphs, where the CPU has fp16 arithmetic
        self.compute = F16 if precision == "fp16" and "FP16" in _capabilities(core) else F32
        self._compile = lambda m: core.compile_model(m, DEVICES[device], compile_config(threads, self.compute))  # noqa: E731
        # A static-batch graph: compiled as it is. A dynamic one: per batch size (_compiled_for).
        self._model: Any = model if in_shape[0] is None and self.per_batch else None
        self._by_batch: dict[int, tuple[Any, queue.SimpleQueue[Any]]] = {}
        # The model compiled as it is: a static-batch graph, or a dynamic one beyond MAX_STATIC_BATCHES sizes.
        self._as_is: tuple[Any, queue.SimpleQueue[Any]] | None = None
        self._as_is_fails = False
        self._lock = threading.Lock()
        self.threads = threads
        self.path = str(path)
        try:  # a graph that does not compile fails here, not at its first batch
            if self._model is None:
                self._as_is = (self._compile(model), queue.SimpleQueue())
            else:
                self._compiled_for(1)
        except Exception as e:
            raise CvtDeployError(f"OpenVINO cannot compile {path} for its {DEVICES[device]} plugin: {_message(e)}",
                                 "run cvt-check on the bundle with --backend onnxruntime; if that passes, "
                                 "report the graph and the OpenVINO version") from None

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
                    threads: int | None = None, artifact: str | None = None) -> OpenVinoRuntime:
        """The bundle's OpenVINO IR of ``precision`` (default the most precise one) where it has
        one (cvt-export --format openvino), else its portable ONNX graph; ``artifact`` names one."""
        device = device or "cpu"
        reason = cls.unavailable_reason(device)
        if reason is not None:
            raise CvtDeployError(f"backend openvino cannot run here: {reason}", cls.install_hint)
        if artifact is not None:
            art = bundle.artifacts.get(artifact)
            if art is None or not runs(art, BACKEND, device):
                raise CvtDeployError(f"bundle {bundle.root} has no graph named {artifact!r} that OpenVINO runs",
                                     f"choose one of: {', '.join(runnable(bundle, BACKEND, device))}")
        else:
            art = bundle.select(BACKEND, precision, device)
        if KIND[art.kind].weights_file:  # an IR: its .xml and .bin
            runtime = cls(bundle.path(art), bundle.config, art.precision, device, threads, ir=bundle.verified_ir(art))
        else:
            runtime = cls(bundle.verified_path(art), bundle.config, art.precision, device, threads)
        runtime.artifact = art.name
        return runtime

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str], device: str | None = None, threads: int | None = None) -> OpenVinoRuntime:
        """A runtime for a bare .onnx exported by cvt-deploy (its metadata_props say what it is)."""
        return cls(path, None, None, device or "cpu", threads)

    def describe(self) -> str:
        text = super().describe() + (" (IR)" if self.path.endswith(".xml") else "")
        if self.precision == "fp16" and self.compute == F32:  # decision: the hint above, said when it could not apply
            return text + " (computed in f32: this CPU has no fp16 arithmetic)"
        return text

    def compiled_model(self, batch: int = 1) -> Any:
        """The OpenVINO CompiledModel that runs batches of ``batch`` (compiled on first use)."""
        return self._as_is[0] if self._model is None and self._as_is is not None else self._compiled_for(batch)[0]

    @property
    def compiled_batches(self) -> list[int]:
        """The batch sizes compiled each with its size fixed, oldest first."""
        with self._lock:
            return list(self._by_batch)

    def _compiled_for(self, n: int) -> tuple[Any, queue.SimpleQueue[Any]]:
        """The model compiled for batches of ``n`` and its idle requests: one compiled with ``n``
        fixed for the first :data:`MAX_STATIC_BATCHES` sizes, the dynamic one for further sizes
        (or, where that does not compile, one for ``n`` in place of the oldest)."""
        with self._lock:
            if n in self._by_batch:
                return self._by_batch[n]
            if len(self._by_batch) >= MAX_STATIC_BATCHES and not self._as_is_fails:
                if self._as_is is None:
                    try:
                        self._as_is = (self._compile(self._model), queue.SimpleQueue())
                    except Exception:
                        self._as_is_fails = True
                if self._as_is is not None:
                    return self._as_is
            model = self._model.clone()
            model.reshape({model.inputs[0]: [n, *model.inputs[0].get_partial_shape()[1:]]})
            if len(self._by_batch) >= MAX_STATIC_BATCHES:
                self._by_batch.pop(next(iter(self._by_batch)))
            self._by_batch[n] = (self._compile(model), queue.SimpleQueue())
            return self._by_batch[n]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._model is None:  # a static-batch graph (the base class pads and splits to its batch)
            assert self._as_is is not None, "run() after close()"
            compiled, idle = self._as_is
        else:
            try:
                compiled, idle = self._compiled_for(len(batch))
            except Exception as e:  # OpenVINO's own types, from the compile of a new batch size
                raise CvtDeployError(f"OpenVINO cannot compile {self.path} for a batch of {len(batch)}: {_message(e)}",
                                     "run with another batch size, or on --backend onnxruntime; report the graph "
                                     "and the OpenVINO version") from None
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
        with self._lock:
            self._by_batch.clear()
            self._as_is = None
        self._model = None


def read_ir(path: str | os.PathLike[str], xml: bytes, weights: bytes) -> Any:
    """An IR from its .xml and .bin bytes (``path`` names the .xml in errors)."""
    import openvino as ov

    try:
        return ov.Core().read_model(xml.decode("utf-8"), ov.Tensor(np.frombuffer(weights, np.uint8).copy()))
    except Exception as e:
        raise CvtDeployError(f"OpenVINO cannot read the IR {path}: {_message(e)}",
                             "the .xml or .bin is truncated or corrupt: write it again with cvt-export --format openvino") from None


def _check_int8_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Refuse an int8 graph whose weights use 8 bits where this CPU's int8 dot products saturate
    (no VNNI): OpenVINO would run it with silently wrong results (cvt_deploy.cpu)."""
    reason = int8_saturation()
    if reason is None:
        return
    import openvino as ov

    widest = max((int(np.abs(op.get_data().astype(np.int16)).max()) for op in model.get_ops()
                  if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 and op.get_data().size),
                 default=0)
    if widest > SAFE_INT8_WEIGHT:
        raise NotRightHere(f"OpenVINO cannot run the int8 graph {path} right on this CPU: {reason} "
                           f"(its weights reach {widest}; at most {SAFE_INT8_WEIGHT}, 7 bits, cannot overflow)",
                           "run the bundle's OpenVINO IR, whose int8 weights are 7-bit (add or renew it with: "
                           "cvt-export --format openvino --precision int8 --bundle BUNDLE), or --backend onnxruntime, "
                           "whose int8 kernels do not overflow")


def _dims(shape: Any) -> list[int | None]:
    """An OpenVINO PartialShape as numbers, None where a dimension is dynamic."""
    return [d.get_length() if d.is_static else None for d in shape]


def _capabilities(core: Any) -> list[str]:
    try:
        return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # an older plugin without the property: assume no fp16 arithmetic
        return []


class PlainOpenVinoRuntime(OpenVinoRuntime):
    """A reference for cvt-bench, not a bundle backend: the bundle's portable ONNX graph on
    OpenVINO as a user's own code would run it, one compile with the batch left dynamic (with
    the f32 hint for fp32 and int8 graphs, as any comparison at the graph's precision needs).
    What the project's fastest CPU path is held against."""

    backend: ClassVar[str] = "openvino-plain"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("onnx",)
    per_batch: ClassVar[bool] = False

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None, artifact: str | None = None) -> OpenVinoRuntime:
        # decision: the plain reference is OpenVINO on the portable ONNX graph, by definition
        return super().from_bundle(bundle, precision, device, threads, artifact or bundle.require("onnx", precision).name)
