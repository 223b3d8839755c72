"""ONNX Runtime backend. Imports no torch, so it runs on an edge device with
``cvt-deploy`` and ``onnxruntime`` alone.

Devices map to execution providers: "cpu" -> CPU, "cuda" -> CUDA, "tensorrt" -> ORT's
TensorRT provider. A provider that was asked for but is missing is an error, never a
silent fall-back to CPU. Thread safety: ``InferenceSession.run`` is thread-safe, so one
runtime serves several threads.
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..artifacts import RUNS, TARGET, runs
from ..util import INPUT_FORMAT_KEY, OUTPUT_KIND_KEY, BatchRange, ort_session
from ..config import CvtConfig
from ..errors import CvtDeployError
from .base import Runtime
from .graph import check_graph_io, graph_identity

if TYPE_CHECKING:
    from ..bundle import Bundle

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OrtRuntime(Runtime):
    backend: ClassVar[str] = "onnxruntime"
    install_hint: ClassVar[str] = "pip install 'cvt-deploy[onnx]' (CPU) or 'cvt-deploy[gpu]' (CUDA/TensorRT providers)"

    def __init__(self, path: str | os.PathLike[str], config: CvtConfig | None = None, precision: str | None = None,
                 device: str = "cpu", threads: int | None = None, graph: bytes | None = None) -> None:
        """``config``/``precision`` None: read from the graph's cvt-deploy metadata_props.
        ``graph``: the file's bytes, already read (and checked) by the caller; ``path`` names it."""
        wanted = PROVIDERS[device]
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        try:
            self.session = ort_session(path if graph is None else graph, threads, providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise CvtDeployError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}",
                                 "the file is truncated or corrupt, or not an ONNX model: re-export it with cvt-export") from None
        if self.session.get_providers()[0] != wanted:
            raise CvtDeployError(f"ONNX Runtime did not start its {wanted} (it fell back to {self.session.get_providers()[0]})",
                                 "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs, or use --device cpu")
        meta = self.session.get_modelmeta().custom_metadata_map
        config, precision = graph_identity(meta, path, config, precision)
        super().__init__(config, precision, device)
        # The graph says what it takes (export/rawpixel.py stamps it); its input must agree.
        self.set_io(meta.get(INPUT_FORMAT_KEY), meta.get(OUTPUT_KIND_KEY), f"{path} (metadata_props)")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        check_graph_io(path, config, self.input_format, inp.type, inp.type == "tensor(uint8)", inp.shape, out.shape)
        if isinstance(inp.shape[0], int):  # a static batch: the base class pads and splits to it
            self.batch_range = BatchRange(inp.shape[0], inp.shape[0], inp.shape[0])
        self.input_name = inp.name
        self.path = str(path)
        self.target = "portable"  # what the graph was built for (bundle.TARGETS); from_bundle knows

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        device = device or "cpu"
        if device not in PROVIDERS:
            return f"onnxruntime runs on {', '.join(PROVIDERS)}, not {device!r}"
        import onnxruntime as ort

        if PROVIDERS[device] not in ort.get_available_providers():
            return f"this onnxruntime build has no {PROVIDERS[device]} (install onnxruntime-gpu)"
        return None

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None, artifact: str | None = None) -> OrtRuntime:
        """On the CPU, the bundle's ONNX Runtime CPU graph of ``precision`` where it has one (faster:
        export/ort_cpu.py), else the portable graph; on CUDA/TensorRT, always the portable one.
        ``artifact`` names one graph of the bundle instead (cvt-check checks each)."""
        device = device or "cpu"
        if artifact is not None:
            art = bundle.artifacts.get(artifact)
            if art is None or art.kind not in RUNS[cls.backend]:
                raise CvtDeployError(f"bundle {bundle.root} has no ONNX graph named {artifact!r}",
                                     f"choose one of: {', '.join(n for n, a in bundle.artifacts.items() if a.kind in RUNS[cls.backend])}")
            if not runs(art, cls.backend, device):
                raise CvtDeployError(f"{artifact} is built for {TARGET[art.target].what}, not {device}",
                                     "load the portable graph (leave the artifact out) or use --device cpu")
        else:
            art = bundle.select(cls.backend, precision, device)
        runtime = cls(bundle.path(art), bundle.config, art.precision, device, threads, graph=bundle.verified_bytes(art))
        runtime.target, runtime.artifact = art.target, art.name
        return runtime

    def describe(self) -> str:
        return super().describe() + (f" ({self.target} graph)" if TARGET[self.target].meant_for is not None else "")

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str], device: str | None = None, threads: int | None = None) -> OrtRuntime:
        """A runtime for a bare .onnx exported by cvt-deploy (its metadata_props say what it is)."""
        return cls(path, None, None, device or "cpu", threads)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            out: Any = self.session.run(None, {self.input_name: batch})[0]
        except Exception as e:
            raise CvtDeployError(f"ONNX Runtime failed on a batch of shape {batch.shape} with {self.path}: "
                                 f"{str(e).splitlines()[0][:300]}",
                                 "run cvt-check on the bundle; if it fails too, re-export it with cvt-export") from None
        return np.asarray(out)

