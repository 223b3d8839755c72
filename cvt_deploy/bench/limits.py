"""What bounds a benchmark row: the fastest GEMM of its kind on the device (measured in the
same run) and whether the model's weights fit the last-level cache.

A "% of matmul peak" is only honest against the fastest matrix multiply the device offers
the row's arithmetic: on one 2-core CPU, ONNX Runtime's fp32 MatMul (MLAS) ran at ~2x
torch's, so dividing by torch's overstated every row ~2x; and OpenVINO's fp32 MatMul can be
faster again than MLAS. So on the CPU the ceilings are ONNX Runtime's fp32 MatMul and its
u8 x s8 MatMulInteger (what the int8 graphs run), and the fp32 matmul of torch and of
OpenVINO where they are installed: fp32 rows divide by the fastest fp32 one, int8 rows by
the integer one, fp16 rows by the fastest fp16 or fp32 GEMM (a CPU has no
fp16 GEMM of its own). On a GPU the ceilings are torch's matmul (cuBLAS) in fp32 and fp16;
there is no int8 GEMM ceiling there yet.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import PRECISION
from .timing import Case, summarize

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(eq=False)
class Ceiling:
    """One GEMM timed beside the models: ``kind`` its arithmetic (fp32, fp16, int8), ``ops`` per call."""

    name: str
    kind: str
    impl: str
    case: Case
    ops: float

    @property
    def gops(self) -> float | None:
        if not self.case.times:
            return None
        return self.ops / (summarize(self.case.times).p50 / 1e3) / 1e9


def _ort_gemm(size: int, threads: int, integer: bool, k: int | None = None, n: int | None = None,
              spin: bool = True) -> Case:
    """A size x K by K x N MatMul (fp32) or MatMulInteger (u8 x s8 -> s32) in ONNX Runtime's CPU
    provider (K and N default to ``size``: a square GEMM; ``spin``: see util.ort_session)."""
    from onnx import TensorProto, helper, numpy_helper

    from ..util import ort_session

    m, k, n = size, k or size, n or size
    rng = np.random.default_rng(0)
    a: np.ndarray
    b: np.ndarray
    if integer:
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type = y_type = TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort_session(model.SerializeToString(), threads, ["CPUExecutionProvider"], spin=spin)
    return Case(f"ort {'int8' if integer else 'fp32'} gemm {m}x{k}x{n}", lambda: session.run(None, {"a": a}))


@dataclass(eq=False)
class LinearGemms:
    """The model's Linear layers at one batch size as ONNX Runtime GEMMs, fp32 and u8 x s8, each
    timed alone (``cases``: (fp32, int8, how many in the model)); see :func:`int8_attainable`."""

    batch: int
    cases: list[tuple[Case, Case, int]]

    def total_ms(self, integer: bool) -> float | None:
        """Milliseconds all of them take once per call (None until timed)."""
        picked = [(c[1] if integer else c[0], c[2]) for c in self.cases]
        if not picked or any(not case.times for case, _ in picked):
            return None
        return sum(count * summarize(case.times).p50 for case, count in picked)


def linear_gemm_cases(shapes: list[tuple[int, int, int, int]], batches: list[int], threads: int,
                      iterations: int = 10) -> list[LinearGemms]:
    """:class:`LinearGemms` per batch size for the model's ``shapes`` (bench/cost.linear_gemms);
    none without ONNX Runtime. A fixed count of calls each: there are dozens of small GEMMs."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return []
    out = []
    for b in batches:
        cases = []
        for m, k, n, count in shapes:
            pair = [_ort_gemm(b * m, threads, integer, k, n, spin=False) for integer in (False, True)]
            for case in pair:
                case.iterations = iterations
            cases.append((pair[0], pair[1], count))
        out.append(LinearGemms(b, cases))
    return out


def int8_attainable(fp32_ms: float, gemms: LinearGemms) -> float | None:
    """The int8 speed-up of a graph whose fp32 call takes ``fp32_ms`` if its Linear layers ran at
    this CPU's u8 x s8 GEMM speed at their own shapes and everything else stayed as in fp32:
    fp32 / (fp32 - Linear fp32 + Linear int8). What no int8 graph that quantizes only its Linear
    layers can beat (above 1.0 of it: the graph also gains elsewhere, e.g. int8 convolutions or
    fused kernels). Where the Linear GEMMs alone take longer than the whole call (fused kernels),
    the rest is taken as 0 and the GEMMs as scaled down to the call."""
    g32, g8 = gemms.total_ms(False), gemms.total_ms(True)
    if not g32 or g8 is None or fp32_ms <= 0:
        return None
    rest = max(fp32_ms - g32, 0.0)
    return fp32_ms / (rest + g8 * min(1.0, fp32_ms / g32))


def _torch_gemm(size: int, device: str, dtype: str) -> tuple[Case, str]:
    import torch

    gen = torch.Generator().manual_seed(0)
    t = getattr(torch, str(PRECISION[dtype].torch_dtype))
    a = torch.randn(size, size, generator=gen).to(device, t)
    b = torch.randn(size, size, generator=gen).to(device, t)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return Case(f"torch {dtype} gemm", lambda: torch.matmul(a, b), sync), f"torch {torch.__version__} matmul {dtype}"


def _openvino_gemm(size: int, threads: int) -> tuple[Case, str]:
    """A size x size fp32 MatMul compiled by OpenVINO's CPU plugin as the model rows are
    (runtimes/openvino.py's settings: f32, not the bf16 the plugin picks by itself on AMX CPUs)."""
    import openvino as ov

    from ..runtimes.openvino import F32, compile_config

    try:
        from openvino import opset13 as ops
    except ImportError:  # OpenVINO 2024.0-2024.x kept the opsets under openvino.runtime
        from openvino.runtime import opset13 as ops
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), np.float32)
    param = ops.parameter([size, size], np.float32, name="a")
    product = ops.matmul(param, ops.constant(rng.standard_normal((size, size), np.float32)), False, False)
    compiled = ov.Core().compile_model(ov.Model([product], [param], "gemm"), "CPU", compile_config(threads, F32))
    request = compiled.create_infer_request()
    # share_outputs: no copy of the 4-byte x size^2 result per call (ONNX Runtime's session.run makes none either)
    return (Case("openvino fp32 gemm", lambda: request.infer({0: a}, share_inputs=True, share_outputs=True)),
            f"openvino {ov.get_version().split('-')[0]} CPU MatMul fp32")


def ceilings(size: int, device: str, threads: int) -> list[Ceiling]:
    """The GEMMs to time in this run (size x size x size, ``threads`` CPU threads)."""
    ops = 2.0 * size ** 3
    out: list[Ceiling] = []
    has_torch = importlib.util.find_spec("torch") is not None
    if device == "cpu":
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            impl = f"onnxruntime {onnxruntime.__version__} CPU"
            out.append(Ceiling("ort-fp32", "fp32", f"{impl} MatMul fp32 (MLAS)", _ort_gemm(size, threads, False), ops))
            out.append(Ceiling("ort-int8", "int8", f"{impl} MatMulInteger u8 x s8", _ort_gemm(size, threads, True), ops))
        if has_torch:
            case, impl = _torch_gemm(size, device, "fp32")
            out.append(Ceiling("torch-fp32", "fp32", impl, case, ops))
        if importlib.util.find_spec("openvino") is not None:
            case, impl = _openvino_gemm(size, threads)
            out.append(Ceiling("openvino-fp32", "fp32", impl, case, ops))
        if not out:  # neither library: numpy's BLAS, whose threads --threads does not set
            rng = np.random.default_rng(0)
            an, bn = rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)
            out.append(Ceiling("numpy-fp32", "fp32", f"numpy {np.__version__} (its BLAS threads are not set by --threads)",
                               Case("numpy fp32 gemm", lambda: an @ bn), ops))
    elif has_torch:
        for dtype in ("fp32", "fp16"):
            case, impl = _torch_gemm(size, device, dtype)
            out.append(Ceiling(f"torch-{dtype}", dtype, impl, case, ops))
    return out


def best(found: list[Ceiling], precision: str) -> Ceiling | None:
    """The fastest measured ceiling for a row of ``precision`` (int8 rows: the integer GEMM)."""
    kinds = PRECISION[precision].gemm_kinds
    timed = [c for c in found if c.kind in kinds and c.gops is not None]
    return max(timed, key=lambda c: c.gops or 0.0, default=None)


def int8_limit(found: list[Ceiling]) -> float | None:
    """How much faster than fp32 this CPU multiplies in int8: the fastest u8 x s8 GEMM's GOP/s
    over the fastest fp32 GEMM's, both timed in this run (None unless both were)."""
    integer, floating = best(found, "int8"), best(found, "fp32")
    if integer is None or floating is None or not integer.gops or not floating.gops:
        return None
    return integer.gops / floating.gops


def llc_bytes() -> int | None:
    """Size of the largest (last-level) CPU cache from sysfs, or None where it cannot be read."""
    sizes = []
    try:
        for index in SYSFS_CACHE.glob("index*"):
            kind = (index / "type").read_text().strip()
            if kind not in ("Unified", "Data"):
                continue
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append((int((index / "level").read_text()), int(text.rstrip("KMG")) * scale))
    except (OSError, ValueError):
        return None
    return max(sizes)[1] if sizes else None


def fits_llc(weights: int | None, llc: int | None) -> str:
    """"yes" / "no" / "unknown": whether ``weights`` bytes fit a last-level cache of ``llc`` bytes."""
    if weights is None or llc is None:
        return "unknown"
    return "yes" if weights <= llc else "no"


def ceilings_meta(found: list[Ceiling]) -> dict[str, Any]:
    return {c.name: {"kind": c.kind, "impl": c.impl, "gops": None if c.gops is None else round(c.gops, 2),
                     "error": c.case.error} for c in found}
