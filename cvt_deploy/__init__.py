"""cvt-deploy: CvT from PyTorch to ONNX, ONNX Runtime and TensorRT.

Importing this package is light (numpy and PIL only). PyTorch, ONNX and TensorRT are
imported by the functions that need them, so an edge device can run an exported bundle
with just ``cvt-deploy`` and ``onnxruntime`` or ``tensorrt`` installed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import CvtConfig, PreprocessConfig, get_config, list_variants, register_variant
from .errors import CvtDeployError, MissingDependencyError
from .preprocess import preprocess
from .util import VERSION as __version__

__all__ = [
    "CvtConfig", "PreprocessConfig", "CvtDeployError", "MissingDependencyError",
    "get_config", "list_variants", "register_variant", "preprocess",
    "create_model", "load_checkpoint", "load",
]

if TYPE_CHECKING:
    from .model import CvT
    from .runtimes.base import Runtime


def create_model(variant: str = "cvt-13", **overrides: Any) -> CvT:
    """A randomly initialised CvT (needs the ``torch`` extra); see :func:`cvt_deploy.model.create_model`."""
    from .model import create_model as _create

    return _create(variant, **overrides)


def load_checkpoint(source: Any, variant: str | None = None, **kw: Any) -> CvT:
    """A CvT with weights from any supported checkpoint; see :func:`cvt_deploy.checkpoints.load_checkpoint`."""
    from .checkpoints import load_checkpoint as _load

    return _load(source, variant, **kw)


def load(source: Any, backend: str | None = None, device: str | None = None,
         precision: str | None = None, threads: int | None = None, batch: int | None = None) -> Runtime:
    """A runtime for an exported bundle; see :func:`cvt_deploy.backends.load` (``batch``: the batch
    size you will mostly run, for the measured choice of CPU path)."""
    from .backends import load as _load

    return _load(source, backend=backend, device=device, precision=precision, threads=threads, batch=batch)
