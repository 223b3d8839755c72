"""cvt-bench: statistics, the interleaved scheduler, MAC counts, rows/skips, JSON/CSV/plot, the CLI.

Nothing here asserts a speed: the machine is shared and noisy. Timed runs use one thread and
a handful of iterations on the demo model (CvT-tiny), so the module takes seconds.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from cvt_deploy import bundle_write

from cvt_deploy.bench import (COLUMN_NAMES, COLUMNS, SCHEMA, BenchResult, Case, count_macs, mac_breakdown,
                              measure_interleaved, summarize)
from cvt_deploy.bundle import Artifact, BatchRange, Bundle
from cvt_deploy.config import get_config
from cvt_deploy.errors import CvtDeployError, MissingDependencyError
from cvt_deploy.runtimes.base import Runtime
from conftest import InProcessRuntime  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ONNX_PARITY = {"top1_agreement": 0.99, "accuracy_candidate": 0.95, "accuracy_reference": 0.96}


# --- statistics ---------------------------------------------------------------------------

def test_summarize_known_samples() -> None:
    s = summarize([i / 1000 for i in range(1, 101)])  # 1..100 ms, given in seconds
    assert (s.p50, s.p90, s.p99) == pytest.approx((50.5, 90.1, 99.01))  # linear interpolation
    assert (s.mean, s.min, s.max, s.n) == pytest.approx((50.5, 1.0, 100.0, 100))
    one = summarize([0.002])
    assert (one.p50, one.p99, one.min, one.max, one.n) == pytest.approx((2.0, 2.0, 2.0, 2.0, 1))
    skewed = summarize([0.001] * 9 + [0.1])  # one outlier moves the tail, not the median
    assert skewed.p50 == pytest.approx(1.0) and skewed.max == pytest.approx(100.0) and skewed.p90 > 1.0
    with pytest.raises(ValueError):
        summarize([])


# --- the scheduler, through a real (numpy) Runtime ----------------------------------------------

class RecordingRuntime(InProcessRuntime):
    """A small numpy 'model' that logs each call: the scheduler under test, not a backend."""

    backend: ClassVar[str] = "recording"

    def __init__(self, name: str, log: list[str], fail_after: int | None = None) -> None:
        super().__init__(get_config("cvt-tiny"), "fp32", "cpu")
        self.name, self.log, self.fail_after = name, log, fail_after
        self.weight = np.random.default_rng(0).standard_normal((3 * 8 * 8, 10)).astype(np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.log.append(self.name)
        if self.fail_after is not None and len([n for n in self.log if n == self.name]) > self.fail_after:
            raise RuntimeError("device lost")
        return batch.reshape(len(batch), -1) @ self.weight


def test_interleaves_in_rounds_after_warmup() -> None:
    log: list[str] = []
    x = np.ones((2, 3, 8, 8), np.float32)
    cases = [Case.for_runtime(n, RecordingRuntime(n, log), x) for n in "ABC"]
    measure_interleaved(cases, iterations=4, rounds=2, warmup=2, settle=1, progress=False)
    warm = ["A", "A", "B", "B", "C", "C"]
    one_round = ["A"] * 3 + ["B"] * 3 + ["C"] * 3  # per block: 1 untimed settle call + 2 timed
    assert log == warm + one_round * 2
    for c in cases:
        assert len(c.times) == c.iterations == 4 and all(t > 0 for t in c.times) and c.error is None


def test_timed_blocks_give_each_case_its_share() -> None:
    """Without a fixed count each block runs min_time / rounds seconds (and min_iterations / rounds calls)."""
    log: list[str] = []
    x = np.ones((1, 3, 8, 8), np.float32)
    cases = [Case.for_runtime(n, RecordingRuntime(n, log), x) for n in "AB"]
    measure_interleaved(cases, min_time=0.02, min_iterations=6, rounds=2, warmup=1, settle=0, progress=False)
    for c in cases:
        assert c.iterations == len(c.times) > 6  # µs calls: the time budget, not the minimum, ended the blocks
    blocks = [n for i, n in enumerate(log[2:]) if i == 0 or log[2 + i - 1] != n]
    assert blocks == ["A", "B", "A", "B"]  # interleaved, one block per case per round


def test_uneven_iterations_and_a_failing_case() -> None:
    log: list[str] = []
    x = np.ones((1, 3, 8, 8), np.float32)
    a = Case.for_runtime("A", RecordingRuntime("A", log), x)
    a.iterations = 6  # set beforehand: kept; the others get the default
    b = Case.for_runtime("B", RecordingRuntime("B", log, fail_after=2), x)  # its 3rd call (round 2) raises
    c = Case.for_runtime("C", RecordingRuntime("C", log), x)
    measure_interleaved([a, b, c], iterations=3, rounds=3, warmup=1, settle=0, progress=False)
    assert len(a.times) == 6 and len(c.times) == 3 and len(b.times) == 1
    assert b.error is not None and "device lost" in b.error
    # warm-up, then blocks of ceil(n / rounds): A 2 per round, B and C 1; B is dropped once it failed
    assert log == ["A", "B", "C"] + ["A", "A", "B", "C"] * 2 + ["A", "A", "C"]
    with pytest.raises(CvtDeployError, match="rounds"):
        measure_interleaved([c], rounds=0, progress=False)


# --- MACs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, size, paper_gmacs", [
    ("cvt-13", 224, 4.5), ("cvt-21", 224, 7.1), ("cvt-w24", 224, 60.9),
    # the paper's 384 figures (Tables 2-3): CvT-13 16.3, CvT-21 24.9, CvT-W24 193.2 GFLOPs (=MACs)
    ("cvt-13", 384, 16.3), ("cvt-21", 384, 24.9), ("cvt-w24", 384, 193.2),
])
def test_count_macs_matches_the_paper(variant: str, size: int, paper_gmacs: float) -> None:
    cfg = get_config(variant, img_size=size)
    assert count_macs(cfg) / 1e9 == pytest.approx(paper_gmacs, rel=0.03)
    assert count_macs(cfg) == sum(mac_breakdown(cfg).values())


def test_count_macs_equals_torch_flop_counter() -> None:
    """Independent check: PyTorch's own FLOP counter over a real forward pass (plain attention)."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from cvt_deploy.model import Attention, create_model

    model = create_model("cvt-tiny")
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False  # the counter sees matmuls; SDPA kernels vary by build
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, model.cfg.img_size, model.cfg.img_size))
    assert counter.get_total_flops() == 2 * count_macs(model.cfg)


# --- a benchmark on a tiny bundle -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from cvt_deploy.checkpoints import load_checkpoint, save_checkpoint
    from cvt_deploy.demo import DEMO_WEIGHTS
    from cvt_deploy.export.onnx import export_onnx

    model = load_checkpoint(DEMO_WEIGHTS)
    out = tmp_path_factory.mktemp("bench") / "demo"
    batch = BatchRange(1, 2, 8)
    with bundle_write.create(out, model.cfg, batch, extra={}) as b:
        save_checkpoint(model, b.root / "model.safetensors")
        b.add(Artifact("torch-fp32", "model.safetensors", "torch", "fp32"))
        export_onnx(model, b.root / "model.onnx", batch=batch)
        b.add(Artifact("onnx-fp32", "model.onnx", "onnx", "fp32", info={"parity": ONNX_PARITY}))
    return out


@pytest.fixture
def keep_torch_threads() -> Any:
    """benchmark() sets torch's process-wide thread count; give other tests theirs back."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def result(tiny_bundle: Path) -> BenchResult:
    torch = pytest.importorskip("torch")
    from cvt_deploy.bench import benchmark

    n = torch.get_num_threads()
    try:
        return benchmark(tiny_bundle, ["tensorrt", "onnxruntime", "torch"], ["fp32", "fp16", "int8"], [1, 2],
                         threads=1, iterations=3, warmup=1, rounds=2, matmul_size=128,
                         hf_reference=importlib.util.find_spec("transformers") is not None, progress=False)
    finally:
        torch.set_num_threads(n)


def test_every_combination_is_a_row(result: BenchResult, tiny_bundle: Path) -> None:
    hf = importlib.util.find_spec("transformers") is not None
    # per batch: baseline (torch fp32) + HF + tensorrt x3 + onnxruntime x3 + torch fp16/int8
    assert len(result.rows) == 2 * (1 + hf + 3 + 3 + 2)
    for batch in (1, 2):
        base = result.row("torch", "fp32", batch)
        assert base is not None and base.status == "ok" and base.role == "baseline"
        assert base.ratio_vs_torch == 1.0
        ort = result.row("onnxruntime", "fp32", batch)
        assert ort is not None and ort.status == "ok" and ort.iterations == 3
        assert ort.ratio_vs_torch == pytest.approx(base.p50_ms / ort.p50_ms, rel=1e-3)
        assert ort.throughput_ips == pytest.approx(batch / (ort.p50_ms / 1e3), rel=1e-3)
        assert ort.gflops == pytest.approx(count_macs(get_config("cvt-tiny", num_classes=10)) * 2 * ort.throughput_ips / 1e9,
                                           rel=1e-2)
        assert ort.pct_matmul_peak is not None and ort.pct_matmul_peak > 0
        assert ort.min_ms <= ort.p50_ms <= ort.p90_ms <= ort.p99_ms <= ort.max_ms
        assert (ort.accuracy, ort.top1_agreement) == (0.95, 0.99)  # recorded in the manifest
        assert (base.accuracy, base.top1_agreement) == (0.96, None)  # the reference's accuracy
        if hf:
            ref = result.row("hf-transformers", "fp32", batch)
            assert ref is not None and ref.status == "ok" and ref.role == "reference" and ref.ratio_vs_torch
    assert result.meta["threads"] == 1
    ceilings = result.meta["matmul"]["ceilings"]
    # the same run times ONNX Runtime's fp32 MatMul and u8 x s8 MatMulInteger (and torch's and OpenVINO's matmul)
    assert {"ort-fp32", "ort-int8", "torch-fp32"} <= set(ceilings) and all(c["gops"] > 0 for c in ceilings.values())
    assert ("openvino-fp32" in ceilings) == (importlib.util.find_spec("openvino") is not None)
    fastest = max((k for k, c in ceilings.items() if c["kind"] == "fp32"), key=lambda k: ceilings[k]["gops"])
    assert result.meta["matmul"]["fp32"] == result.meta["matmul"]["fp16"] == fastest
    assert result.meta["matmul"]["int8"] == "ort-int8"
    for r in result.measured:
        assert r.matmul_ceiling == fastest
        assert r.pct_matmul_peak == pytest.approx(100 * r.gflops / ceilings[fastest]["gops"], rel=2e-2)
        assert r.first_call_ms is not None and r.first_call_ms > 0  # the cold call, kept out of the statistics
        assert r.weights_fit_llc in ("yes", "no", "unknown")
    ort = result.row("onnxruntime", "fp32", 1)
    assert ort is not None and ort.weights_mb == pytest.approx((tiny_bundle / "model.onnx").stat().st_size / 2**20, abs=0.01)
    assert result.meta["macs"] == count_macs(get_config("cvt-tiny", num_classes=10))


def test_what_cannot_run_is_skipped_with_a_reason(result: BenchResult) -> None:
    skipped = {(r.backend, r.precision): r.reason for r in result.rows if r.status == "skipped"}
    assert all(skipped.values()), skipped
    assert {("tensorrt", p) for p in ("fp32", "fp16", "int8")} <= set(skipped)
    assert "tensorrt" in skipped["tensorrt", "fp32"].lower()
    assert "int8" in skipped["torch", "int8"]
    assert "cuda" in skipped["torch", "fp16"].lower()  # fp16 torch needs a GPU
    assert "int8" in skipped["onnxruntime", "int8"] and "fp16" in skipped["onnxruntime", "fp16"]
    for r in result.rows:
        if r.status == "skipped":
            assert r.p50_ms is None and r.iterations == 0 and r.ratio_vs_torch is None
    text = result.table()
    assert "skipped [" in text and "baseline" in text and "vs torch" in text
    assert skipped["torch", "int8"] in text  # reasons are printed under the table


def test_json_schema(result: BenchResult, tmp_path: Path) -> None:
    data = json.loads(result.to_json(tmp_path / "b.json").read_text())
    assert data["schema"] == SCHEMA and data["schema_version"] == 1
    assert [c["name"] for c in data["columns"]] == list(COLUMN_NAMES)
    types = {"str": str, "int": int, "float": float}
    for row in data["rows"]:
        assert list(row) == list(COLUMN_NAMES)
        for name, typ, _ in COLUMNS:
            value = row[name]
            if value is not None:
                assert isinstance(value, types[typ]) or (typ == "float" and isinstance(value, int)), (name, value)
        if row["status"] == "ok":
            assert all(row[k] is not None for k in ("p50_ms", "p99_ms", "throughput_ips", "gflops", "peak_rss_mb"))
    assert {"threads", "device", "matmul", "versions", "peak_rss_mb"} <= set(data["meta"])
    again = BenchResult.from_json(tmp_path / "b.json")
    assert again.rows == result.rows and again.table() == result.table()


def test_csv_schema(result: BenchResult, tmp_path: Path) -> None:
    with open(result.to_csv(tmp_path / "b.csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(COLUMN_NAMES)
        rows = list(reader)
    assert len(rows) == len(result.rows)
    for row in rows:
        int(row["batch"]), int(row["threads"]), int(row["iterations"])
        if row["status"] == "ok":
            assert float(row["p50_ms"]) > 0 and float(row["throughput_ips"]) > 0 and row["reason"] == ""
        else:
            assert row["p50_ms"] == "" and row["reason"]


def test_plot_writes_a_png(result: BenchResult, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = result.plot(tmp_path / "bench.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # something was drawn, not a blank canvas
    assert not list(tmp_path.glob(".*partial"))  # written atomically, nothing left behind


def test_plot_title_stays_inside_the_figure(result: BenchResult) -> None:
    """The header (model, device, every GEMM ceiling) is longer than the figure is wide: it wraps."""
    pytest.importorskip("matplotlib")
    from cvt_deploy.bench.results import figure, header

    assert len(header(result)) > 200  # the case that used to be cut off at both edges
    fig = figure(result)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    (title,) = [t for t in fig.texts if t.get_text()]
    box, page = title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    assert title.get_text().replace("\n", " ") == header(result)  # wrapped, nothing dropped
    for ax in fig.axes:  # and the axes make room for it
        assert ax.get_window_extent(renderer).y1 < box.y0


def test_plot_without_matplotlib_names_the_extra(result: BenchResult, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"cvt-deploy\[plot\]"):
        result.plot(tmp_path / "bench.png")
    assert not (tmp_path / "bench.png").exists()


# --- the CLI --------------------------------------------------------------------------------

def test_cli_quick_json(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        keep_torch_threads: None) -> None:
    from cvt_deploy.cli.bench import main

    out = tmp_path / "bench.json"
    rc = main(["--bundle", str(tiny_bundle), "--quick", "--batch", "1", "--threads", "1", "--iterations", "3",
               "--backend", "onnxruntime,tensorrt", "--no-hf", "--save", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "onnxruntime" in text and "skipped [1]" in text
    data = json.loads(out.read_text())
    rows = {(r["backend"], r["precision"]): r for r in data["rows"]}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("tensorrt", "fp32")}
    assert rows["onnxruntime", "fp32"]["status"] == "ok" and rows["onnxruntime", "fp32"]["iterations"] == 3
    assert rows["tensorrt", "fp32"]["status"] == "skipped"
    assert data["meta"]["threads"] == 1


def test_cli_json_prints_the_measured_result(tiny_bundle: Path, capsys: pytest.CaptureFixture[str],
                                              keep_torch_threads: None) -> None:
    from cvt_deploy.cli.bench import main

    rc = main(["--bundle", str(tiny_bundle), "--quick", "--batch", "1", "--threads", "1", "--iterations", "3",
               "--backend", "onnxruntime", "--precision", "fp32", "--no-hf", "--no-reference", "--json", "-q"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)  # stdout holds the JSON only: no table
    assert [(r["backend"], r["status"], r["iterations"]) for r in data["rows"]] == [("onnxruntime", "ok", 3)]
    assert data["meta"]["threads"] == 1


@pytest.mark.parametrize("args, message", [
    (["--bundle", "/nonexistent/bundle"], "not a folder"),
    (["--batch", "0"], "batch size 0"),
    (["--batch", "2,0"], "batch size 0 is below 1"),
    (["--batch", "x"], "'x' is not a whole number"),
    (["--batch", "1,,8"], "is not a whole number"),
    (["--backend", "onnx"], "unknown backend 'onnx'"),
    (["--precision", "fp64"], "unknown precision 'fp64'"),
    (["--save", "bench.txt"], "unknown file type .txt"),
    (["--threads", "0"], "--threads 0"),
    (["--plot", "out.gif"], "unsupported image type"),
])
def test_cli_bad_input_is_a_clear_error(tiny_bundle: Path, args: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.cli.bench import main

    argv = args if args[0] == "--bundle" else ["--bundle", str(tiny_bundle), *args]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err


# --- what bounds a row: ceilings per precision, the last-level cache ----------------------------

def test_int8_rows_divide_by_the_integer_gemm() -> None:
    from cvt_deploy.bench.limits import Ceiling, best
    from cvt_deploy.bench.timing import Case

    def timed(name: str, kind: str, seconds: float) -> Ceiling:
        c = Ceiling(name, kind, name, Case(name, lambda: None), ops=2e9)
        c.case.times = [seconds] * 3
        return c

    found = [timed("ort-fp32", "fp32", 0.004), timed("torch-fp32", "fp32", 0.008), timed("ort-int8", "int8", 0.001)]
    assert best(found, "fp32").name == best(found, "fp16").name == "ort-fp32"  # type: ignore[union-attr]
    # with an fp16 GEMM (a GPU), fp16 rows divide by it and fp32 rows still by the fp32 one
    gpu = [timed("torch-fp32", "fp32", 0.004), timed("torch-fp16", "fp16", 0.0005)]
    assert best(gpu, "fp16").name == "torch-fp16" and best(gpu, "fp32").name == "torch-fp32"  # type: ignore[union-attr]
    assert best(found, "int8").name == "ort-int8" and best(found, "int8").gops == pytest.approx(2000)  # type: ignore[union-attr]
    assert best(found[:2], "int8") is None  # no integer GEMM measured: no int8 ceiling, not the float one


def test_llc_size_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvt_deploy.bench import limits

    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "32M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    monkeypatch.setattr(limits, "SYSFS_CACHE", tmp_path)
    assert limits.llc_bytes() == 32 * 2**20
    assert limits.fits_llc(20 * 2**20, limits.llc_bytes()) == "yes" and limits.fits_llc(80 * 2**20, 32 * 2**20) == "no"
    monkeypatch.setattr(limits, "SYSFS_CACHE", tmp_path / "absent")
    assert limits.llc_bytes() is None and limits.fits_llc(1, None) == "unknown"


@pytest.mark.slow  # inductor compiles the model first: ~25 s on 2 cores
def test_torch_compile_reference_row_runs_the_compiled_model(tiny_bundle: Path, keep_torch_threads: Any) -> None:
    from cvt_deploy.bench import benchmark
    from cvt_deploy.backends import load
    from cvt_deploy.runtimes.pytorch import TorchCompiledRuntime

    compiled = load(tiny_bundle, backend="torch-compile")
    assert isinstance(compiled, TorchCompiledRuntime) and compiled.backend == "torch-compile"
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(compiled.run(x), load(tiny_bundle, backend="torch").run(x), atol=1e-4)
    with pytest.raises(CvtDeployError, match="fp32 only"):
        load(tiny_bundle, backend="torch-compile", precision="fp16")
    result = benchmark(tiny_bundle, ["onnxruntime"], ["fp32"], [2], threads=1, iterations=3, warmup=1, rounds=2,
                       matmul_size=128, hf_reference=False, compiled_reference=True, progress=False)
    (row,) = [r for r in result.rows if r.backend == "torch-compile"]
    assert (row.role, row.status, row.precision) == ("reference", "ok", "fp32") and row.p50_ms, row
    # Off by default: a plain run has no compiled row.
    plain = benchmark(tiny_bundle, ["onnxruntime"], ["fp32"], [2], threads=1, iterations=3, warmup=1, rounds=2,
                      matmul_size=128, hf_reference=False, progress=False)
    assert not [r for r in plain.rows if r.backend == "torch-compile"]
