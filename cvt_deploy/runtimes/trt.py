"""The TensorRT backend lives with the rest of TensorRT in :mod:`cvt_deploy.trt`; this name
stays for code that imported the runtime from here."""
from ..trt.runner import TensorRTRuntime

__all__ = ["TensorRTRuntime"]
