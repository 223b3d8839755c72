"""What this CPU offers the kernels: its SIMD features, the instruction-set cap a user may put
on oneDNN (OpenVINO's CPU kernels), and whether 8-bit dot products there saturate.

The saturation: x86 CPUs without VNNI (AVX2 laptops and cloud CPUs, AVX-512 before Cascade
Lake, AMD before Zen 4) multiply int8 by ``vpmaddubsw``, which sums each pair of u8 x s8
products into 16 bits with saturation; oneDNN feeds signed activations to it shifted to u8
(0..255), so two products of up to 255 x 127 overflow 32767 and the result is silently wrong.
VNNI (``vpdpbusd``) and AMX accumulate in 32 bits. Weights of at most 7 bits (|w| <= 64:
2 x 255 x 64 = 32640) cannot overflow: OpenVINO's documented workaround ("Saturation
(overflow) issue", NNCF's ``overflow_fix``), which the OpenVINO IR of an int8 bundle uses
(export/openvino.py). ONNX Runtime's MLAS widens to 16 bits before it multiplies on such CPUs
and is not affected.

Measured on the demo model's int8 graph, OpenVINO 2026.4 with oneDNN capped at AVX2 on an
AVX-512 VNNI CPU (the cap reproduces an AVX2 machine's kernels): min logit cosine to fp32
0.71 with 8-bit weights (0.998 uncapped), 0.998 with 7-bit weights capped or not (the same logits).
"""
from __future__ import annotations

import os
import platform

# The widest int8 weight whose products cannot overflow those 16-bit pair sums: 2 x 255 x 64 < 2**15 (7 bits).
SAFE_INT8_WEIGHT = 64
# The x86 and Arm features that decide which int8/fp32 kernels ONNX Runtime and OpenVINO pick.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
            "amx_fp16", "asimd", "asimddp", "sve", "i8mm")
# oneDNN's instruction-set cap (its documented variables; ONEDNN_ wins over DNNL_).
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# The caps under which oneDNN may use 32-bit int8 accumulation, by the CPU feature each needs.
_AVX2_VNNI_CAPS = {"AVX2_VNNI", "AVX2_VNNI_2"}
_AVX512_VNNI_CAPS = {"AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512"}
_AMX_CAPS = {"AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
             "AVX10_2_512_AMX_2"}


def cpu_features() -> list[str]:
    """This CPU's features among :data:`FEATURES` (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in FEATURES if x in have]
    except OSError:
        pass
    return []


def isa_cap() -> str | None:
    """The instruction set oneDNN is capped at in this process (``ONEDNN_MAX_CPU_ISA``), upper case; None: no cap."""
    for name in ISA_CAP_VARIABLES:
        value = os.environ.get(name, "").strip().upper()
        if value:
            return None if value == "ALL" else value
    return None


def int8_saturation() -> str | None:
    """Why oneDNN's int8 dot products on this CPU saturate with 8-bit weights, naming the
    missing feature; None where they accumulate in 32 bits (VNNI, AMX), on non-x86 CPUs, and
    where the features cannot be read (no /proc/cpuinfo)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    have = set(cpu_features())
    if not have:
        return None
    cap = isa_cap()
    usable = [f for f, caps in (("amx_int8", _AMX_CAPS), ("avx512_vnni", _AVX512_VNNI_CAPS | _AMX_CAPS),
                                ("avx_vnni", _AVX2_VNNI_CAPS)) if f in have and (cap is None or cap in caps)]
    if usable:
        return None
    if cap is not None and have & {"amx_int8", "avx512_vnni", "avx_vnni"}:
        return (f"oneDNN is capped at {cap} in this process (ONEDNN_MAX_CPU_ISA), which leaves out the CPU's VNNI, "
                "so its int8 dot products sum pairs of 8-bit products in 16 bits and overflow")
    return ("this CPU has no VNNI (none of avx512_vnni, avx_vnni, amx_int8 in /proc/cpuinfo), so OpenVINO's int8 dot "
            "products sum pairs of 8-bit products in 16 bits and overflow")


def cpu_key() -> str:
    """What a CPU timing is valid for: the architecture, its kernel-deciding features and a oneDNN cap."""
    cap = isa_cap()
    return " ".join([platform.machine() or "unknown", *cpu_features(), *([f"onednn-max-isa={cap}"] if cap else [])])
