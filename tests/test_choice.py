"""Which CPU path load() runs: timed at export (or by cvt-bench --record), recorded per CPU in
the manifest, followed by load() and cvt-predict; and the OpenVINO IR that cvt-export
--format openvino adds, gated on OpenVINO like every graph on its own backend."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the CPU paths are ONNX Runtime's and OpenVINO's")
pytest.importorskip("openvino", reason="openvino is not installed: pip install 'cvt-deploy[openvino]'")

from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.backends import load  # noqa: E402
from cvt_deploy.cpu import FEATURES, cpu_features, cpu_key  # noqa: E402
from cvt_deploy.bench.cpu_paths import record_cpu_timings  # noqa: E402
from cvt_deploy.runtimes.choice import MANIFEST_KEY, cpu_paths, fastest  # noqa: E402
from cvt_deploy.runtimes.openvino import OpenVinoRuntime  # noqa: E402
from cvt_deploy.runtimes.ort import OrtRuntime  # noqa: E402
from conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def ir_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user types: cvt-export --format openvino, fp32 and int8, timing on (the default)."""
    out = tmp_path_factory.mktemp("ir") / "bundle"
    r = run_cli("cvt-export", "--format", "openvino", "--precision", "fp32,int8", "--calib-count", "64",
                "--limit", "128", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "writing the OpenVINO IR of model.int8.onnx" in r.stderr and "timing 6 CPU paths" in r.stderr
    return out


@pytest.fixture
def ir_copy(ir_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ir_bundle, dst)
    return dst


def _timings(root: Path, entry: dict[str, Any] | None, key: str | None = None) -> None:
    """Replace the manifest's timings with ``entry`` for ``key`` (default this CPU) only."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest[MANIFEST_KEY] = {} if entry is None else {key or cpu_key(): entry}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_the_cpu_key_is_the_architecture_and_its_kernel_features() -> None:
    import platform

    key = cpu_key().split()
    cap = [k for k in key[1:] if k.startswith("onednn-max-isa=")]  # where the environment caps oneDNN
    assert key[0] == platform.machine() and set(key[1:]) - set(cap) <= set(FEATURES) and len(cap) <= 1
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    assert cpu_features() == [x for x in FEATURES if x in flags]


def test_the_export_writes_gated_ir_and_times_every_cpu_path(ir_bundle: Path) -> None:
    bundle = Bundle.open(ir_bundle)
    for precision in ("fp32", "int8"):
        art = bundle.require("openvino", precision) if bundle.find("openvino", precision) else None
        assert art is not None and art.file == f"model{'' if precision == 'fp32' else '.int8'}.openvino.xml"
        assert (ir_bundle / art.info["weights_file"]).is_file() and art.info["portable"] == f"onnx-{precision}"
        gate = art.parity_on("openvino")
        assert gate is not None and gate["passed"] and gate is art.info["parity"]  # its own backend's gate
        assert gate["candidate"] == f"openvino {precision} on cpu (IR)"
    entry = bundle.extra[MANIFEST_KEY][cpu_key()]
    assert entry["threads"] >= 1 and set(entry["batches"]) == {"1", "8"}
    for n in ("1", "8"):
        for precision in ("fp32", "int8"):
            times = entry["batches"][n][precision]
            assert set(times) == {f"{b}:{a}" for b, a in cpu_paths(bundle, precision)}
            assert f"openvino:openvino-{precision}" in times and f"onnxruntime:onnx-{precision}-onnxruntime-cpu" in times
            assert all(v > 0 for v in times.values())


def test_load_runs_the_fastest_recorded_path_and_says_so(ir_copy: Path) -> None:
    entry = {"threads": 2, "batches": {
        "1": {"int8": {"onnxruntime:onnx-int8": 1.0, "onnxruntime:onnx-int8-onnxruntime-cpu": 2.0, "openvino:openvino-int8": 3.0}},
        "8": {"int8": {"onnxruntime:onnx-int8": 9.0, "onnxruntime:onnx-int8-onnxruntime-cpu": 8.0, "openvino:openvino-int8": 4.0},
              "fp32": {"onnxruntime:onnx-fp32": 5.0, "onnxruntime:onnx-fp32-onnxruntime-cpu": 6.0,
                       "openvino:openvino-fp32": 7.0}}}}
    _timings(ir_copy, entry)
    at8 = load(ir_copy, precision="int8", batch=8)
    assert isinstance(at8, OpenVinoRuntime) and at8.artifact == "openvino-int8" and at8.path.endswith(".xml")
    assert at8.choice is not None and "at batch 8 (4.00 ms" in at8.choice and "onnxruntime:onnx-int8 9.00 ms" in at8.choice
    at1 = load(ir_copy, precision="int8")  # default batch 1
    assert isinstance(at1, OrtRuntime) and at1.artifact == "onnx-int8" and at1.target == "portable"
    assert isinstance(load(ir_copy, precision="int8", batch=5), OpenVinoRuntime)  # 8 is nearer than 1
    # precision None: the most precise graph (fp32), measured only at 8 here
    fp32 = load(ir_copy, batch=1)
    assert isinstance(fp32, OrtRuntime) and fp32.artifact == "onnx-fp32" and "at batch 8" in (fp32.choice or "")
    # a named backend: the fastest of its own paths
    ort8 = load(ir_copy, backend="onnxruntime", precision="int8", batch=8)
    assert isinstance(ort8, OrtRuntime) and ort8.artifact == "onnx-int8-onnxruntime-cpu"
    assert "fastest of 2 paths" in (ort8.choice or "")
    ov1 = load(ir_copy, backend="openvino", precision="int8")  # one path of its own: nothing was chosen
    assert ov1.artifact == "openvino-int8" and ov1.choice is None
    # cvt-predict says what it picked (10 images: batch 8 is the nearest measured)
    samples = sorted(str(p) for p in (Path(__file__).parents[1] / "cvt_deploy" / "demo" / "samples").glob("*.png"))
    r = run_cli("cvt-predict", "--bundle", str(ir_copy), "--precision", "int8", "--topk", "1", *samples)
    assert r.returncode == 0, r.stderr
    assert "note: openvino on openvino-int8: the fastest of 3 paths timed on this CPU at batch 8" in r.stderr
    assert "openvino int8 on cpu (IR)" in r.stdout


def test_timings_of_another_cpu_or_of_paths_gone_are_not_followed(ir_copy: Path) -> None:
    _timings(ir_copy, {"batches": {"1": {"int8": {"openvino:openvino-int8": 0.1, "onnxruntime:onnx-int8": 5.0}}}},
             key="riscv64 made-up")
    plain = load(ir_copy, precision="int8")
    assert isinstance(plain, OrtRuntime) and plain.target == "onnxruntime-cpu" and plain.choice is None
    # This CPU's record names a graph the bundle no longer has: the next fastest that it does have.
    _timings(ir_copy, {"batches": {"1": {"int8": {"openvino:openvino-int16": 0.1, "openvino:openvino-int8": 3.0,
                                                  "onnxruntime:onnx-int8": 5.0}}}})
    assert fastest(Bundle.open(ir_copy), "int8", 1).artifact == "openvino-int8"  # type: ignore[union-attr]
    # Only onnxruntime asked for: OpenVINO's time is not among the candidates, and one recorded
    # path of its own leaves nothing to choose.
    assert fastest(Bundle.open(ir_copy), "int8", 1, ["onnxruntime"]) is None
    with pytest.raises(CvtDeployError, match="batch 0 must be a whole number"):
        load(ir_copy, batch=0)


def test_the_choice_follows_a_real_timing(ir_copy: Path) -> None:
    """Whatever the machine measures, load() runs the path the record says is fastest."""
    bundle = Bundle.open(ir_copy)
    entry = record_cpu_timings(bundle, batches=(1, 2), threads=1, progress=False)
    assert entry is not None and set(entry["batches"]) == {"1", "2"}
    for n in (1, 2):
        times = entry["batches"][str(n)]["int8"]
        best = min(times, key=times.__getitem__)
        runtime = load(ir_copy, precision="int8", batch=n)
        assert f"{runtime.backend}:{runtime.artifact}" == best
    assert json.loads((ir_copy / "manifest.json").read_text())[MANIFEST_KEY][cpu_key()] == entry


def test_cvt_bench_record_times_the_paths_and_shows_which_graph_each_row_ran(ir_copy: Path, tmp_path: Path) -> None:
    _timings(ir_copy, None)
    save = tmp_path / "b.json"
    r = run_cli("cvt-bench", "--bundle", str(ir_copy), "--record", "--backend", "onnxruntime,openvino", "--precision",
                "int8", "--batch", "2", "--threads", "1", "--no-hf", "--no-reference", "--min-time", "0.2",
                "--rounds", "1", "--warmup", "1", "--save", str(save))
    assert r.returncode == 0, r.stderr
    entry = json.loads((ir_copy / "manifest.json").read_text())[MANIFEST_KEY][cpu_key()]
    assert set(entry["batches"]) == {"2"} and entry["threads"] == 1
    assert "(IR)" in r.stdout and cpu_key() in r.stdout
    from cvt_deploy.bench import BenchResult

    result = BenchResult.from_json(save)
    assert result.meta["host"]["cpu"] == cpu_key()
    ov = result.row("openvino", "int8", 2)
    assert ov is not None and ov.graph == "openvino-int8"


def test_add_ir_to_an_existing_bundle_and_a_damaged_ir(demo_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(demo_bundle, copy)
    r = run_cli("cvt-export", "--format", "openvino", "--bundle", str(copy), "--limit", "64", "--no-timing")
    assert r.returncode == 0, r.stderr
    bundle = Bundle.open(copy)
    assert sorted(n for n, a in bundle.artifacts.items() if a.kind == "openvino") == ["openvino-fp32"]
    assert MANIFEST_KEY not in bundle.extra  # --no-timing
    runtime = load(copy, backend="openvino")
    assert runtime.path.endswith("model.openvino.xml")
    r = run_cli("cvt-check", "--bundle", str(copy), "--backend", "openvino", "--limit", "32")
    assert r.returncode == 0 and "openvino fp32 on cpu (IR)" in r.stdout, r.stderr
    # a flipped byte in the weights: the hash says so before OpenVINO reads them
    weights = copy / "model.openvino.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CvtDeployError, match="model.openvino.bin does not match the bundle's manifest"):
        load(copy, backend="openvino")
    weights.unlink()
    with pytest.raises(CvtDeployError, match="lists model.openvino.bin .openvino-fp32. but the file is missing"):
        Bundle.open(copy)
    # a manifest whose weights_file leads out of the bundle
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["openvino-fp32"]["weights_file"] = "../model.openvino.bin"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CvtDeployError, match="weights_file"):
        Bundle.open(copy)


def test_an_ir_that_misses_its_gates_is_not_added(ir_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 IR made of the int8 graph (a wrong conversion) misses the fp32 gates: exit 1, the
    bundle as it was."""
    import cvt_deploy.export.openvino as ir

    copy = ir_copy
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("openvino-fp32", "openvino-int8"):
        manifest["artifacts"].pop(name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for path in copy.glob("*.openvino.*"):
        path.unlink()
    before = json.loads((copy / "manifest.json").read_text())
    real = ir.convert_openvino
    monkeypatch.setattr(ir, "convert_openvino", lambda src, dst: real(Path(src).with_name("model.int8.onnx"), dst))
    r = run_cli("cvt-export", "--format", "openvino", "--bundle", str(copy), "--precision", "fp32", "--limit", "64",
                "--no-timing")
    assert r.returncode == 1, r.stderr
    assert "FAIL" in r.stderr and "no OpenVINO IR was added" in r.stderr
    assert json.loads((copy / "manifest.json").read_text()) == before
    assert not list(copy.glob("*.openvino.*"))


def test_a_re_export_without_ir_removes_the_old_ir(ir_copy: Path) -> None:
    r = run_cli("cvt-export", "--no-check", "--no-timing", "-q", "--out", str(ir_copy))
    assert r.returncode == 0, r.stderr
    assert not list(ir_copy.glob("*.openvino.*")) and "not part of the bundle" not in r.stderr


def test_the_ir_gives_the_onnx_graphs_logits(ir_bundle: Path, demo_test_split: Any, tmp_path: Path) -> None:
    """The fp32 IR is the portable graph; the int8 IR is the portable graph with its weights
    narrowed to 7 bits (export.int8.narrow_weights), the same network on every CPU."""
    import onnx

    from cvt_deploy.cpu import SAFE_INT8_WEIGHT
    from cvt_deploy.export.int8 import narrow_weights
    from cvt_deploy.preprocess import preprocess
    from cvt_deploy.runtimes.openvino import OpenVinoRuntime as OV

    bundle = Bundle.open(ir_bundle)
    x = preprocess(list(demo_test_split.head(8).images), bundle.config.preprocess)
    fp32_ir = OV.from_bundle(bundle, "fp32", artifact="openvino-fp32")
    np.testing.assert_allclose(fp32_ir.run(x), OV.from_bundle(bundle, "fp32", artifact="onnx-fp32").run(x), atol=1e-5)
    graph = onnx.load(str(bundle.path(bundle.require("onnx", "int8"))))
    assert narrow_weights(graph, SAFE_INT8_WEIGHT) == bundle.require("openvino", "int8").info["weights_narrowed"]
    onnx.save(graph, str(tmp_path / "narrowed.onnx"))
    int8_ir = OV.from_bundle(bundle, "int8", artifact="openvino-int8")
    np.testing.assert_allclose(int8_ir.run(x), OV.from_onnx(tmp_path / "narrowed.onnx").run(x), atol=1e-5)


def test_a_bare_ir_is_sent_to_its_bundle(ir_bundle: Path) -> None:
    """Only the bundle's manifest vouches for the IR's .bin: a bare .xml gets that said, not a
    'not a folder' from the bundle reader."""
    with pytest.raises(CvtDeployError, match="is an OpenVINO IR: it runs from its bundle") as e:
        load(ir_bundle / "model.int8.openvino.xml", backend="openvino")
    assert str(ir_bundle) in (e.value.hint or "")


def test_a_path_that_missed_its_gates_or_a_damaged_entry_is_never_chosen(ir_copy: Path) -> None:
    fast_ort = {"onnxruntime:onnx-fp32": 1.0, "onnxruntime:onnx-fp32-onnxruntime-cpu": 2.0, "openvino:openvino-fp32": 3.0}
    _timings(ir_copy, {"batches": {"1": {"fp32": fast_ort}}})
    assert fastest(Bundle.open(ir_copy), "fp32").artifact == "onnx-fp32"
    # The portable graph missed its gates as ONNX Runtime runs it: the next fastest is chosen.
    manifest = json.loads((ir_copy / "manifest.json").read_text())
    manifest["artifacts"]["onnx-fp32"]["parity"]["passed"] = False
    (ir_copy / "manifest.json").write_text(json.dumps(manifest))
    assert fastest(Bundle.open(ir_copy), "fp32").artifact == "onnx-fp32-onnxruntime-cpu"
    # Hand-edited timings: the wrong shapes are passed over, not a traceback.
    for batches in ({"1": {"fp32": 5.0}}, {"1": 3}, {"08": {"fp32": fast_ort}}, {"0": {"fp32": fast_ort}},
                    {"1": {"fp32": {"onnxruntime:onnx-fp32-onnxruntime-cpu": "fast", "openvino:openvino-fp32": True}}}):
        _timings(ir_copy, {"batches": batches})
        choice = fastest(Bundle.open(ir_copy), "fp32")
        assert choice is None or choice.batch == 8 and choice.artifact == "onnx-fp32-onnxruntime-cpu", batches


def test_a_batch_size_in_other_digits_is_passed_over(bundle_copy: Path) -> None:
    """A hand-edited batch key that only looks like a number ('¹': str.isdigit takes it, int refuses
    it; '٣': int reads it as 3) is no measured batch size: not a traceback, not followed."""
    times = {"onnxruntime:onnx-fp32": 1.0, "onnxruntime:onnx-fp32-onnxruntime-cpu": 2.0}
    for key in ("\u00b9", "\u0663"):
        _timings(bundle_copy, {"batches": {key: {"fp32": times}}})
        assert fastest(Bundle.open(bundle_copy), "fp32") is None, key
        assert load(bundle_copy, precision="fp32").choice is None


@pytest.mark.parametrize("how", ["missed gate", "unreadable --data"])
def test_a_failed_re_add_keeps_the_irs_the_bundle_had(ir_copy: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Whatever stops `--format openvino --bundle` after the IRs are written (a gate, the
    evaluation data read only then), the old IRs and their manifest entries are back."""
    import cvt_deploy.export.openvino as ir

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(ir_copy.glob("*.openvino.*")) + [ir_copy / "manifest.json"]}

    before = snapshot()
    args = ["--limit", "64", "--no-timing"]
    if how == "missed gate":  # the fp32 IR made of the int8 graph
        real = ir.convert_openvino
        monkeypatch.setattr(ir, "convert_openvino", lambda src, dst: real(Path(src).with_name("model.int8.onnx"), dst))
    else:
        args += ["--data", str(ir_copy / "no-such-folder")]
    r = run_cli("cvt-export", "--format", "openvino", "--bundle", str(ir_copy), *args)
    assert r.returncode == (1 if how == "missed gate" else 2), r.stderr
    assert "no OpenVINO IR was added" in r.stderr and "it is as it was" in r.stderr
    assert snapshot() == before
    assert not list(ir_copy.glob("*.partial")) and load(ir_copy, backend="openvino", precision="int8").artifact == "openvino-int8"


def test_a_path_that_cannot_open_is_not_timed_and_the_rest_are(ir_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The timing is a speed-up: one graph OpenVINO cannot compile does not fail an export."""
    import cvt_deploy.bench.cpu_paths as timing
    import cvt_deploy.runtimes.choice as choice

    real = choice.open_path

    def open_path(bundle: Bundle, backend: str, artifact: str, threads: int | None = None, device: str | None = "cpu"):
        if artifact == "openvino-int8":
            raise CvtDeployError("OpenVINO cannot compile model.int8.openvino.xml for its CPU plugin: made up", "")
        return real(bundle, backend, artifact, threads, device)

    monkeypatch.setattr(timing, "open_path", open_path)
    entry = record_cpu_timings(Bundle.open(ir_copy), batches=(1,), threads=1, min_time=0.01)
    assert entry is not None
    assert set(entry["batches"]["1"]["int8"]) == {"onnxruntime:onnx-int8", "onnxruntime:onnx-int8-onnxruntime-cpu"}
    assert "openvino:openvino-fp32" in entry["batches"]["1"]["fp32"]
    assert "note: not timed, so never chosen: openvino openvino-int8: OpenVINO cannot compile" in capsys.readouterr().err


def test_adding_ir_to_a_bundle_that_is_not_there_makes_no_folders(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "bundle"
    r = run_cli("cvt-export", "--format", "openvino", "--bundle", str(missing))
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "no").exists()  # the output lock's parent folders are not made for a wrong path
