"""PyTorch backend: our CvT in eager mode, CPU or CUDA, fp32 (fp16 on CUDA).

Thread safety: inference runs under ``torch.inference_mode`` and touches no module state,
so one runtime can serve several threads (PyTorch releases the GIL inside kernels).
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..artifacts import PRECISION, REFERENCE
from ..errors import CvtDeployError
from .base import Runtime

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..model import CvT


class TorchRuntime(Runtime):
    backend: ClassVar[str] = "torch"
    install_hint: ClassVar[str] = "pip install 'cvt-deploy[torch]'"

    def __init__(self, model: CvT, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        import torch

        facts = PRECISION.get(precision)
        if facts is None or facts.torch_dtype is None:
            computed = [p.name for p in PRECISION.values() if p.torch_dtype is not None]
            raise CvtDeployError(f"the torch backend runs {' or '.join(computed)}, not {precision}",
                                 f"use --backend onnxruntime or tensorrt for {precision}")
        if device.split(":")[0] not in facts.torch_devices:
            raise CvtDeployError(f"{precision} on the torch backend needs a CUDA device",
                                 f"pass --device cuda, or use fp32 on {device.upper()}")
        if threads:
            torch.set_num_threads(threads)  # process-wide in PyTorch; there is no per-model setting
        super().__init__(model.cfg, precision, device)
        dtype = getattr(torch, facts.torch_dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self._dtype = dtype

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed"
        if device not in (None, "cpu", "cuda") and not str(device).startswith("cuda:"):
            return f"the torch backend runs on cpu or cuda, not {device!r}"
        if device and str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device is visible to PyTorch"
        return None

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> TorchRuntime:
        from ..checkpoints import load_checkpoint

        art = bundle.select(TorchRuntime.backend, precision, device)  # torch.compile runs the same weights
        model = load_checkpoint(bundle.verified_path(art))
        return cls(model, device or "cpu", precision or "fp32", threads)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype)
            return self.model(x).float().cpu().numpy()

    def synchronize(self) -> None:
        torch_synchronize(self.device)


class TorchCompiledRuntime(TorchRuntime):
    """A reference for cvt-bench, not a bundle backend: the bundle's model through
    ``torch.compile`` (inductor), what a PyTorch user would try before exporting anything.

    Each new batch size compiles on its first call (tens of seconds on a small CPU), which
    the warm-up absorbs and the row's ``first ms`` shows; the steady state is what is timed.
    """

    backend: ClassVar[str] = "torch-compile"
    artifact_kinds: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self, model: CvT, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        import torch

        if precision != REFERENCE:  # a reference is the run's baseline, not a backend with precisions of its own
            raise CvtDeployError(f"the torch.compile reference runs fp32 only, not {precision}", "compare it at fp32")
        super().__init__(model, device, precision, threads)
        # One graph per batch size (dynamic=False): the fastest kernels, as a deployment would fix its batch.
        self.model = torch.compile(self.model, dynamic=False)  # type: ignore[assignment]


def torch_synchronize(device: str) -> None:
    """Wait for queued CUDA work (PyTorch runs it asynchronously); nothing to wait for on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
