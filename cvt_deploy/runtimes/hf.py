"""A reference, not a bundle backend: Hugging Face ``CvtForImageClassification`` with the
bundle's architecture, for cvt-bench's comparison rows (registered in ``REFERENCES``)."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..checkpoints.hf import hf_config_kwargs, hf_unsupported
from ..artifacts import REFERENCE
from ..config import CvtConfig
from ..errors import CvtDeployError
from .base import Runtime
from .pytorch import TorchRuntime, torch_synchronize

if TYPE_CHECKING:
    from ..bundle import Bundle


class HFReferenceRuntime(Runtime):
    """Hugging Face ``CvtForImageClassification`` with our bundle's architecture, random weights.

    For latency only: its weights are random (a CvtConfig with the same widths, heads and
    depths), and it computes exact GELU where ours may use QuickGELU, which costs the same.
    """

    backend: ClassVar[str] = "hf-transformers"
    install_hint: ClassVar[str] = "pip install transformers torch"

    def __init__(self, config: CvtConfig, device: str = "cpu") -> None:
        import torch
        import transformers

        super().__init__(config, "fp32", device)
        hf_cfg = transformers.CvtConfig(**hf_config_kwargs(config))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = transformers.CvtForImageClassification(hf_cfg).eval().to(device)

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed ({cls.install_hint})"
        return TorchRuntime.unavailable_reason(device)  # same devices as our torch backend

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> HFReferenceRuntime:
        cfg = bundle.config
        if precision not in (None, REFERENCE):  # a reference is the run's baseline, not a backend with precisions
            raise CvtDeployError(f"the Hugging Face reference runs fp32 only, not {precision}", "compare it at fp32")
        reason = hf_unsupported(cfg)
        if reason:
            raise CvtDeployError(f"the bundle's architecture has no Hugging Face counterpart: {reason}", "pass --no-hf")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return cls(cfg, device or "cpu")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return self.model(pixel_values=x).logits.float().cpu().numpy()

    def synchronize(self) -> None:
        torch_synchronize(self.device)
