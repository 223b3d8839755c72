"""The backends by name, and ``load``: which runtime runs a bundle here.

    >>> import cvt_deploy
    >>> runtime = cvt_deploy.load("build/demo")       # best backend the bundle and machine allow
    >>> runtime.predict(["cat.jpg"]).labels[0][:3]

Backends register here by name only (``"module:Class"``); nothing imports a backend's heavy
library until that backend is asked for. The registry sits above every backend it names
(``runtimes/``, ``trt/``), so that a backend's module never reaches back into it.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts import RUNS, select
from .errors import CvtDeployError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .runtimes.base import Runtime

__all__ = ["BACKENDS", "GRAPH_REFERENCES", "PREFERENCE", "REFERENCES", "backend_class", "load", "available_backends"]

# name -> "module:Class"; the order of PREFERENCE is what load() tries when no backend is named.
BACKENDS = {
    "tensorrt": "cvt_deploy.trt.runner:TensorRTRuntime",
    "tensorrt-rtx": "cvt_deploy.trt.runner:TensorRTRTXRuntime",
    "onnxruntime": "cvt_deploy.runtimes.ort:OrtRuntime",
    "openvino": "cvt_deploy.runtimes.openvino:OpenVinoRuntime",
    "torch": "cvt_deploy.runtimes.pytorch:TorchRuntime",
}
# OpenVINO comes after ONNX Runtime: where both are installed load() keeps picking ONNX Runtime
# (with its CPU-specific graphs) until a measurement says otherwise; before torch, since it
# runs the same exported graphs torch-free (docs/openvino.md has the numbers).
PREFERENCE = ("tensorrt", "tensorrt-rtx", "onnxruntime", "openvino", "torch")
# Reference implementations for comparison (cvt-bench rows): loadable by name like a backend,
# but they run no bundle artifact, so they are not offered as backends.
REFERENCES = {
    "hf-transformers": "cvt_deploy.runtimes.hf:HFReferenceRuntime",
    "torch-compile": "cvt_deploy.runtimes.pytorch:TorchCompiledRuntime",
    "openvino-plain": "cvt_deploy.runtimes.openvino:PlainOpenVinoRuntime",
}
# References timed at every precision of the run (the others run the model itself, at fp32).
GRAPH_REFERENCES = ("openvino-plain",)


def backend_class(name: str) -> type[Runtime]:
    """The runtime class of a backend (or of a reference implementation) by name."""
    spec = BACKENDS.get(name) or REFERENCES.get(name)
    if spec is None:
        raise CvtDeployError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def available_backends(bundle: Bundle | None = None, device: str | None = None) -> dict[str, str | None]:
    """Each backend -> None if it can run here (and the bundle has its artifact), else why not."""
    out: dict[str, str | None] = {}
    for name in PREFERENCE:
        try:
            cls = backend_class(name)
        except ImportError as e:  # one broken backend must not hide the others
            out[name] = f"its module failed to import ({e})"
            continue
        reason = cls.unavailable_reason(device)
        if reason is None and bundle is not None and select(bundle, name, None, device) is None:
            reason = f"the bundle has no {' or '.join(RUNS[name])} artifact"
        out[name] = reason
    return out


def load(source: str | os.PathLike[str] | Bundle, backend: str | None = None, device: str | None = None,
         precision: str | None = None, threads: int | None = None, batch: int | None = None) -> Runtime:
    """A runtime for a bundle folder (or a single exported ``.onnx``).

    ``backend``: "tensorrt", "onnxruntime", "openvino" or "torch"; None picks TensorRT where it
    runs, else on the CPU the path measured fastest on this CPU (choice.py: recorded at export),
    else the first of PREFERENCE that is installed and has an artifact in the bundle.
    ``precision``: "fp32", "fp16" or "int8"; None takes the most precise one the bundle holds for
    that backend. ``batch``: the batch size you will mostly run (default 1), for that choice.
    The runtime's ``choice`` says what was chosen and why (None when nothing was measured here).
    """
    from .bundle import Bundle
    from .runtimes.choice import check_batch

    check_batch(batch)
    if backend is not None:
        backend_class(backend)  # unknown names fail before any file is read
    if not isinstance(source, Bundle) and Path(source).suffix == ".onnx":
        if not Path(source).is_file():
            raise CvtDeployError(f"ONNX file {str(source)!r} does not exist", "check the path, or pass a bundle folder")
        # A bare graph runs where its backend can read one on its own (ONNX Runtime unless named).
        cls = backend_class(backend or "onnxruntime")
        from_onnx = getattr(cls, "from_onnx", None)
        if from_onnx is None:
            raise CvtDeployError(f"a bare .onnx file runs on onnxruntime or openvino, not {backend}",
                                 "export a bundle with cvt-export to use other backends")
        reason = cls.unavailable_reason(device)
        if reason is not None:
            raise CvtDeployError(f"backend {cls.backend} cannot run here: {reason}", cls.install_hint)
        runtime: Runtime = from_onnx(source, device=device, threads=threads)
        return runtime
    if not isinstance(source, Bundle) and Path(source).suffix == ".xml":
        # The IR's .bin is checked against the manifest's sha256: only its bundle can vouch for it.
        raise CvtDeployError(f"{str(source)!r} is an OpenVINO IR: it runs from its bundle, not on its own",
                             f"pass the bundle folder ({str(Path(source).parent)!r}) with backend='openvino', "
                             "or the bundle's .onnx file")
    bundle = source if isinstance(source, Bundle) else Bundle.open(source)
    if backend is None:
        reasons = available_backends(bundle, device)
        usable = [n for n in PREFERENCE if reasons[n] is None
                  and (precision is None or select(bundle, n, precision, device) is not None)]
        if not usable:
            detail = "; ".join(f"{n}: {r or f'no {precision} artifact'}" for n, r in reasons.items())
            raise CvtDeployError(f"no backend can run bundle {bundle.root} here ({detail})",
                                 "install one: pip install 'cvt-deploy[onnx]' (onnxruntime) or 'cvt-deploy[torch]'")
        chosen = _measured_choice(bundle, usable, precision, device, batch, threads) if usable[0] != "tensorrt" else None
        if chosen is not None:
            return chosen
        backend = usable[0]
    cls = backend_class(backend)
    reason = cls.unavailable_reason(device)
    if reason is not None:
        raise CvtDeployError(f"backend {backend} cannot run here: {reason}", cls.install_hint)
    return _measured_choice(bundle, [backend], precision, device, batch, threads) \
        or cls.from_bundle(bundle, precision=precision, device=device, threads=threads)


def _measured_choice(bundle: Bundle, backends: list[str], precision: str | None, device: str | None,
                     batch: int | None, threads: int | None = None) -> Runtime | None:
    """The fastest of ``backends``' CPU paths recorded for this CPU (choice.py), loaded; None when
    none is recorded here (the caller's fixed order decides then)."""
    from .runtimes.choice import CPU_BACKENDS, fastest, open_path

    if (device or "cpu") != "cpu" or not any(b in CPU_BACKENDS for b in backends):
        return None
    # The precision the first backend would take by itself: the most precise its artifacts hold.
    found = select(bundle, backends[0], precision, device)
    if found is None:
        return None
    choice = fastest(bundle, found.precision, batch, backends)
    if choice is None:
        return None
    runtime = open_path(bundle, choice.backend, choice.artifact, threads)
    runtime.choice = choice.sentence()
    return runtime
