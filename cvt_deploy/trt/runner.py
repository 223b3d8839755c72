"""TensorRT backend: runs a bundle's ``model.<precision>.engine`` on a CUDA GPU.

Needs the real TensorRT and cuda-python (for device memory and streams); imports neither
until a runtime is created, and never imports torch. Before TensorRT sees a plan, its
sidecar (:class:`cvt_deploy.trt.sidecar.EngineMeta`) is checked against this machine, so a
plan built elsewhere fails with what it was built with and how to rebuild it here, not
with TensorRT's "version tag does not match".
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config import CvtConfig
from ..errors import CvtDeployError
from ..runtimes.base import Runtime
from ..util import BatchRange
from .sidecar import EngineMeta
from .util import (CUDA_PYTHON_HINT, MESSAGES, TENSORRT, TENSORRT_RTX, Toolkit, cuda_call, cuda_device_index,
                   cuda_device_info, dims, format_errors, import_cudart, require_tensorrt, tensorrt_unavailable_reason,
                   trt_logger)

if TYPE_CHECKING:
    import tensorrt

    from ..bundle import Bundle


class TensorRTRuntime(Runtime):
    """A deserialized TensorRT engine with one execution context, one CUDA stream and
    device buffers allocated once for the profile's largest batch and reused.

    Thread safety: the execution context, the stream and the buffers are shared state, so
    every inference holds ``self._lock``: several threads may call :meth:`run` /
    :meth:`predict` on one runtime safely, but their GPU work is serialised. For parallel
    inference, create one runtime per thread. ``threads`` is ignored (TensorRT runs on the
    GPU). Call :meth:`close` (or use ``with``) to free the GPU memory promptly.
    """

    toolkit: ClassVar[Toolkit] = TENSORRT
    backend: ClassVar[str] = TENSORRT.kind
    install_hint: ClassVar[str] = TENSORRT.hint + "; the TensorRT runtime also needs cuda-python"

    def __init__(self, engine_path: str | os.PathLike[str], meta: EngineMeta, config: CvtConfig,
                 device: str | None = None, bundle_root: str | os.PathLike[str] | None = None) -> None:
        module = require_tensorrt(f"the {self.toolkit.name} runtime", self.toolkit)
        if TYPE_CHECKING:
            import tensorrt as trt  # checked against tensorrt-stubs; TensorRT-RTX keeps this API
        else:
            trt = module

        self._lock = threading.Lock()
        self._buffers: list[int] = []
        self._stream: Any = None
        self._context: tensorrt.IExecutionContext | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._index = cuda_device_index(device)
        super().__init__(config, meta.precision, f"cuda:{self._index}", meta.batch)
        self.engine_path = Path(engine_path)
        self.meta = meta
        self._cudart = import_cudart()
        cuda_call(self._cudart.cudaSetDevice(self._index), f"cudaSetDevice({self._index})")
        self.gpu_name, cc = cuda_device_info(self._index)

        # Our check first: TensorRT's own message for a foreign plan is "version tag does not match".
        for warning in meta.check_compatible(trt.__version__, self.gpu_name, cc, bundle=bundle_root):
            warnings.warn(f"{self.engine_path.name}: {warning}", RuntimeWarning, stacklevel=3)

        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        module = require_tensorrt(f"the {self.toolkit.name} runtime", self.toolkit)
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = module

        rebuild = (f"rebuild it here: cvt-export --format {self.toolkit.format} --bundle "
                   f"{self.engine_path.parent} --precision {self.precision}")
        self._runtime = trt.Runtime(trt_logger(self.toolkit))  # must outlive the engine
        if "dla_core" in self.meta.extra:  # a DLA engine runs on the core it was built for
            self._runtime.DLA_core = int(self.meta.extra["dla_core"])
        if self.meta.version_compatible:
            # A version-compatible plan carries TensorRT's lean runtime (host code); the
            # sidecar says we built it, so we trust it.
            self._runtime.engine_host_code_allowed = True
        with MESSAGES.capture() as errors:
            engine: tensorrt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise CvtDeployError(f"{self.toolkit.name} could not load {self.engine_path}: {format_errors(errors)}", rebuild)
        self._engine = engine
        with MESSAGES.capture() as errors:
            context: tensorrt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise CvtDeployError(f"TensorRT could not create an execution context for {self.engine_path.name}: "
                                 f"{format_errors(errors)}", "free GPU memory (other processes) and retry, or build the engine for a smaller --batch-range")
        self._context = context

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CvtDeployError(f"{self.engine_path.name} has inputs {inputs} and outputs {outputs}; a CvT classifier "
                                 "engine has one image input and one logits output", rebuild)
        self._in_name, self._out_name = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._in_name)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._out_name)))

        # The engine's own profile is the truth about the batch sizes it accepts.
        lo, opt, hi = (dims(d) for d in engine.get_tensor_profile_shape(self._in_name, 0))
        self.batch_range = BatchRange(lo[0], opt[0], hi[0])
        if not context.set_input_shape(self._in_name, hi):
            raise CvtDeployError(f"{self.engine_path.name} rejects its own profile's largest input shape {hi}", rebuild)
        out_max = dims(context.get_tensor_shape(self._out_name))

        # Allocate once for the largest batch: cudaMalloc per call would cost more than a small model's inference.
        cudart = self._cudart
        for name, shape, dtype in ((self._in_name, hi, self._in_dtype), (self._out_name, out_max, self._out_dtype)):
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ptr = int(cuda_call(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes for {name})"))
            self._buffers.append(ptr)
            if not context.set_tensor_address(name, ptr):
                raise CvtDeployError(f"TensorRT refused the device buffer for tensor {name!r}", rebuild)
        self._d_in, self._d_out = self._buffers
        self._stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        # "Not installed" first: it is the reason that holds on every device.
        reason = tensorrt_unavailable_reason(cls.toolkit)
        if reason is not None:
            return reason
        try:
            index = cuda_device_index(device)
        except CvtDeployError as e:
            return e.message
        try:
            cudart = import_cudart()
        except CvtDeployError:
            return f"cuda-python is not installed ({CUDA_PYTHON_HINT})"
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0:
            return f"no usable CUDA GPU ({getattr(err, 'name', err)})"
        if index >= int(count):
            return f"there is no CUDA device {index} (this machine has {int(count)})"
        return None

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> TensorRTRuntime:
        reason = cls.unavailable_reason(device)
        if reason is not None:
            raise CvtDeployError(f"the {cls.toolkit.name} backend cannot run here: {reason}", cls.install_hint)
        art = bundle.select(cls.backend, precision, device)
        engine = bundle.verified_path(art)
        meta = EngineMeta.read(bundle.sidecar_path(art))
        runtime = cls(engine, meta, bundle.config, device=device, bundle_root=bundle.root)
        runtime.set_io(art.info.get("input_format"), art.info.get("output_kind"), f"{bundle.root} ({art.name})")
        return runtime

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)
        cudart = self._cudart
        with self._lock:
            context = self._context
            if context is None:
                raise CvtDeployError(f"{self!r} is closed", "load the runtime again")
            cuda_call(cudart.cudaSetDevice(self._index), f"cudaSetDevice({self._index})")  # per host thread
            if not context.set_input_shape(self._in_name, x.shape):
                raise CvtDeployError(
                    f"input of shape {x.shape} does not fit {self.engine_path.name} (batch {self.batch_range.min}..{self.batch_range.max}"
                    f" of {self.meta.chw})", f"pass preprocessed images of the model's size ({self.input_format})")
            out = np.empty(dims(context.get_tensor_shape(self._out_name)), dtype=self._out_dtype)
            stream = self._stream
            cuda_call(cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (input)")
            with MESSAGES.capture() as errors:
                ok = context.execute_async_v3(int(stream))
            if not ok:
                raise CvtDeployError(f"TensorRT inference failed: {format_errors(errors)}",
                                     "check GPU memory and the driver; rebuild the engine if it persists")
            cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (output)")
            cuda_call(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return out.astype(np.float32, copy=False)  # fp16 engines may return half logits

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {self.device} ({self.gpu_name})"

    def close(self) -> None:
        """Free the device buffers and the stream; the runtime cannot run afterwards."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            # TensorRT objects go first: the context holds the buffer addresses.
            self._context = None
            self._engine = None
            cudart = getattr(self, "_cudart", None)
            buffers, self._buffers = self._buffers, []
            stream, self._stream = self._stream, None
            if cudart is None:
                return
            for ptr in buffers:
                cuda_call(cudart.cudaFree(ptr), "cudaFree")
            if stream is not None:
                cuda_call(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit CUDA may already be torn down
            pass


class TensorRTRTXRuntime(TensorRTRuntime):
    """A TensorRT-RTX engine (``cvt-export --format trt-rtx``: built ahead of time on any
    machine) on an RTX or Ampere-or-newer GPU, where TensorRT-RTX compiles it for that GPU
    when it loads (JIT). The same runtime as TensorRT's: TensorRT-RTX keeps its runtime API.
    Where there is no GPU and driver it is refused with the reason, like TensorRT."""

    toolkit: ClassVar[Toolkit] = TENSORRT_RTX
    backend: ClassVar[str] = TENSORRT_RTX.kind
    install_hint: ClassVar[str] = (TENSORRT_RTX.hint + "; running its engines also needs cuda-python and an NVIDIA "
                                   "driver with an RTX or Ampere-or-newer GPU")
