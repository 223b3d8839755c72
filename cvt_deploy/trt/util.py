"""TensorRT plumbing shared by the engine builder (loader) and the runtime (runner).

Is TensorRT here (and if not, why, and what to install); CUDA through cuda-python (device
names, compute capability, free memory; both ``cuda.bindings.runtime`` and the older
``cuda.cudart`` layouts); and the process-wide TensorRT logger: TensorRT routes messages
of objects created later to the first logger it was given, so one shared logger is the
only reliable way to turn TensorRT's errors into our error messages. Neither TensorRT nor
cuda-python is imported until a function needs it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import threading
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..artifacts import KIND
from ..errors import CvtDeployError, MissingDependencyError

if TYPE_CHECKING:
    import tensorrt

#: Workspace pool limit when none is given. 1 GiB builds CvT-13 with fast tactics and
#: still fits next to the OS, the weights and the activations on an 8 GB Jetson.
DEFAULT_WORKSPACE_MIB = 1024
#: Share of the free device memory the workspace may take: the weights, activations and
#: TensorRT's own allocations need the rest, and on Jetson the CPU shares that memory.
WORKSPACE_FREE_FRACTION = 0.5
MIN_WORKSPACE_MIB = 64

TENSORRT_INSTALL_HINT = (
    "install TensorRT on the machine with the GPU: on x86-64, pip install 'cvt-deploy[gpu]' "
    "(or pip install tensorrt cuda-python; the TensorRT wheels come from NVIDIA's package index, "
    "pypi.nvidia.com); on a Jetson, TensorRT ships with JetPack (add cuda-python with pip). "
    "Or carry the ONNX bundle to the target device and build the engine there with "
    "`cvt-export --format trt --bundle <bundle>`"
)
CUDA_PYTHON_HINT = "pip install cuda-python (cvt-deploy's [gpu] extra includes it; on a Jetson match its CUDA major version, e.g. 'cuda-python<13' for CUDA 12)"

RTX_INSTALL_HINT = ("pip install 'cvt-deploy[rtx]' (or pip install tensorrt-rtx): NVIDIA's TensorRT for RTX, on PyPI "
                    "for x86-64 Linux and Windows; its parser and builder run on any CPU, no GPU needed")

# ----------------------------------------------------------------------------------------
# Which TensorRT, and is it here?


@dataclass(frozen=True)
class Toolkit:
    """A TensorRT Python package the loader builds with (and the runner runs with).

    NVIDIA's TensorRT (``tensorrt``) builds on the GPU that will run the engine; TensorRT-RTX
    (``tensorrt_rtx``) has the same Python API for everything the loader touches, but builds
    ahead of time (``aot``) with no GPU at all: no CUDA device to ask, no timing cache (it makes
    the AOT build query a GPU: TensorRT-RTX 1.1 release notes), strongly typed only, and the
    engine is compiled for the GPU it meets at run time (JIT).
    """

    name: str           # as users read it: "TensorRT", "TensorRT-RTX"
    module: str         # the Python module
    kind: str           # the bundle's artifact kind and backend name of its engines
    aot: bool           # builds with no GPU present
    hint: str           # how to install it

    @property
    def format(self) -> str:
        """The cvt-export --format that builds its engines (the registry's: artifacts.KIND)."""
        return str(KIND[self.kind].format)


TENSORRT = Toolkit("TensorRT", "tensorrt", "tensorrt", False, TENSORRT_INSTALL_HINT)
TENSORRT_RTX = Toolkit("TensorRT-RTX", "tensorrt_rtx", "tensorrt-rtx", True, RTX_INSTALL_HINT)
TOOLKITS = {t.kind: t for t in (TENSORRT, TENSORRT_RTX)}


def install_hint(toolkit: Toolkit = TENSORRT) -> str:
    """What to do when ``toolkit`` is missing (the ``hint`` of the error to raise)."""
    return toolkit.hint


def tensorrt_unavailable_reason(toolkit: Toolkit = TENSORRT) -> str | None:
    """None when the real ``toolkit`` can be imported; otherwise why not, in one sentence.

    ``tensorrt-stubs`` installs a ``tensorrt/`` folder with only ``__init__.pyi``, which
    Python imports as an empty namespace package, so a successful import proves nothing:
    the real package has ``Builder`` and ``__version__``.
    """
    try:
        trt = importlib.import_module(toolkit.module)
    except ImportError as e:
        return f"{toolkit.name} is not installed (import {toolkit.module} failed: {e})"
    except OSError as e:  # the Python package is there but its libraries are not
        return f"{toolkit.name}'s libraries cannot be loaded ({e})"
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = ", ".join(getattr(trt, "__path__", [])) or "an unknown location"
        return (f"only an empty '{toolkit.module}' package is installed (at " + where + "), e.g. the type stubs "
                f"from tensorrt-stubs, not the {toolkit.name} libraries")
    return None


def require_tensorrt(feature: str, toolkit: Toolkit = TENSORRT) -> types.ModuleType:
    """The ``toolkit`` module; MissingDependencyError (a CvtDeployError) naming ``feature`` when it is not here."""
    reason = tensorrt_unavailable_reason(toolkit)
    if reason is not None:
        raise MissingDependencyError(f"{feature} needs {toolkit.name}: {reason}", install_hint(toolkit))
    return importlib.import_module(toolkit.module)


def tensorrt_version(toolkit: Toolkit = TENSORRT) -> str:
    """The installed ``toolkit``'s version; call only after :func:`tensorrt_unavailable_reason`."""
    return str(importlib.import_module(toolkit.module).__version__)


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); trailing non-numeric parts ('+cuda12') are dropped."""
    parts = []
    for p in version.strip().split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise CvtDeployError(f"TensorRT version {version!r} is not a dotted number", "check the engine's sidecar file")
    return tuple(parts)


def is_jetson() -> bool:
    """Whether this machine is an NVIDIA Jetson (an L4T/Tegra board)."""
    if os.uname().machine != "aarch64":
        return False
    if os.path.exists("/etc/nv_tegra_release"):
        return True
    try:
        with open("/proc/device-tree/compatible", "rb") as f:
            return b"tegra" in f.read()
    except OSError:
        return False


def check_hardware_compatible(requested: bool) -> None:
    """Refuse --hardware-compatible where TensorRT does not support it: JetPack (and DRIVE OS)."""
    if requested and is_jetson():
        raise CvtDeployError("hardware-compatible engines are not supported on JetPack (TensorRT developer guide, "
                             "'Hardware Compatibility'): this machine is a Jetson",
                             "build without --hardware-compatible on each Jetson that runs the engine")


# ----------------------------------------------------------------------------------------
# CUDA through cuda-python (optional: only functions that ask the device import it)


def import_cudart() -> Any:
    """The cuda-python runtime module; CvtDeployError with the install hint when missing."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise CvtDeployError("cuda-python is not installed; the TensorRT path uses it to reach the GPU", CUDA_PYTHON_HINT)


def cuda_call(result: Any, what: str) -> Any:
    """Check a cuda-python ``(error, *values)`` result: raise if the error is not success.

    Returns None, the single value, or the tuple of values.
    """
    err, values = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        try:
            desc = import_cudart().cudaGetErrorString(err)[1]
            desc = desc.decode() if isinstance(desc, bytes) else str(desc)
        except Exception:  # describing the error must not hide it
            desc = ""
        raise CvtDeployError(f"CUDA call {what} failed: {name}" + (f" ({desc})" if desc else ""),
                             "check that the NVIDIA driver works (nvidia-smi, or tegrastats on a Jetson) "
                             "and that the GPU has free memory")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_device_index(device: str | None) -> int:
    """'cuda' / None -> 0, 'cuda:1' -> 1; anything else is not a TensorRT device."""
    if device is None or device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise CvtDeployError(f"TensorRT runs on CUDA GPUs only, not on device {device!r}",
                             "use --device cuda or cuda:N, or another backend (onnxruntime) for the CPU")
    return int(m.group(1))


def cuda_device_info(index: int = 0) -> tuple[str, tuple[int, int]]:
    """(GPU name, (major, minor) compute capability) of CUDA device ``index``."""
    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
    return name.strip(), (int(props.major), int(props.minor))


def cuda_free_memory(index: int = 0) -> int | None:
    """Free bytes on CUDA device ``index``, or None when that cannot be asked (no cuda-python, no GPU)."""
    try:
        cudart = import_cudart()
        cuda_call(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
        free, _total = cuda_call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)
    except CvtDeployError:
        return None


def default_workspace_mib(free_bytes: int | None = None, device_index: int = 0) -> int:
    """The workspace pool limit to build with: :data:`DEFAULT_WORKSPACE_MIB` (1 GiB), clamped
    to half the free device memory when that is known (``free_bytes``, else asked via CUDA).

    Jetson builds fail when the workspace pool is larger than the memory actually free.
    """
    if free_bytes is None:
        free_bytes = cuda_free_memory(device_index)
    if free_bytes is None:
        return DEFAULT_WORKSPACE_MIB
    fits = int(free_bytes * WORKSPACE_FREE_FRACTION) >> 20
    return max(MIN_WORKSPACE_MIB, min(DEFAULT_WORKSPACE_MIB, fits))


# ----------------------------------------------------------------------------------------
# Logging

# ILogger.Severity values: INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4.
_SEVERITY = {"error": 1, "warning": 2, "info": 3, "verbose": 4}
LOG_ENV = "CVT_DEPLOY_TRT_LOG"  # error | warning (default) | info | verbose


class Captured(list[str]):
    """The error messages logged inside a :meth:`TrtMessages.capture` block, and (when asked)
    its warnings in ``warnings``."""

    def __init__(self, warnings: bool) -> None:
        super().__init__()
        self.wants_warnings = warnings
        self.warnings: list[str] = []


class TrtMessages:
    """Routes TensorRT's log: errors to whoever is capturing them (to put into one
    CvtDeployError), else to stderr; warnings to a capture that asked for them (a build
    report), else with everything up to :data:`LOG_ENV`'s level to stderr."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: list[Captured] = []

    @contextlib.contextmanager
    def capture(self, warnings: bool = False) -> Iterator[Captured]:
        """Collect the error messages TensorRT logs inside the block (and its warnings, ``warnings``)."""
        sink = Captured(warnings)
        with self._lock:
            self._sinks.append(sink)
        try:
            yield sink
        finally:
            with self._lock:
                self._sinks.remove(sink)

    def emit(self, severity: int, msg: str) -> None:
        with self._lock:
            sinks = list(self._sinks)
        if severity <= _SEVERITY["error"] and sinks:
            for sink in sinks:
                sink.append(msg.strip())
            return
        if severity == _SEVERITY["warning"] and any(s.wants_warnings for s in sinks):
            for sink in sinks:
                if sink.wants_warnings:
                    sink.warnings.append(msg.strip())
            return
        level = _SEVERITY.get(os.environ.get(LOG_ENV, "warning").lower(), _SEVERITY["warning"])
        if severity <= level:
            name = {0: "internal error", 1: "error", 2: "warning"}.get(severity, "info")
            print(f"TensorRT {name}: {msg.strip()}", file=sys.stderr)


MESSAGES = TrtMessages()
_LOGGERS: dict[str, tensorrt.ILogger] = {}
_LOGGER_LOCK = threading.Lock()


def trt_logger(toolkit: Toolkit = TENSORRT) -> tensorrt.ILogger:
    """The one logger of this process for ``toolkit`` (created on first use); feeds :data:`MESSAGES`."""
    trt: Any = importlib.import_module(toolkit.module)

    with _LOGGER_LOCK:
        if toolkit.module not in _LOGGERS:
            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)  # the pybind11 trampoline needs the explicit call

                def log(self, severity: Any, msg: str) -> None:
                    MESSAGES.emit(int(severity), msg)

            _LOGGERS[toolkit.module] = _Logger()
        return _LOGGERS[toolkit.module]


def dims(d: tensorrt.Dims) -> tuple[int, ...]:
    """TensorRT Dims -> a tuple of ints (-1 marks a dynamic dimension)."""
    return tuple(int(d[i]) for i in range(len(d)))


def format_errors(errors: list[str]) -> str:
    return "; ".join(dict.fromkeys(e for e in errors if e)) or "TensorRT logged no error message"
