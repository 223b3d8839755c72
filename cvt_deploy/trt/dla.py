"""Jetson DLA: which engines may target a Deep Learning Accelerator core, and the builder settings.

Facts (TensorRT developer guide, "Working with DLA" and "DLA Runtime Configuration"):
DLA runs FP16 and INT8 only; explicit quantization (Q/DQ graphs) does not run on it, only
implicit INT8 calibration, which cvt-deploy does not do (deprecated since TensorRT 10.1); a
layer DLA cannot run (CvT's attention MatMuls, GELU, LayerNorm, Softmax) runs on the GPU
when GPU_FALLBACK is set; DLA wants static shapes. TensorRT 10 builds DLA engines the
classic way (the fp32 graph plus the FP16 builder flag, like ``trtexec --useDLACore=0 --fp16
--allowGPUFallback``); TensorRT 11 takes strongly typed fp16 networks only.
Orin Nano and Thor have no DLA; TensorRT reports ``num_DLA_cores`` 0 there and on x86 GPUs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CvtDeployError
from ..util import BatchRange

if TYPE_CHECKING:
    import tensorrt


def check_dla_core(dla_core: int | None) -> None:
    """None (no DLA) or a core index."""
    if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0):
        raise CvtDeployError(f"--dla-core {dla_core!r} is not a core index", "pass 0 or 1 (AGX Orin has two DLA cores)")


def check_dla_request(dla_core: int | None, precision: str, batch: BatchRange) -> None:
    """Refuse, before any build work, what cannot run on a DLA core."""
    check_dla_core(dla_core)
    if dla_core is None:
        return
    if precision == "int8":  # decision: DLA's rules, from NVIDIA's DLA docs, are trt/dla.py's to keep
        raise CvtDeployError(
            "the int8 engine is built from the Q/DQ graph (explicit quantization), which does not run on DLA; DLA "
            "int8 needs implicit calibration, which TensorRT deprecates and cvt-deploy does not do",
            "build fp16 for the DLA (--precision fp16 --dla-core N), or int8 on the GPU (omit --dla-core)")
    if precision != "fp16":  # decision: as above
        raise CvtDeployError(f"DLA runs fp16 and int8 only, not {precision}", "pass --precision fp16 with --dla-core")
    if batch.dynamic:
        raise CvtDeployError(f"DLA needs static shapes, but the bundle's batch is dynamic ({batch.min}..{batch.max})",
                             "re-export with a fixed batch for the DLA engine: cvt-export --batch-range N")


def dla_strongly_typed(major: int) -> bool:
    """Whether a DLA build is strongly typed on this TensorRT major version (see the module doc)."""
    return major >= 11


def configure_dla(builder: tensorrt.Builder, config: tensorrt.IBuilderConfig, dla_core: int) -> list[str]:
    """Put the network's layers on ``dla_core`` with GPU fallback; returns the flags it set."""
    import tensorrt as trt

    cores = builder.num_DLA_cores
    if dla_core >= cores:
        where = "this device has no DLA (x86 GPUs, Orin Nano and Thor have none)" if cores == 0 \
            else f"this device has {cores} DLA core{'s' * (cores != 1)} (0..{cores - 1})"
        raise CvtDeployError(f"--dla-core {dla_core} does not exist: {where}",
                             "omit --dla-core to build for the GPU, or pick an existing core")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # CvT's attention, GELU and LayerNorm do not run on DLA
    return [trt.BuilderFlag.GPU_FALLBACK.name]
