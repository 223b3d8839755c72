"""The TensorRT stage of the pipeline (``build_engine``, ``build_engines``). It lives with the
rest of the TensorRT backend in :mod:`cvt_deploy.trt.loader`; this name stays for code that
imported the stage from here."""
from ..trt.loader import build_engine, build_engines, engine_file

__all__ = ["build_engine", "build_engines", "engine_file"]
