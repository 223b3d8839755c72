"""The OpenVINO backend: every precision of the demo bundle through the parity gates, the same
logits as ONNX Runtime at any batch, raw-pixel graphs, clean errors, and what cvt-bench adds
for it (its fp32 GEMM ceiling, the int8 speed-up against the CPU's own limit)."""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed: pip install 'cvt-deploy[openvino]'")
pytest.importorskip("onnxruntime", reason="the OpenVINO results are compared with ONNX Runtime's")

from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.cpu import int8_saturation  # noqa: E402
from cvt_deploy.errors import CvtDeployError, NotRightHere  # noqa: E402
from cvt_deploy.preprocess import preprocess  # noqa: E402
from cvt_deploy.backends import BACKENDS, PREFERENCE, available_backends, load  # noqa: E402
from cvt_deploy.runtimes.openvino import OpenVinoRuntime  # noqa: E402
from cvt_deploy.runtimes.ort import OrtRuntime  # noqa: E402
from conftest import raw_pixel_copy, run_cli, run_script  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")
# Whether OpenVINO's int8 kernels overflow 8-bit weights on this CPU (no VNNI): the portable int8
# graph is then refused on OpenVINO, naming the feature, and the IR (7-bit weights) runs instead.
SATURATES = int8_saturation()


def assert_refused_for_vnni(err: BaseException) -> None:
    text = str(err)
    assert isinstance(err, NotRightHere) and "VNNI" in text and "16 bits" in text, text
    assert "7-bit" in text and "--format openvino" in text and "--backend onnxruntime" in text, text


@pytest.fixture(scope="module")
def images(demo_test_split: Any, demo_full_bundle: Path) -> np.ndarray:
    """Held-out demo digits, preprocessed: real images, so int8 is compared where it is calibrated."""
    n = Bundle.open(demo_full_bundle).batch.max
    return preprocess(list(demo_test_split.images[:n]), Bundle.open(demo_full_bundle).config.preprocess)


@pytest.fixture(scope="module")
def ov_runtimes(demo_full_bundle: Path) -> dict[str, OpenVinoRuntime]:
    """OpenVINO on each portable graph of the demo bundle that this CPU runs right (int8 only with VNNI)."""
    out = {}
    for p in PRECISIONS:
        if p == "int8" and SATURATES:
            continue
        rt = load(demo_full_bundle, backend="openvino", precision=p, threads=1)
        assert isinstance(rt, OpenVinoRuntime)
        out[p] = rt
    return out


def test_registered_after_onnxruntime_so_load_still_picks_onnxruntime(demo_bundle: Path) -> None:
    assert BACKENDS["openvino"] == "cvt_deploy.runtimes.openvino:OpenVinoRuntime"
    assert PREFERENCE.index("onnxruntime") < PREFERENCE.index("openvino") < PREFERENCE.index("torch")
    assert available_backends(Bundle.open(demo_bundle))["openvino"] is None
    assert load(demo_bundle).backend == "onnxruntime"
    bare = load(demo_bundle / "model.onnx", backend="openvino")  # a bare graph: its metadata says what it is
    assert isinstance(bare, OpenVinoRuntime) and bare.config == Bundle.open(demo_bundle).config


def test_runs_the_portable_graph_in_the_graphs_precision(ov_runtimes: dict[str, OpenVinoRuntime],
                                                        demo_full_bundle: Path) -> None:
    bundle = Bundle.open(demo_full_bundle)
    for p, rt in ov_runtimes.items():
        assert rt.precision == p and rt.backend == "openvino" and rt.batch_range is None  # dynamic batch
        assert rt.path == str(bundle.path(bundle.require("onnx", p)))  # not the ONNX Runtime CPU graph
        assert rt.compiled_model().get_property("INFERENCE_NUM_THREADS") == 1
        hint = str(rt.compiled_model().get_property("INFERENCE_PRECISION_HINT"))
        # fp32 and int8 in f32, never the bf16 OpenVINO picks by itself on AMX / AVX512-BF16 CPUs
        assert ("float16" if rt.compute == "f16" else "float32") in hint, hint
        assert (p == "fp16") or rt.compute == "f32"
        assert ("computed in f32" in rt.describe()) == (p == "fp16" and rt.compute == "f32")


def test_every_precision_passes_the_parity_gates(demo_full_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every portable graph this CPU runs right passes; on a CPU without VNNI the int8 one is not
    run (said, naming the feature), and checking it alone is a clear refusal."""
    from cvt_deploy.parity import check_bundle

    bundle = Bundle.open(demo_full_bundle)
    reports = check_bundle(bundle, backends=["openvino"], limit=128, progress=False)
    runnable = [p for p in PRECISIONS if not (p == "int8" and SATURATES)]
    assert sorted(r.precision for r in reports) == sorted(runnable)
    for r in reports:
        assert r.candidate.startswith("openvino") and r.reference.startswith("torch fp32"), r.candidate
        assert r, f"{r.candidate}: {r.failed}"
        assert r.artifact == bundle.require("onnx", r.precision).name
    if SATURATES:
        assert "onnx-int8 not checked on openvino: OpenVINO cannot run the int8 graph" in capsys.readouterr().err
        with pytest.raises(NotRightHere) as err:
            check_bundle(bundle, backends=["openvino"], precisions=["int8"], limit=8, progress=False)
        assert_refused_for_vnni(err.value)


def test_the_int8_ir_passes_the_gates_on_every_cpu(demo_ir_bundle: Path) -> None:
    """The int8 IR's weights are 7-bit: OpenVINO runs it right with or without VNNI."""
    bundle = Bundle.open(demo_ir_bundle)
    art = bundle.require("openvino", "int8")
    assert art.info["int8_weight_max"] == 64 and art.info["weights_narrowed"] > 0
    gate = art.parity_on("openvino")
    assert gate is not None and gate["passed"] and gate["candidate"] == "openvino int8 on cpu (IR)", gate
    runtime = load(demo_ir_bundle, backend="openvino", precision="int8")
    assert runtime.artifact == "openvino-int8"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the 16-bit int8 sums are an x86 matter (oneDNN's instruction-set cap is x86's)")
def test_without_vnni_openvino_int8_is_refused_and_the_ir_runs(demo_ir_bundle: Path, demo_full_bundle: Path,
                                                               tmp_path: Path) -> None:
    """What a user on an AVX2 CPU sees, on any x86 CPU: oneDNN capped at AVX2 (its own
    ONEDNN_MAX_CPU_ISA) runs the kernels such a CPU runs. The portable int8 graph is refused on
    OpenVINO, naming the feature and what to use; the IR passes its gates; load() and the timing
    that picks a CPU path never choose the refused one."""
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # read when oneDNN starts: the kernels' commands run in processes of their own
    sample = Path(__file__).resolve().parent.parent / "cvt_deploy" / "demo" / "samples" / "digit-7.png"
    graph = demo_ir_bundle / Bundle.open(demo_ir_bundle).require("onnx", "int8").file
    # The refusal is decided before any kernel runs: this process, with the cap in its environment, tells.
    r = run_cli("cvt-predict", "--bundle", str(graph), "--backend", "openvino", str(sample), env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "cannot run the int8 graph" in r.stderr and "ONEDNN_MAX_CPU_ISA" in r.stderr and "VNNI" in r.stderr, r.stderr
    assert "7-bit" in r.stderr and "--backend onnxruntime" in r.stderr, r.stderr
    r = run_script("cvt-check", "--bundle", str(demo_ir_bundle), "--backend", "openvino", "--precision", "int8",
                   "--limit", "32", env=env)
    assert r.returncode == 0 and "openvino int8 on cpu (IR)" in r.stdout, r.stdout + r.stderr
    assert "onnx-int8 not checked on openvino" in r.stderr and "ONEDNN_MAX_CPU_ISA" in r.stderr, r.stderr
    copy = tmp_path / "b"  # no IR: OpenVINO's int8 path is the portable graph
    shutil.copytree(demo_full_bundle, copy)
    r = run_script("cvt-bench", "--bundle", str(copy), "--record", "--backend", "onnxruntime,openvino", "--precision",
                   "int8", "--batch", "1", "--threads", "1", "--no-hf", "--no-reference", "--min-time", "0.05", env=env)
    assert r.returncode == 0, r.stderr
    assert "not timed, so never chosen: openvino onnx-int8: OpenVINO cannot run the int8 graph" in r.stderr, r.stderr
    assert "cannot run the int8 graph" in r.stdout  # its bench row: skipped, with the reason
    timings = json.loads((copy / "manifest.json").read_text())["cpu_timings"]
    capped = [k for k in timings if k.endswith("onednn-max-isa=AVX2")]
    assert len(capped) == 1, timings
    assert set(timings[capped[0]]["batches"]["1"]["int8"]) == {"onnxruntime:onnx-int8", "onnxruntime:onnx-int8-onnxruntime-cpu"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_any_batch_gives_onnxruntimes_logits(ov_runtimes: dict[str, OpenVinoRuntime], demo_full_bundle: Path,
                                             images: np.ndarray, precision: str) -> None:
    bundle = Bundle.open(demo_full_bundle)
    if precision not in ov_runtimes:  # int8 on a CPU without VNNI: refused, never wrong
        with pytest.raises(NotRightHere) as err:
            load(demo_full_bundle, backend="openvino", precision=precision)
        assert_refused_for_vnni(err.value)
        return
    ort = OrtRuntime.from_bundle(bundle, artifact=bundle.require("onnx", precision).name, threads=1)
    ov = ov_runtimes[precision]
    full = ov.run(images)
    for n in (1, 3, bundle.batch.max):
        got, want = ov.run(images[:n]), ort.run(images[:n])
        assert got.shape == want.shape == (n, bundle.config.num_classes) and got.dtype == np.float32
        # the same images in a smaller batch: a dynamic batch changes nothing (up to kernel blocking)
        np.testing.assert_allclose(got, full[:n], atol={"fp32": 1e-5, "fp16": 2e-2, "int8": 5e-2}[precision])
        if precision == "fp32":
            np.testing.assert_allclose(got, want, atol=1e-4)
        elif precision == "fp16":
            np.testing.assert_allclose(got, want, atol=5e-2)
        else:  # int8 kernels round differently; what the user sees must agree
            cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.min() > 0.99, cos.min()
            assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("input_format, output", [("uint8-nhwc", "probs"), ("uint8-nchw", "logits")])
def test_raw_pixel_graph(demo_bundle: Path, demo_test_split: Any, tmp_path: Path, input_format: str, output: str) -> None:
    raw = raw_pixel_copy(demo_bundle, tmp_path / "raw", input_format, output)
    ov = load(raw, backend="openvino", threads=1)
    assert (ov.input_format, ov.output_kind) == (input_format, output)
    ort = OrtRuntime.from_bundle(Bundle.open(raw), artifact="onnx-fp32", threads=1)
    imgs = list(demo_test_split.images[:16])
    got, want = ov.predict(imgs), ort.predict(imgs)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_array_equal(got.top1, want.top1)


def test_several_threads_share_one_runtime(ov_runtimes: dict[str, OpenVinoRuntime], images: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rt = ov_runtimes["fp32"]
    chunks = [images[i:i + 4] for i in range(0, 32, 4)]
    want = [rt.run(c) for c in chunks]
    # Each call keeps its own result: not a request buffer that a later call (another thread's) overwrites.
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: [rt.run(chunks[i]) for _ in range(4)], range(len(chunks))))
    for i, outs in enumerate(got):
        for out in outs:
            np.testing.assert_allclose(out, want[i], atol=1e-5)


# --- errors ---------------------------------------------------------------------------------

def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("damage", ["truncated", "not onnx", "missing"])
def test_a_damaged_graph_is_a_clean_error(demo_bundle: Path, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.onnx"
    if damage == "truncated":
        _truncated(demo_bundle / "model.onnx", path)
    elif damage == "not onnx":
        path.write_text("hello world")
    with pytest.raises(CvtDeployError, match="OpenVINO cannot read") as err:
        OpenVinoRuntime.from_onnx(path)
    text = str(err.value)
    assert str(path) in text and "src/" not in text and "Check '" not in text  # OpenVINO's locations stripped
    assert err.value.hint and "re-export" in err.value.hint


def demo_bundle_graph(root: Path) -> Path:
    return root / Bundle.open(root).require("onnx", "fp32").file


def test_a_damaged_bundle_graph_and_the_commands(bundle_copy: Path, tmp_path: Path) -> None:
    """Through the bundle the manifest's hash catches it first; a bare graph reaches OpenVINO."""
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(demo_bundle_graph(bundle_copy).read_bytes())
    _truncated(demo_bundle_graph(bundle_copy), demo_bundle_graph(bundle_copy))
    with pytest.raises(CvtDeployError, match="does not match the bundle's manifest"):
        load(bundle_copy, backend="openvino")
    _truncated(bare, bare)
    sample = Path(__file__).resolve().parent.parent / "cvt_deploy" / "demo" / "samples" / "digit-0.png"
    for source in (bundle_copy, bare):
        proc = run_cli("cvt-predict", "--bundle", str(source), "--backend", "openvino", str(sample))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "fix:" in proc.stderr, proc.stderr
        assert ("OpenVINO cannot read" if source == bare else "does not match the bundle's manifest") in proc.stderr


def test_without_openvino_it_is_a_reason_not_a_crash(demo_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert "not 'cuda'" in (OpenVinoRuntime.unavailable_reason("cuda") or "")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert available_backends(Bundle.open(demo_bundle))["openvino"] == "openvino is not installed"
    with pytest.raises(CvtDeployError, match="cannot run here: openvino is not installed") as err:
        load(demo_bundle, backend="openvino")
    assert "cvt-deploy[openvino]" in (err.value.hint or "")


# --- cvt-bench: the ceiling and the int8 ratio to the CPU's limit --------------------------------

def test_benchmark_has_the_openvino_ceiling_and_the_int8_ratio(demo_ir_bundle: Path) -> None:
    from cvt_deploy.bench import COLUMN_NAMES, benchmark

    # The bundle with IRs: OpenVINO's int8 row runs the IR, right on every CPU.
    result = benchmark(demo_ir_bundle, ["onnxruntime", "openvino"], ["fp32", "int8"], [1], threads=1, iterations=3,
                       warmup=1, rounds=2, matmul_size=128, reference=False, hf_reference=False, progress=False)
    assert {"int8_speedup", "int8_speedup_of_limit"} <= set(COLUMN_NAMES)
    mm = result.meta["matmul"]
    ceilings = mm["ceilings"]
    assert ceilings["openvino-fp32"]["kind"] == "fp32" and ceilings["openvino-fp32"]["gops"] > 0
    assert "openvino" in ceilings["openvino-fp32"]["impl"]
    fp32 = {k: c["gops"] for k, c in ceilings.items() if c["kind"] == "fp32"}
    assert mm["fp32"] == max(fp32, key=lambda k: fp32[k])  # fp32 rows divide by the fastest fp32 GEMM
    limit = ceilings[mm["int8"]]["gops"] / max(fp32.values())
    assert mm["int8_limit"] == pytest.approx(limit, rel=0.02)
    for backend in ("onnxruntime", "openvino"):
        f, q = result.row(backend, "fp32", 1), result.row(backend, "int8", 1)
        assert f is not None and q is not None and f.status == q.status == "ok", (f, q)
        assert f.int8_speedup is None and f.int8_speedup_of_limit is None
        assert f.matmul_ceiling == mm["fp32"]
        assert q.int8_speedup == pytest.approx(f.p50_ms / q.p50_ms, rel=1e-2)
        assert q.int8_speedup_of_limit == pytest.approx(q.int8_speedup / mm["int8_limit"], rel=1e-2)
    text = result.table()
    assert "int8/limit" in text and f"= {mm['int8_limit']:.2f}x" in text
    row = next(line for line in text.splitlines() if line.startswith("openvino") and " int8 " in line)
    assert f"{result.row('openvino', 'int8', 1).int8_speedup_of_limit:.2f} (" in row  # type: ignore[union-attr]


def test_the_export_records_openvinos_own_figures_and_cvt_bench_shows_them(demo_full_bundle: Path,
                                                                          tmp_path: Path) -> None:
    """Each row shows the accuracy and agreement measured on its own backend for the graph it
    runs: OpenVINO's kernels are not ONNX Runtime's, and the ORT-CPU graphs are other graphs."""
    from cvt_deploy.bench import benchmark

    bundle = Bundle.open(demo_full_bundle)
    for art in bundle.artifacts.values():
        if art.kind == "onnx" and art.target == "portable":
            ov, ort = art.parity_on("openvino"), art.parity_on("onnxruntime")
            assert ort is not None and ort["candidate"].startswith("onnxruntime"), art.name
            if art.precision == "int8" and SATURATES:  # refused on OpenVINO here: not run, so no figure
                assert ov is None, ov
                continue
            assert ov is not None and ov["backend"] == "openvino" and ov["candidate"].startswith("openvino"), art.name
            assert ov["passed"], (art.name, ov)

    def run(root: Path) -> Any:
        return benchmark(root, ["onnxruntime", "openvino"], ["fp32", "int8"], [1], threads=1, iterations=2,
                         warmup=1, rounds=1, matmul_size=64, reference=False, hf_reference=False, progress=False)

    result = run(demo_full_bundle)
    for precision in ("fp32", "int8"):
        ov_row, ort_row = result.row("openvino", precision, 1), result.row("onnxruntime", precision, 1)
        ov = bundle.require("onnx", precision).parity_on("openvino")
        if ov is None:  # int8 without VNNI: a skipped row that says why, no figure
            assert ov_row.status == "skipped" and "VNNI" in (ov_row.reason or "") and ov_row.accuracy is None
        else:
            assert (ov_row.accuracy, ov_row.top1_agreement) == (ov["accuracy_candidate"], ov["top1_agreement"])
        # ONNX Runtime on the CPU runs the bundle's ORT-CPU graph: its own record, not the portable one's.
        ort = bundle.find("onnx", precision, "onnxruntime-cpu").parity_on("onnxruntime")
        assert (ort_row.accuracy, ort_row.top1_agreement) == (ort["accuracy_candidate"], ort["top1_agreement"])

    copy = tmp_path / "b"
    shutil.copytree(demo_full_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for art in manifest["artifacts"].values():
        art.pop("parity_on", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run(copy)
    assert result.row("openvino", "fp32", 1).accuracy is None  # never checked there: no figure, not ORT's
    assert result.row("onnxruntime", "int8", 1).accuracy is not None


@pytest.fixture(scope="module")
def wide_int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose stage-1 width is CvT-13's (64, one head): its portable int8 graph is one that
    OpenVINO 2026.4 compiles only with a static batch."""
    pytest.importorskip("torch")
    from cvt_deploy.config import get_config
    from cvt_deploy.export.pipeline import export_bundle
    from cvt_deploy.model import create_model

    import torch

    torch.manual_seed(0)  # the failure depends on the weights (randomize_weights' give a graph that compiles)
    model = create_model(get_config("cvt-tiny").replace(embed_dims=(64, 32, 64), num_heads=(1, 2, 4), img_size=112))
    out = tmp_path_factory.mktemp("wide-int8") / "bundle"
    export_bundle(model.eval(), out, precisions=("fp32", "int8"), check=False, ort_cpu=False, progress=False)
    return out


@pytest.mark.slow
def test_an_int8_graph_that_compiles_only_with_a_static_batch_runs_per_batch_size(wide_int8_bundle: Path,
                                                                                  tmp_path: Path) -> None:
    import onnx
    import openvino as ov

    from cvt_deploy.cpu import SAFE_INT8_WEIGHT
    from cvt_deploy.export.int8 import narrow_weights

    path = wide_int8_bundle / "model.int8.onnx"
    if SATURATES:  # no VNNI here: the 8-bit graph is refused; the same graph with 7-bit weights runs
        with pytest.raises(NotRightHere):
            load(wide_int8_bundle, backend="openvino", precision="int8")
        graph = onnx.load(str(path))
        assert narrow_weights(graph, SAFE_INT8_WEIGHT) > 0
        path = tmp_path / "model.int8.onnx"
        onnx.save(graph, str(path))
    core = ov.Core()
    with pytest.raises(Exception, match="ReshapeTransformation"):  # what OpenVINO does with the dynamic batch
        core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runtime = OpenVinoRuntime.from_onnx(path, threads=1)
    ort = OrtRuntime.from_onnx(path, threads=1)
    for n in (1, 3, 8, 2, 5):  # beyond MAX_STATIC_BATCHES sizes: the oldest is dropped (no dynamic model here)
        x = np.random.default_rng(n).standard_normal((n, 3, 112, 112)).astype(np.float32)
        a, b = runtime.run(x), ort.run(x)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape == (n, 1000) and cosine.min() > 0.999, (n, cosine.min())
    assert runtime.compiled_batches == [3, 8, 2, 5]


def test_each_batch_size_gets_its_own_compiled_model_then_one_shared(ov_runtimes: dict[str, OpenVinoRuntime],
                                                                      demo_full_bundle: Path) -> None:
    """The first MAX_STATIC_BATCHES sizes are compiled with the size fixed (faster: see the module
    docstring), later sizes share the model compiled dynamic; all give ONNX Runtime's logits."""
    from cvt_deploy.runtimes.openvino import MAX_STATIC_BATCHES

    runtime = OpenVinoRuntime.from_bundle(Bundle.open(demo_full_bundle), "fp32", threads=1, artifact="onnx-fp32")
    ort = OrtRuntime.from_bundle(Bundle.open(demo_full_bundle), "fp32", threads=1, artifact="onnx-fp32")
    sizes = [1, 4, 2, 7, 3, 6]
    for n in sizes:
        x = np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32)
        np.testing.assert_allclose(runtime.run(x), ort.run(x), atol=2e-4)
    assert runtime.compiled_batches == sizes[:MAX_STATIC_BATCHES]
    shape = runtime.compiled_model(6).inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and runtime.compiled_model(2).inputs[0].get_partial_shape()[0].get_length() == 2


def test_a_batch_size_that_does_not_compile_is_a_clean_error(demo_bundle: Path, images: np.ndarray) -> None:
    runtime = OpenVinoRuntime.from_bundle(Bundle.open(demo_bundle), "fp32")
    real = runtime._compile

    def compile_but_batches_of_3(model: Any) -> Any:
        if model.inputs[0].get_partial_shape()[0].get_length() == 3:
            raise RuntimeError("Exception from src/plugins/intel_cpu/src/graph.cpp:42: made up")
        return real(model)

    runtime._compile = compile_but_batches_of_3  # type: ignore[method-assign]
    with pytest.raises(CvtDeployError, match="OpenVINO cannot compile .* for a batch of 3: .*made up"):
        runtime.run(images[:3])
    assert runtime.run(images[:2]).shape[0] == 2  # other sizes still run
