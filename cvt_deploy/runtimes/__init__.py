"""Runtimes: one interface (:class:`Runtime`), one file per backend.

Which backend runs what is decided above them, in :mod:`cvt_deploy.backends` (``load``,
``BACKENDS``, ``backend_class``); ``cvt_deploy.load`` is the public spelling.
"""
from __future__ import annotations

from .base import Prediction, Runtime

__all__ = ["Prediction", "Runtime"]
