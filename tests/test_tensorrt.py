"""TensorRT: engine metadata, profiles, the missing-TensorRT path, and (with a GPU) real builds.

Everything above the "real TensorRT" section runs anywhere: it tests our own logic
(sidecars, compatibility rules, profiles, TensorRT detection, the Runtime base class, and
the errors users get without TensorRT). The tests below it build and run real engines and
are skipped, with the reason, where TensorRT or a GPU is missing. Nothing here imitates
TensorRT.
"""
from __future__ import annotations

import importlib
import importlib.abc
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pytest

from cvt_deploy import bundle_write

import cvt_deploy.backends as rt
from cvt_deploy.bundle import PRECISIONS, Artifact, BatchRange, Bundle
from cvt_deploy.config import CvtConfig, get_config
from cvt_deploy.errors import CvtDeployError, MissingDependencyError
from cvt_deploy.trt import loader as trt_export
from cvt_deploy.runtimes.base import Runtime
from cvt_deploy.trt.runner import TensorRTRuntime
from cvt_deploy.trt.sidecar import EngineMeta, profile_shapes, sidecar_path
from cvt_deploy.trt.util import (DEFAULT_WORKSPACE_MIB, cuda_device_index, default_workspace_mib, install_hint,
                                 tensorrt_unavailable_reason, version_tuple)
from conftest import InProcessRuntime

TRT_MISSING = tensorrt_unavailable_reason()
needs_no_tensorrt = pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed: its missing path cannot occur")


# ---------------------------------------------------------------------------------------
# A small hand-made bundle (no export code, no torch): a real ONNX graph, GAP + Flatten + Gemm


def write_tiny_onnx(path: Path, cfg: CvtConfig, fixed_batch: int | None = None) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n: int | str = fixed_batch if fixed_batch is not None else "N"
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [n, cfg.in_chans, cfg.img_size, cfg.img_size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, cfg.num_classes])
    w = numpy_helper.from_array(rng.standard_normal((cfg.in_chans, cfg.num_classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cfg.num_classes).astype(np.float32), "b")
    graph = helper.make_graph([
        helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="/flatten/Flatten"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="/head/Gemm"),
    ], "tiny", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def onnx_bundle(tmp_path: Path) -> Bundle:
    cfg = get_config("cvt-tiny", num_classes=10)
    with bundle_write.create(tmp_path / "b", cfg, BatchRange(1, 4, 8), extra={}) as bundle:
        write_tiny_onnx(bundle.root / "model.onnx", cfg)
        bundle.add(Artifact(name="onnx-fp32", file="model.onnx", kind="onnx", precision="fp32",
                            info={"input": "pixel_values", "output": "logits"}))
    return Bundle.open(tmp_path / "b")


def test_hand_made_bundle_is_a_real_onnx_graph(onnx_bundle: Bundle) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_bundle.path(onnx_bundle.require("onnx", "fp32"))), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    assert sess.run(None, {"pixel_values": x})[0].shape == (3, 10)


# ---------------------------------------------------------------------------------------
# Optimization profile and workspace


def test_profile_from_dynamic_batch_range() -> None:
    assert profile_shapes(BatchRange(1, 8, 32), (3, 224, 224)) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))


def test_profile_from_fixed_batch() -> None:
    fixed = BatchRange.parse("4")
    assert not fixed.dynamic
    assert profile_shapes(fixed, (3, 64, 64)) == ((4, 3, 64, 64),) * 3


def test_profile_from_two_part_range_uses_its_opt() -> None:
    assert profile_shapes(BatchRange.parse("1:32"), (3, 384, 384))[1] == (8, 3, 384, 384)


def test_profile_rejects_empty_image() -> None:
    with pytest.raises(CvtDeployError, match="below 1"):
        profile_shapes(BatchRange(), (3, 0, 224))


def test_workspace_default_and_clamp_to_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import cvt_deploy.trt.util as tm

    monkeypatch.setattr(tm, "cuda_free_memory", lambda index=0: None)  # free memory unknown
    assert default_workspace_mib() == DEFAULT_WORKSPACE_MIB == 1024
    assert default_workspace_mib(free_bytes=8 << 30) == 1024      # plenty free: the default
    assert default_workspace_mib(free_bytes=1 << 30) == 512       # a busy Jetson: half of what is free
    assert default_workspace_mib(free_bytes=50 << 20) == 64       # never below a usable floor


def test_cuda_device_names() -> None:
    assert cuda_device_index(None) == 0
    assert cuda_device_index("cuda") == 0
    assert cuda_device_index("cuda:2") == 2
    with pytest.raises(CvtDeployError, match="CUDA GPUs only.*'cpu'"):
        cuda_device_index("cpu")


def test_engine_file_names() -> None:
    assert trt_export.engine_file("fp16") == "model.fp16.engine"
    assert sidecar_path(Path("b") / "model.fp16.engine") == Path("b") / "model.fp16.engine.json"


# ---------------------------------------------------------------------------------------
# Sidecar


def make_meta(**kw: Any) -> EngineMeta:
    base: dict[str, Any] = dict(
        tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability=(8, 7), precision="fp16",
        batch=BatchRange(1, 4, 8), input_name="pixel_values", output_name="logits", chw=(3, 64, 64),
        onnx_sha256="ab" * 32, onnx_file="model.fp16.onnx", strongly_typed=True, builder_flags=[],
        workspace_mib=1024)
    base.update(kw)
    return EngineMeta(**base)


def test_sidecar_round_trip(tmp_path: Path) -> None:
    meta = make_meta(builder_flags=["FP16", "OBEY_PRECISION_CONSTRAINTS"], strongly_typed=False,
                     version_compatible=True, hardware_compatibility_level="AMPERE_PLUS", extra={"fp32_layers": 12})
    path = meta.write(sidecar_path(tmp_path / "model.fp16.engine"))
    assert path.name == "model.fp16.engine.json"
    assert EngineMeta.read(path) == meta
    raw = __import__("json").loads(path.read_text())
    # Readable without cvt-deploy: what trtexec users need to rebuild by hand.
    assert raw["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    assert raw["profile"]["min"] == [1, 3, 64, 64] and raw["profile"]["max"] == [8, 3, 64, 64]
    assert raw["build"]["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]


def test_sidecar_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sidecar_path(tmp_path / "model.fp16.engine")
    make_meta().write(path)
    newer = make_meta(tensorrt_version="10.13.0.35")

    def broken() -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(newer, "to_dict", broken)
    with pytest.raises(OSError, match="disk full"):
        newer.write(path)
    assert EngineMeta.read(path).tensorrt_version == "10.3.0.30"  # the old record survived intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left behind


def test_sidecar_missing_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(CvtDeployError) as e:
        EngineMeta.read(sidecar_path(tmp_path / "model.fp16.engine"))
    assert "model.fp16.engine has no metadata file model.fp16.engine.json" in e.value.message
    assert "cvt-export --format trt --bundle" in (e.value.hint or "")


def test_sidecar_damaged(tmp_path: Path) -> None:
    path = tmp_path / "model.fp16.engine.json"
    path.write_text('{"format": "cvt-deploy-engine", "format_version": 1}')
    with pytest.raises(CvtDeployError, match="damaged"):
        EngineMeta.read(path)
    path.write_text("not json")
    with pytest.raises(CvtDeployError, match="damaged"):
        EngineMeta.read(path)


def test_sidecar_from_newer_cvt_deploy(tmp_path: Path) -> None:
    path = make_meta().write(tmp_path / "e.engine.json")
    path.write_text(path.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(CvtDeployError, match="upgrade cvt-deploy"):
        EngineMeta.read(path)


def test_sidecar_rejects_unknown_precision() -> None:
    with pytest.raises(CvtDeployError, match="'fp8'"):
        make_meta(precision="fp8")


# ---------------------------------------------------------------------------------------
# Compatibility rules


def test_same_machine_is_compatible() -> None:
    assert make_meta().check_compatible("10.3.0.30", "Orin", (8, 7)) == []
    assert make_meta().check_compatible("10.3.0", "Orin", "8.7") == []  # same release, shorter version string


def test_other_tensorrt_version_is_refused_with_both_versions_and_the_fix() -> None:
    with pytest.raises(CvtDeployError) as e:
        make_meta().check_compatible("10.13.0.35", "Orin", (8, 7), bundle="/data/cvt13")
    msg = e.value.message
    assert "built with TensorRT 10.3.0.30 on Orin (compute capability 8.7)" in msg
    assert "this machine has TensorRT 10.13.0.35 on Orin" in msg
    assert "cvt-export --format trt --bundle /data/cvt13 --precision fp16" in (e.value.hint or "")


def test_version_compatible_engine_runs_on_newer_same_major() -> None:
    meta = make_meta(version_compatible=True)
    assert meta.check_compatible("10.13.0.35", "Orin", (8, 7)) == []
    with pytest.raises(CvtDeployError, match="from 10.3.0.30 on"):
        meta.check_compatible("10.1.0", "Orin", (8, 7))  # older than the builder
    with pytest.raises(CvtDeployError, match="runs on TensorRT 10.x"):
        meta.check_compatible("11.0.0", "Orin", (8, 7))  # another major version


def test_other_compute_capability_is_refused() -> None:
    with pytest.raises(CvtDeployError) as e:
        make_meta().check_compatible("10.3.0.30", "NVIDIA H100 80GB HBM3", (9, 0))
    assert "compute capability 8.7" in e.value.message and "(compute capability 9.0)" in e.value.message
    assert "H100" in e.value.message and "--precision fp16" in (e.value.hint or "")


def test_same_compute_capability_other_gpu_only_warns() -> None:
    warnings = make_meta(gpu_name="NVIDIA A10", compute_capability=(8, 6)).check_compatible(
        "10.3.0.30", "NVIDIA RTX A6000", (8, 6))
    assert len(warnings) == 1 and "tuned on NVIDIA A10" in warnings[0]


def test_hardware_compatible_engine_runs_on_ampere_and_newer() -> None:
    meta = make_meta(gpu_name="NVIDIA A10", compute_capability=(8, 6), hardware_compatibility_level="AMPERE_PLUS")
    assert meta.check_compatible("10.3.0.30", "NVIDIA L4", (8, 9)) == []
    assert meta.check_compatible("10.3.0.30", "NVIDIA H100", (9, 0)) == []
    with pytest.raises(CvtDeployError, match="compute capability 8.0 and newer.*Tesla T4 \\(compute capability 7.5\\)"):
        meta.check_compatible("10.3.0.30", "Tesla T4", (7, 5))


def test_same_compute_capability_level_keeps_the_capability_check() -> None:
    meta = make_meta(hardware_compatibility_level="SAME_COMPUTE_CAPABILITY", compute_capability=(8, 6), gpu_name="A10")
    assert meta.check_compatible("10.3.0.30", "RTX A6000", (8, 6)) == []  # no "other GPU" warning
    with pytest.raises(CvtDeployError, match="compute capability 8.6"):
        meta.check_compatible("10.3.0.30", "L4", (8, 9))


def test_version_and_hardware_compatible_together() -> None:
    meta = make_meta(version_compatible=True, hardware_compatibility_level="AMPERE_PLUS", compute_capability=(8, 6))
    assert meta.check_compatible("10.13.0.35", "NVIDIA H100", (9, 0)) == []


def test_version_strings() -> None:
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert version_tuple("8.6.2+cuda12") == (8, 6, 2)
    with pytest.raises(CvtDeployError):
        version_tuple("unknown")


# ---------------------------------------------------------------------------------------
# Which ONNX graph an engine is built from (pure logic: no TensorRT needed)


def test_strongly_typed_fp16_needs_the_fp16_graph(onnx_bundle: Bundle) -> None:
    with pytest.raises(CvtDeployError) as e:
        trt_export.source_graph(onnx_bundle, "fp16", strongly_typed=True, version="10.13.0.35")
    assert "no fp16 ONNX graph" in e.value.message and "strongly typed" in e.value.message
    assert "onnx-fp32" in e.value.message  # says what the bundle does have
    assert "--precision fp16" in (e.value.hint or "")


def test_weakly_typed_fp16_uses_the_fp32_graph(onnx_bundle: Bundle) -> None:
    assert trt_export.source_graph(onnx_bundle, "fp16", strongly_typed=False, version="8.6.2").name == "onnx-fp32"
    assert trt_export.source_graph(onnx_bundle, "fp32", strongly_typed=True, version="10.13.0").name == "onnx-fp32"
    with pytest.raises(CvtDeployError, match="no int8 ONNX graph"):
        trt_export.source_graph(onnx_bundle, "int8", strongly_typed=False, version="8.6.2")


def test_tensorrt_8_5_needs_graphs_written_for_it(onnx_bundle: Bundle) -> None:
    # 8.5 has no LayerNormalization importer: graphs not written for it (here: no record, as in bundles
    # from before --tensorrt existed) are refused before TensorRT parses them.
    assert "tensorrt" not in onnx_bundle.artifacts["onnx-fp32"].info
    with pytest.raises(CvtDeployError, match="cannot import") as e:
        trt_export.source_graph(onnx_bundle, "fp16", strongly_typed=False, version="8.5.2.2")
    assert "cvt-export --tensorrt 8.5" in (e.value.hint or "")
    assert trt_export.source_graph(onnx_bundle, "fp16", strongly_typed=False, version="8.6.2").name == "onnx-fp32"


# ---------------------------------------------------------------------------------------
# Detecting real TensorRT


@needs_no_tensorrt
def test_tensorrt_stubs_are_not_tensorrt() -> None:
    try:
        mod = importlib.import_module("tensorrt")
    except ImportError:
        pytest.skip("tensorrt-stubs are not installed in this environment")
    assert not hasattr(mod, "Builder")  # the empty namespace package the stubs create
    reason = tensorrt_unavailable_reason()
    assert reason is not None and "not the TensorRT libraries" in reason


def test_install_hint_names_every_way_to_get_tensorrt() -> None:
    hint = install_hint()
    assert "pip install 'cvt-deploy[gpu]'" in hint and "pip install tensorrt" in hint
    assert "JetPack" in hint and "pypi.nvidia.com" in hint
    assert "cvt-export --format trt --bundle <bundle>" in hint  # or carry the ONNX bundle to the device


def test_detection_of_an_empty_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert "only an empty 'tensorrt' package" in (tensorrt_unavailable_reason() or "")


def test_detection_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    assert "TensorRT is not installed" in (tensorrt_unavailable_reason() or "")


def test_detection_when_libnvinfer_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class MissingLibrary(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name == "tensorrt":
                raise OSError("libnvinfer.so.10: cannot open shared object file")
            return None

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [MissingLibrary(), *sys.meta_path])
    reason = tensorrt_unavailable_reason() or ""
    assert "cannot be loaded" in reason and "libnvinfer.so.10" in reason


def test_tensorrt_modules_import_neither_torch_nor_tensorrt() -> None:
    code = ("import sys, cvt_deploy.trt.util, cvt_deploy.trt.sidecar, cvt_deploy.trt.runner, cvt_deploy.trt.loader; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------
# Runtime.run: splitting and padding (the base class that TensorRTRuntime relies on)


class MeanLinearRuntime(InProcessRuntime):
    """Logits = per-channel image mean @ W: real arithmetic, so padding or order bugs show."""

    backend: ClassVar[str] = "test"

    def __init__(self, batch: BatchRange | None) -> None:
        super().__init__(get_config("cvt-tiny", num_classes=5), "fp32", "cpu", batch)
        self.w = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
        self.calls: list[int] = []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        assert self.batch_range is None or self.batch_range.min <= len(batch) <= self.batch_range.max, len(batch)
        self.calls.append(len(batch))
        return batch.mean(axis=(2, 3)) @ self.w

    def expected(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(batch.mean(axis=(2, 3)) @ self.w, dtype=np.float32)


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("batch, n, calls", [
    (BatchRange(4, 4, 4), 10, [4, 4, 4]),   # fixed batch: last chunk of 2 padded to 4
    (BatchRange(4, 4, 4), 4, [4]),
    (BatchRange(4, 4, 4), 1, [4]),
    (BatchRange(2, 4, 8), 1, [2]),           # below the profile minimum: padded
    (BatchRange(2, 4, 8), 17, [8, 8, 2]),    # above the maximum: split, remainder padded
    (BatchRange(2, 4, 8), 5, [5]),           # inside the range: one call
    (None, 33, [33]),                        # no range: any size in one call
])
def test_run_splits_and_pads_to_the_batch_range(batch: BatchRange | None, n: int, calls: list[int]) -> None:
    runtime = MeanLinearRuntime(batch)
    x = images(n)
    out = runtime.run(x)
    assert runtime.calls == calls
    assert out.shape == (n, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, runtime.expected(x), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Without TensorRT: clear errors raised by our code, not tracebacks from deep inside


@needs_no_tensorrt
def test_build_engine_without_tensorrt(onnx_bundle: Bundle) -> None:
    with pytest.raises(MissingDependencyError) as e:
        trt_export.build_engine(onnx_bundle, "fp16")
    assert isinstance(e.value, CvtDeployError)
    assert e.value.message.startswith("building a TensorRT engine needs TensorRT: ")
    assert "JetPack" in (e.value.hint or "") and "cvt-export --format trt --bundle <bundle>" in (e.value.hint or "")
    assert e.value.__cause__ is None and e.value.__context__ is None
    assert Path(str(e.traceback[-1].path)).name == "util.py"  # raised by our check, not by an import
    assert not (onnx_bundle.root / "model.fp16.engine").exists()
    assert set(Bundle.open(onnx_bundle.root).artifacts) == {"onnx-fp32"}


def test_build_engine_rejects_unknown_precision(onnx_bundle: Bundle) -> None:
    with pytest.raises(CvtDeployError, match="unknown precision 'fp8'"):
        trt_export.build_engine(onnx_bundle, "fp8")


@needs_no_tensorrt
def test_load_tensorrt_backend_without_tensorrt(onnx_bundle: Bundle) -> None:
    with pytest.raises(CvtDeployError) as e:
        rt.load(onnx_bundle, backend="tensorrt")
    assert e.value.message.startswith("backend tensorrt cannot run here: ")
    assert TRT_MISSING is not None and TRT_MISSING in e.value.message
    assert "pip install 'cvt-deploy[gpu]'" in (e.value.hint or "") and "cuda-python" in (e.value.hint or "")
    assert e.value.__context__ is None


@needs_no_tensorrt
def test_tensorrt_runtime_from_bundle_without_tensorrt(onnx_bundle: Bundle) -> None:
    assert TensorRTRuntime.unavailable_reason() == TRT_MISSING
    with pytest.raises(CvtDeployError, match="the TensorRT backend cannot run here"):
        TensorRTRuntime.from_bundle(onnx_bundle)


def test_tensorrt_backend_refuses_the_cpu(onnx_bundle: Bundle) -> None:
    with pytest.raises(CvtDeployError, match="CUDA GPUs only"):
        cuda_device_index("cpu")
    # Where TensorRT is missing, that is the reason given first (it holds on every device).
    assert (TensorRTRuntime.unavailable_reason("cpu") or "").startswith(TRT_MISSING or "TensorRT runs on CUDA GPUs only")
    with pytest.raises(CvtDeployError):
        rt.load(onnx_bundle, backend="tensorrt", device="cpu")


# ---------------------------------------------------------------------------------------
# Real TensorRT on a GPU: build engines and compare them with ONNX Runtime

GPU_REASON = TRT_MISSING or TensorRTRuntime.unavailable_reason()
needs_tensorrt = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {GPU_REASON}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Bundle]:
    """``(which) -> Bundle`` with fp32/fp16/int8 ONNX graphs: "tiny" (random weights) or "demo"."""
    made: dict[str, Bundle] = {}

    def make(which: str) -> Bundle:
        if which not in made:
            import cvt_deploy
            from cvt_deploy.demo import DEMO_WEIGHTS
            from cvt_deploy.export.pipeline import export_bundle

            model = (cvt_deploy.load_checkpoint(str(DEMO_WEIGHTS)) if which == "demo"
                     else cvt_deploy.create_model("cvt-tiny", num_classes=10))
            out = tmp_path_factory.mktemp(f"trt-{which}") / "bundle"
            export_bundle(model, out, precisions=PRECISIONS, batch=BatchRange(1, 4, 8), check=False, progress=False)
            made[which] = Bundle.open(out)
        return made[which]

    return make


def _eval_batch(bundle: Bundle) -> tuple[np.ndarray, np.ndarray | None]:
    from cvt_deploy.data import load_eval_data

    ev = load_eval_data(None, bundle.config, limit=64, progress=False)
    return ev.batch, ev.labels


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("which", ["tiny", "demo"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_matches_onnxruntime(exported: Callable[[str], Bundle], which: str, precision: str) -> None:
    from cvt_deploy.parity import compare

    bundle = exported(which)
    art = trt_export.build_engine(bundle, precision, progress=False)
    engine = bundle.path(art)
    assert art.name == f"tensorrt-{precision}" and engine.name == f"model.{precision}.engine"
    assert not engine.read_bytes()[:1] == b"{"  # a plain plan: no header glued in front
    meta = EngineMeta.read(sidecar_path(engine))
    assert meta.precision == precision and meta.batch == bundle.batch
    assert Bundle.open(bundle.root).find("tensorrt", precision) is not None

    batch, labels = _eval_batch(bundle)
    reference = rt.load(bundle, backend="onnxruntime", precision="fp32", device="cpu").run(batch)
    runtime = rt.load(bundle, backend="tensorrt", precision=precision)
    assert isinstance(runtime, TensorRTRuntime)
    with runtime:
        candidate = runtime.run(batch)  # 64 images through a 1..8 profile: split into chunks
    report = compare(reference, candidate, labels=labels, precision=precision)
    assert report, report


@pytest.mark.tensorrt
@needs_tensorrt
def test_engine_runtime_is_thread_safe(exported: Callable[[str], Bundle], tmp_path: Path) -> None:
    bundle = exported("tiny")
    cache = tmp_path / "timing.cache"
    trt_export.build_engine(bundle, "fp32", timing_cache=cache, progress=False)
    assert cache.is_file() and cache.stat().st_size > 0  # saved for the next build
    batch, _ = _eval_batch(bundle)
    with TensorRTRuntime.from_bundle(bundle, precision="fp32") as runtime:
        expected = runtime.run(batch[:5])
        results: list[np.ndarray] = []
        threads = [threading.Thread(target=lambda: results.append(runtime.run(batch[:5]))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4
        for r in results:
            np.testing.assert_array_equal(r, expected)



def test_tensorrt_8_5_takes_graphs_written_for_it(onnx_bundle: Bundle) -> None:
    art = onnx_bundle.artifacts["onnx-fp32"]
    art.info.update(tensorrt=["8.5", "8.6", "10"], fp32_nodes=["n/ReduceMean_0"])
    assert trt_export.source_graph(onnx_bundle, "fp16", strongly_typed=False, version="8.5.2.2") is art
