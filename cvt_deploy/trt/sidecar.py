"""The engine sidecar: what a TensorRT plan was built from, with and on, without TensorRT.

An engine is a plain TensorRT plan (``model.fp16.engine``) that runs only on the TensorRT
version and GPU family it was built for. Because a plan must stay a plain plan (a header
glued in front breaks trtexec and DeepStream), what it was built with and on lives in a
sidecar, ``model.fp16.engine.json`` (:class:`EngineMeta`). Loading checks the sidecar
against this machine *before* handing the plan to TensorRT, so users read "built with
TensorRT 10.3 on Orin, this is TensorRT 10.13 on an H100: rebuild with ..." instead of
TensorRT's "version tag does not match".

Nothing here needs torch or TensorRT, so all of it is unit-tested on machines without a
GPU. cuda-python (for the GPU name, compute capability and free memory) is imported only by
the functions that ask the device, and both of its layouts are supported:
``cuda.bindings.runtime`` (cuda-python >= 12.6 / 13) and ``cuda.cudart`` (older).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import CvtDeployError
from ..jsonio import read_json
from ..util import PRECISIONS, BatchRange, atomic_output
from .util import DEFAULT_WORKSPACE_MIB, version_tuple

SIDECAR_FORMAT = "cvt-deploy-engine"
SIDECAR_VERSION = 1


Shape = tuple[int, int, int, int]


def profile_shapes(batch: BatchRange, chw: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) NCHW input shapes of the TensorRT optimization profile for ``batch``."""
    c, h, w = (int(v) for v in chw)
    if min(c, h, w) < 1:
        raise CvtDeployError(f"input shape C,H,W = {c},{h},{w} has a dimension below 1", "check the model config")
    return (batch.min, c, h, w), (batch.opt, c, h, w), (batch.max, c, h, w)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.fp16.engine`` -> ``model.fp16.engine.json`` beside it."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def _cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def parse_compute_capability(value: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'8.7' or (8, 7) -> (8, 7)."""
    try:
        parts = value.split(".") if isinstance(value, str) else list(value)
        major, minor = parts
        return int(major), int(minor)
    except (ValueError, TypeError):
        raise CvtDeployError(f"compute capability {value!r} is not MAJOR.MINOR", "e.g. 8.7 for Jetson Orin") from None


@dataclass
class EngineMeta:
    """What an engine was built from, with and on: the ``<engine>.json`` sidecar record."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    batch: BatchRange
    input_name: str
    chw: tuple[int, int, int]
    onnx_sha256: str
    onnx_file: str = ""
    strongly_typed: bool = True
    builder_flags: list[str] = field(default_factory=list)  # BuilderFlag names set, e.g. ["FP16"]
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    version_compatible: bool = False
    hardware_compatibility_level: str = "NONE"  # HardwareCompatibilityLevel name
    output_name: str = ""
    toolkit: str = "TensorRT"  # or "TensorRT-RTX" (trt/util.py Toolkit.name)
    targets: list[str] = field(default_factory=list)  # TensorRT-RTX: the compute capabilities compiled for
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. layers kept in FP32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CvtDeployError(f"engine precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                 "rebuild the engine with cvt-export --format trt")
        self.compute_capability = parse_compute_capability(self.compute_capability)
        self.chw = (int(self.chw[0]), int(self.chw[1]), int(self.chw[2]))

    @property
    def hardware_compatible(self) -> bool:
        return self.hardware_compatibility_level not in ("", "NONE")

    def profile(self) -> tuple[Shape, Shape, Shape]:
        return profile_shapes(self.batch, self.chw)

    # -- file ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        mn, opt, mx = self.profile()
        return {
            "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
            "toolkit": self.toolkit, "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": _cc_text(self.compute_capability),
                    **({"targets": list(self.targets)} if self.targets else {})},
            "precision": self.precision,
            "profile": {"input": self.input_name, "output": self.output_name, "chw": list(self.chw),
                        "batch": self.batch.to_dict(), "min": list(mn), "opt": list(opt), "max": list(mx)},
            "source": {"onnx": self.onnx_file, "sha256": self.onnx_sha256},
            "build": {"strongly_typed": self.strongly_typed, "flags": list(self.builder_flags),
                      "workspace_mib": self.workspace_mib, "version_compatible": self.version_compatible,
                      "hardware_compatibility_level": self.hardware_compatibility_level},
            "created": self.created,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineMeta:
        if d.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, not {SIDECAR_FORMAT!r}")
        if int(d.get("format_version", 0)) > SIDECAR_VERSION:
            raise CvtDeployError(f"engine sidecar format version {d['format_version']} is newer than this cvt-deploy reads",
                                 "upgrade cvt-deploy")
        prof, build, src, gpu = d["profile"], d["build"], d["source"], d["gpu"]
        c, h, w = (int(v) for v in prof["chw"])
        return cls(
            tensorrt_version=str(d["tensorrt_version"]), gpu_name=str(gpu["name"]),
            compute_capability=parse_compute_capability(gpu["compute_capability"]),
            precision=str(d["precision"]), batch=BatchRange.from_dict(prof["batch"]),
            input_name=str(prof["input"]), output_name=str(prof.get("output", "")),
            chw=(c, h, w),
            onnx_sha256=str(src.get("sha256", "")), onnx_file=str(src.get("onnx", "")),
            strongly_typed=bool(build["strongly_typed"]), builder_flags=[str(f) for f in build.get("flags", [])],
            workspace_mib=int(build["workspace_mib"]), version_compatible=bool(build["version_compatible"]),
            hardware_compatibility_level=str(build.get("hardware_compatibility_level", "NONE")),
            toolkit=str(d.get("toolkit", "TensorRT")), targets=[str(t) for t in gpu.get("targets", [])],
            created=str(d.get("created", "")), extra=dict(d.get("extra", {})),
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader never sees half a sidecar); returns the path."""
        path = Path(path)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EngineMeta:
        path = Path(path)
        engine = path.with_name(path.name[:-len(".json")]) if path.name.endswith(".json") else path
        rebuild = "rebuild the engine on this machine: cvt-export --format trt --bundle <bundle>"
        if not path.is_file():
            raise CvtDeployError(f"engine {engine.name} has no metadata file {path.name} beside it, so it cannot be "
                                 "checked against this machine's TensorRT and GPU",
                                 f"copy {path.name} along with the engine, or {rebuild}")
        try:
            return cls.from_dict(read_json(path))
        except CvtDeployError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise CvtDeployError(f"engine metadata {path} is damaged ({type(e).__name__}: {e})", rebuild) from None

    # -- compatibility -----------------------------------------------------------------
    def describe_build(self) -> str:
        if self.targets:
            return (f"{self.toolkit} {self.tensorrt_version} ahead of time for compute capability "
                    f"{', '.join(self.targets)} and newer")
        return (f"{self.toolkit} {self.tensorrt_version} on {self.gpu_name} "
                f"(compute capability {_cc_text(self.compute_capability)})")

    def check_compatible(self, runtime_trt_version: str, gpu_name: str,
                         compute_capability: str | tuple[int, int], *,
                         bundle: str | os.PathLike[str] | None = None) -> list[str]:
        """Raise CvtDeployError when this engine cannot run on this TensorRT and GPU.

        Rules (TensorRT's own): an engine needs the exact TensorRT version it was built
        with, unless built version-compatible, which runs on the same or a newer TensorRT
        of the same major version. It needs a GPU of the same compute capability, unless
        built hardware-compatible (AMPERE_PLUS), which runs on any compute capability >=
        8.0. Returns warnings that do not stop loading (same compute capability, other GPU).
        """
        cc = parse_compute_capability(compute_capability)
        here = f"{self.toolkit} {runtime_trt_version} on {gpu_name} (compute capability {_cc_text(cc)})"
        fmt = "trt-rtx" if self.targets else "trt"
        fix = (f"rebuild the engine on this machine: cvt-export --format {fmt} --bundle {bundle or '<bundle>'} "
               f"--precision {self.precision}")
        built, run = version_tuple(self.tensorrt_version), version_tuple(runtime_trt_version)

        if self.version_compatible:
            if run[0] != built[0] or run < built:
                raise CvtDeployError(
                    f"this engine was built version-compatible with {self.describe_build()}; it runs on TensorRT "
                    f"{built[0]}.x from {self.tensorrt_version} on, but this machine has {here}",
                    fix + f", or install TensorRT {built[0]}.x >= {self.tensorrt_version}")
        else:
            n = min(len(built), len(run))  # '10.3.0' and '10.3.0.30' name the same release
            if built[:n] != run[:n]:
                raise CvtDeployError(
                    f"this engine was built with {self.describe_build()} and runs only on that exact TensorRT "
                    f"version, but this machine has {here}",
                    fix + f", or install TensorRT {self.tensorrt_version} (or build with version compatibility)")

        warnings: list[str] = []
        if self.targets:  # an ahead-of-time engine: compiled for the GPU it meets, from the oldest target on
            lowest = min(parse_compute_capability(t) for t in self.targets)
            if cc < lowest:
                raise CvtDeployError(f"this engine was built with {self.describe_build()}, but this machine has {here}",
                                     "run it on an RTX or Ampere-or-newer GPU, or build TensorRT engines for this one "
                                     f"(cvt-export --format trt --bundle {bundle or '<bundle>'})")
        elif self.hardware_compatibility_level == "AMPERE_PLUS":
            if cc < (8, 0):
                raise CvtDeployError(
                    f"this engine was built hardware-compatible (AMPERE_PLUS) with {self.describe_build()}; it runs "
                    f"on compute capability 8.0 and newer, but this machine has {here}", fix)
        elif cc != self.compute_capability:
            raise CvtDeployError(
                f"this engine was built with {self.describe_build()} and runs only on GPUs of compute capability "
                f"{_cc_text(self.compute_capability)}, but this machine has {here}", fix)
        elif gpu_name != self.gpu_name and not self.hardware_compatible:
            warnings.append(f"engine was tuned on {self.gpu_name}, this is {gpu_name} (same compute capability): "
                            "it runs, but may be slower than an engine built here")
        return warnings
