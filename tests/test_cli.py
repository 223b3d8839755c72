"""The command-line tools: cvt-export, cvt-check, cvt-predict.

Most tests call ``main([...])`` in-process (fast); a few run the installed console scripts
in a subprocess to check exit codes and that a failure prints a message, not a traceback.
Exit codes: 0 success, 1 a parity gate failed, 2 bad input or environment.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import cvt_deploy  # noqa: E402
from cvt_deploy.checkpoints import file_sha256  # noqa: E402
from cvt_deploy.demo import DEMO_WEIGHTS  # noqa: E402
from cvt_deploy.bundle import BatchRange, Bundle  # noqa: E402
from cvt_deploy.cli import check as check_cli  # noqa: E402
from cvt_deploy.cli import export as export_cli  # noqa: E402
from cvt_deploy.cli import predict as predict_cli  # noqa: E402
from cvt_deploy.parity import Gates  # noqa: E402
from cvt_deploy.preprocess import preprocess  # noqa: E402
from cvt_deploy.backends import load  # noqa: E402

from conftest import refused, run_cli, run_script  # noqa: E402

FP32_TOL = 1e-4


@pytest.fixture
def digit_files(tmp_path, demo_test_split) -> tuple[Path, list[Path], np.ndarray]:
    """Twelve held-out demo digits as PNG files in a folder (sorted names = split order)."""
    from PIL import Image

    folder = tmp_path / "digits"
    folder.mkdir()
    paths = []
    for i in range(12):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(demo_test_split.images[i]).save(paths[-1])
    return folder, paths, demo_test_split.labels[:12]


def torch_top1(model, paths: list[Path]) -> list[int]:
    with torch.no_grad():
        return model(torch.from_numpy(preprocess([str(p) for p in paths], model.cfg.preprocess))).argmax(1).tolist()


# --- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cvt-export", "cvt-check", "cvt-predict"])
def test_help_exits_0_and_shows_examples(name):
    proc = run_script(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout and f"{name} --" in proc.stdout
    assert proc.stderr == ""


# --- cvt-export: real exports --------------------------------------------------------------------


def test_export_default_is_the_demo_model(tmp_path, demo_model, stub_export_onnx, capsys, leftovers):
    """No --model/--weights: the demo model. The ONNX stage is the stub (the demo graph itself is
    exported for real by the session's demo bundle); the parity check against the model the CLI
    loaded runs for real, so a different model would fail it."""
    out = tmp_path / "demo"
    rc = export_cli.main(["--format", "onnx", "--out", str(out), "--limit", "64", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "random weights" not in captured.err
    assert f"wrote {out}" in captured.err
    (call,) = stub_export_onnx
    exported_model = call["model"]
    assert exported_model.cfg == demo_model.cfg
    assert call["opset"] == 17 and call["batch"] == BatchRange(1, 8, 32)  # the CLI's defaults
    for key, value in demo_model.state_dict().items():
        assert torch.equal(exported_model.state_dict()[key], value), key
    bundle = Bundle.open(out)
    assert bundle.config == demo_model.cfg
    assert bundle.batch == BatchRange(1, 8, 32)
    assert bundle.extra["source"]["checkpoint"] == str(DEMO_WEIGHTS)
    assert bundle.extra["source"]["sha256"] == file_sha256(DEMO_WEIGHTS)
    assert set(bundle.artifacts) == {"onnx-fp32", "onnx-fp32-onnxruntime-cpu", "torch-fp32"}
    # The weights in the bundle are the demo weights, tensor for tensor.
    saved = cvt_deploy.load_checkpoint(out / "model.safetensors").state_dict()
    for key, value in demo_model.state_dict().items():
        assert torch.equal(saved[key], value), key
    report, cpu_graph = on_onnxruntime(captured.out)  # the portable graph and the ONNX Runtime CPU one
    assert cpu_graph["artifact"] == "onnx-fp32-onnxruntime-cpu" and cpu_graph["passed"] is True
    assert report["passed"] is True and report["images"] == 64
    assert report["accuracy_candidate"] >= 0.97 and report["max_abs"] <= FP32_TOL
    assert bundle.require("onnx").info["parity"]["passed"] is True
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_export_official_pth_reads_the_architecture_from_the_checkpoint(tmp_path, randomize_weights, capsys):
    model = cvt_deploy.create_model("cvt-tiny", num_classes=7)
    randomize_weights(model, seed=21)
    pth = tmp_path / "official.pth"
    torch.save(model.state_dict(), pth)  # official microsoft/CvT key names
    out = tmp_path / "bundle"
    rc = export_cli.main(["--model", "cvt-tiny", "--weights", str(pth), "--out", str(out), "--no-check", "--batch-range", "2",
                          "-q"])
    assert rc == 0, capsys.readouterr().err
    bundle = Bundle.open(out)
    assert bundle.config.variant == "cvt-tiny" and bundle.config.num_classes == 7
    assert bundle.config.activation == "quick_gelu"  # official checkpoints' activation
    assert bundle.batch == BatchRange(2, 2, 2)
    assert "parity" not in bundle.require("onnx").info  # --no-check
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)  # 5: padded/split by the runtime
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(load(out, backend="onnxruntime").run(x) - ref).max() <= FP32_TOL


def test_export_hugging_face_folder(tmp_path, capsys):
    """Random-weight HF model with other labels: the default check runs on the demo digits
    as agreement-only (no accuracy: not this model's classes) and passes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.CvtForImageClassification(transformers.CvtConfig(
        embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=10)).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    out = tmp_path / "bundle"
    rc = export_cli.main(["--weights", str(folder), "--out", str(out), "--limit", "32", "--json", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report, cpu_graph = on_onnxruntime(captured.out)
    assert cpu_graph["passed"] is True
    assert report["passed"] is True and report["images"] == 32
    assert report["accuracy_reference"] is None and report["accuracy_candidate"] is None
    assert "agreement only" in report["data"]
    assert "accuracy drop (points)" not in {c["name"] for c in report["checks"]}
    cfg = Bundle.open(out).config
    assert (cfg.variant, cfg.num_classes, cfg.activation) == ("cvt-tiny", 10, "gelu")
    assert cfg.labels == tuple(hf.config.id2label[i] for i in range(10))
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x)).logits.numpy()
    assert np.abs(load(out, backend="onnxruntime").run(x) - ref).max() <= FP32_TOL


# --- cvt-export: failures ---------------------------------------------------------------------------


def on_onnxruntime(out: str) -> list[dict]:
    """The reports of cvt-export --json that gate the export (OpenVINO's, where installed, only advise)."""
    reports = json.loads(out)
    assert {r["backend"] for r in reports} <= {"onnxruntime", "openvino"}
    return [r for r in reports if r["backend"] == "onnxruntime"]


def test_export_parity_failure_exits_1_and_writes_nothing(tmp_path, monkeypatch, stub_export_onnx, capsys, leftovers):
    monkeypatch.setitem(cvt_deploy.parity.GATES, "fp32", Gates(max_abs=0.0))
    out = tmp_path / "bundle"
    rc = export_cli.main(["--out", str(out), "--limit", "16", "--json", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert stub_export_onnx, "the export ran; the check failed it"
    assert "parity gates failed" in captured.err and f"nothing was written to {out}" in captured.err
    assert "FAIL" in captured.err
    report, cpu_graph = on_onnxruntime(captured.out)
    assert report["passed"] is False and cpu_graph["passed"] is False
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_export_no_check_skips_the_gates(tmp_path, monkeypatch, stub_export_onnx, capsys):
    monkeypatch.setitem(cvt_deploy.parity.GATES, "fp32", Gates(max_abs=0.0))
    out = tmp_path / "bundle"
    assert export_cli.main(["--out", str(out), "--no-check", "-q"]) == 0
    assert Bundle.open(out).require("onnx").sha256


@pytest.mark.parametrize("case", ["under-a-file", "is-a-file", "non-empty-folder"])
def test_export_refuses_an_output_it_cannot_or_must_not_write(tmp_path, case, stub_export_onnx, capsys, leftovers):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    if case == "under-a-file":
        out, message = blocker / "bundle", "cannot write to"
    elif case == "is-a-file":
        out, message = blocker, "exists and is not a folder"
    else:
        out, message = tmp_path / "photos", "is not empty and holds no cvt-deploy bundle"
        out.mkdir()
        (out / "cat.jpg").write_bytes(b"jpeg")
    rc = export_cli.main(["--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "fix:" in err
    assert stub_export_onnx == [], "refused before exporting"
    assert blocker.read_text() == "keep"
    if case == "non-empty-folder":
        assert [p.name for p in out.iterdir()] == ["cat.jpg"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--opset", "16"], "opset 16 is too old"),
    (["--batch-range", "0"], "is not 1 <= min"),
    (["--batch-range", "eight"], "--batch-range 'eight' is not a number or range"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--weights", "/nonexistent/CvT-13.pth"], "does not exist"),
    (["--bundle", "/nonexistent"], "--bundle BUNDLE builds TensorRT engines from an existing bundle"),
    # Validated by ExportOptions / BuildOptions before any work is done.
    (["--limit", "0"], "--limit 0 must be a whole number >= 1"),
    (["--precision", "int8", "--calib-count", "0"], "--calib-count 0 must be a whole number >= 1"),
    (["--format", "trt", "--workspace", "0"], "--workspace 0 MiB is not positive"),
])
def test_export_bad_arguments_exit_2(tmp_path, args, message, capsys, leftovers):
    out = tmp_path / "bundle"
    rc = export_cli.main([*args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: " in err and message in err and "fix:" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_export_wrong_model_for_weights(tmp_path, capsys):
    pth = tmp_path / "tiny.pth"
    torch.save(cvt_deploy.create_model("cvt-tiny", num_classes=3).state_dict(), pth)
    rc = export_cli.main(["--model", "cvt-13", "--weights", str(pth), "--out", str(tmp_path / "b"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is not a cvt-13" in err and "--model cvt-tiny" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, flags, why", [
    (["--img-size", "100", "--activation", "gelu"], "--img-size, --activation", "the demo model"),
    (["--img-size", "384"], "--img-size", "the demo model"),
    (["--heads", "1,3,6"], "--heads", "the demo model"),
    (["--model", "cvt-13", "--config", "{CONFIG}"], "--config", "random weights"),
    (["--model", "cvt-13", "--heads", "1,3,6", "--img-size", "384"], "--heads", "random weights"),
])
def test_export_refuses_model_flags_that_describe_no_model_it_exports(tmp_path, no_work, capsys, leftovers, args, flags,
                                                                      why):
    """Without --weights the demo model (or --model's random weights) is exported as it is: a size,
    activation or architecture asked for would silently not be what the bundle holds."""
    config = tmp_path / "config.json"
    config.write_text('{"num_heads": [1, 3, 6]}')
    out = tmp_path / "bundle"
    rc = export_cli.main([*(a.replace("{CONFIG}", str(config)) for a in args), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"error: {flags} ha" in err and "no effect" in err and why in err, err
    assert "fix:" in err and "--weights" in err.split("fix:")[1], err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args", [["--model", "cvt-tiny", "--img-size", "96", "--activation", "gelu"],
                                  ["--model", "cvt-tiny", "--img-size", "100"]])
def test_export_model_alone_takes_its_size_and_activation(tmp_path, monkeypatch, capsys, args):
    """--model alone builds that variant with random weights at the size and activation asked for."""
    from cvt_deploy.errors import CvtDeployError

    made = []

    def stop(model, *a, **k):
        made.append(model)
        raise CvtDeployError("stopped before the export", "the test stops here")

    monkeypatch.setattr("cvt_deploy.export.pipeline.export_bundle", stop)
    rc = export_cli.main([*args, "--out", str(tmp_path / "b"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    if "100" in args:  # a size the architecture cannot take is refused by name before a model exists
        assert "100" in err and "multiple" in err and not made, err
    else:
        assert "stopped before the export" in err and (made[0].cfg.img_size, made[0].cfg.activation) == (96, "gelu")


def test_export_with_an_empty_data_folder_fails_and_writes_nothing(tmp_path, stub_export_onnx, capsys, leftovers):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "bundle"
    rc = export_cli.main(["--out", str(out), "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no images" in err and str(data) in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_export_checks_the_data_folder_before_exporting(tmp_path, stub_export_onnx, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rc = export_cli.main(["--out", str(tmp_path / "bundle"), "--data", str(data), "-q"])
    assert rc == 2
    assert stub_export_onnx == [], "the export ran before --data was looked at"


def test_export_trt_without_tensorrt_fails_at_once(tmp_path, monkeypatch, capsys):
    trt_util = pytest.importorskip("cvt_deploy.trt.util")
    reason = trt_util.tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT is installed here")

    def no_model(*a, **k):
        raise AssertionError("cvt-export loaded the model before checking for TensorRT")

    monkeypatch.setattr(export_cli, "load_model_from_args", no_model)
    out = tmp_path / "bundle"
    rc = export_cli.main(["--format", "trt", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--format trt needs TensorRT" in err and reason in err
    assert "not installed" in err or "not the TensorRT libraries" in err
    assert "install TensorRT" in err
    assert "carry the ONNX bundle to the target device" in err and "cvt-export --format trt --bundle" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_trt_from_an_existing_bundle_without_tensorrt(demo_bundle, capsys):
    trt_util = pytest.importorskip("cvt_deploy.trt.util")
    if trt_util.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is installed here")
    before = sorted(p.name for p in demo_bundle.iterdir())
    rc = export_cli.main(["--format", "trt", "--bundle", str(demo_bundle), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format trt needs TensorRT" in err
    assert sorted(p.name for p in demo_bundle.iterdir()) == before


# --- cvt-check ------------------------------------------------------------------------------------


def test_check_good_bundle_exits_0_with_a_pass_table(demo_bundle, capsys):
    rc = check_cli.main(["--bundle", str(demo_bundle), "--limit", "64", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PASS" in out and "FAIL" not in out
    assert "onnxruntime fp32 on cpu vs torch fp32 (cpu) on 64 images" in out
    assert "gates" in out.splitlines()[-4]  # the summary table's header (two fp32 graphs below it)
    assert "onnxruntime fp32 on cpu (onnxruntime-cpu graph) vs torch fp32 (cpu)" in out


def test_check_json(demo_bundle, capsys):
    rc = check_cli.main(["--bundle", str(demo_bundle), "--limit", "48", "--json", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    report, cpu_graph = json.loads(out)
    assert (report["artifact"], cpu_graph["artifact"]) == ("onnx-fp32", "onnx-fp32-onnxruntime-cpu")
    assert cpu_graph["passed"] is True and cpu_graph["max_abs"] <= FP32_TOL
    assert report["passed"] is True and report["images"] == 48 and report["precision"] == "fp32"
    assert report["accuracy_candidate"] >= 0.97 and report["max_abs"] <= FP32_TOL


def test_check_failing_gates_exit_1(demo_bundle, monkeypatch, capsys):
    monkeypatch.setitem(cvt_deploy.parity.GATES, "fp32", Gates(max_abs=0.0))
    rc = check_cli.main(["--bundle", str(demo_bundle), "--limit", "16", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in captured.out and "parity gates failed for onnxruntime fp32 on cpu" in captured.err


@pytest.mark.parametrize("case", ["missing-bundle", "missing-file", "empty-data", "no-fp16"])
def test_check_bad_input_exit_2(bundle_copy, tmp_path, case, capsys):
    args = ["--bundle", str(bundle_copy), "-q"]
    if case == "missing-bundle":
        args[1], message = str(tmp_path / "nope"), "is not a folder"
    elif case == "missing-file":
        (bundle_copy / "model.onnx").unlink()
        message = "lists model.onnx (onnx-fp32) but the file is missing"
    elif case == "empty-data":
        (tmp_path / "empty").mkdir()
        args += ["--data", str(tmp_path / "empty")]
        message = "no images"
    else:
        args += ["--precision", "fp16", "--limit", "8"]
        message = "nothing to check"
    rc = check_cli.main(args)
    captured = capsys.readouterr()
    assert rc == 2
    assert message in captured.err and "fix:" in captured.err


@pytest.mark.parametrize("args", [["--precision", "fp16"], ["--backend", "tensorrt"]])
def test_check_with_nothing_to_check_fails_before_the_reference_pass(demo_bundle, monkeypatch, capsys, args):
    def no_reference(*a, **k):
        raise AssertionError("the reference ran although nothing matched")

    monkeypatch.setattr("cvt_deploy.parity.run_streamed", no_reference)
    rc = check_cli.main(["--bundle", str(demo_bundle), *args, "-q"])
    assert rc == 2 and "nothing to check" in capsys.readouterr().err


# --- cvt-predict ----------------------------------------------------------------------------------


def test_predict_json_top1_matches_pytorch(demo_bundle, demo_model, digit_files, capsys):
    folder, paths, labels = digit_files
    rc = predict_cli.main(["--bundle", str(demo_bundle), "--json", "--topk", "3", str(folder)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out)
    assert [r["input"] for r in rows] == [str(p) for p in paths]
    assert all(len(r["top"]) == 3 for r in rows)
    top1 = [r["top"][0]["class"] for r in rows]
    assert top1 == torch_top1(demo_model, paths)
    assert [r["top"][0]["label"] for r in rows] == [str(c) for c in top1]
    assert np.mean(np.array(top1) == labels) >= 0.9


def test_predict_table_and_bare_onnx(demo_bundle, digit_files, capsys):
    folder, paths, _ = digit_files
    assert predict_cli.main(["--bundle", str(demo_bundle), "--backend", "onnxruntime", "--topk", "1", *map(str, paths[:2])]) == 0
    table = capsys.readouterr().out
    assert table.startswith("cvt-tiny on onnxruntime fp32 on cpu")
    assert "00.png" in table and "01.png" in table
    assert predict_cli.main(["--bundle", str(demo_bundle / "model.onnx"), "--json", str(paths[0])]) == 0
    assert json.loads(capsys.readouterr().out)[0]["input"] == str(paths[0])


@pytest.mark.parametrize("case", ["empty-folder", "not-an-image", "missing-image", "corrupt-onnx", "unknown-backend"])
def test_predict_bad_input(bundle_copy, tmp_path, case, capsys):
    bundle = str(bundle_copy)
    if case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args, message = [str(tmp_path / "empty")], "no images"
    elif case == "not-an-image":
        (tmp_path / "notes.png").write_text("hello")
        args, message = [str(tmp_path / "notes.png")], "is not a readable image"
    elif case == "missing-image":
        args, message = [str(tmp_path / "cat.jpg")], "does not exist"
    elif case == "corrupt-onnx":
        for graph in ("model.onnx", "model.ort-cpu.onnx"):  # whichever graph cvt-predict picks
            data = (bundle_copy / graph).read_bytes()
            (bundle_copy / graph).write_bytes(data[: len(data) // 2])
        (tmp_path / "x.png").write_bytes(b"")
        args, message = [str(tmp_path / "x.png")], "does not match the bundle's manifest"
    else:
        args, message = ["--backend", "tensorflow", "x.png"], "unknown backend 'tensorflow'"
    rc = predict_cli.main(["--bundle", bundle, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "fix:" in err


# --- subprocess: exit codes, no tracebacks ---------------------------------------------------------


@pytest.mark.parametrize("case", ["predict-empty-folder", "check-missing-bundle", "export-trt"])
def test_failing_cli_prints_a_message_not_a_traceback(bundle_copy, tmp_path, request, case):
    (tmp_path / "empty").mkdir()
    if case == "predict-empty-folder":
        proc = run_script("cvt-predict", "--bundle", str(bundle_copy), str(tmp_path / "empty"))
        message = "error: no images"
    elif case == "check-missing-bundle":
        proc = run_script("cvt-check", "--bundle", str(tmp_path / "nope"))
        message = "error: bundle"
    else:
        pytest.importorskip("cvt_deploy.trt.util")
        from cvt_deploy.trt.util import tensorrt_unavailable_reason

        if tensorrt_unavailable_reason() is None:
            pytest.skip("TensorRT is installed here")
        request.getfixturevalue("no_work")  # must fail before exporting, not after
        proc = run_cli("cvt-export", "--format", "trt", "--out", str(tmp_path / "out"))
        message = "error: --format trt needs TensorRT"
        assert not (tmp_path / "out").exists()
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_predict_corrupt_onnx_subprocess(bundle_copy, digit_files):
    _, paths, _ = digit_files
    for graph in ("model.onnx", "model.ort-cpu.onnx"):  # whichever graph cvt-predict picks
        (bundle_copy / graph).write_bytes(b"\x00" * 100)
    proc = run_script("cvt-predict", "--bundle", str(bundle_copy), str(paths[0]))
    assert proc.returncode == 2
    assert "does not match the bundle's manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_on_a_manifest_that_is_a_json_list(bundle_copy):
    (bundle_copy / "manifest.json").write_text("[]")
    proc = run_script("cvt-check", "--bundle", str(bundle_copy))
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2 and "manifest.json" in proc.stderr


def test_check_on_a_labelled_image_folder(demo_bundle, tmp_path, demo_test_split, capsys):
    from PIL import Image

    for i in range(20):
        folder = tmp_path / "data" / str(demo_test_split.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo_test_split.images[i]).save(folder / f"{i}.png")
    rc = check_cli.main(["--bundle", str(demo_bundle), "--data", str(tmp_path / "data"), "--json", "-q"])
    assert rc == 0
    report, cpu_graph = json.loads(capsys.readouterr().out)
    assert cpu_graph["images"] == 20 and cpu_graph["accuracy_drop"] == 0.0
    assert report["images"] == 20 and "labelled" in report["data"]
    assert report["accuracy_reference"] >= 0.9 and report["accuracy_drop"] == 0.0


@pytest.mark.parametrize("odd", ["\u00b9", "\u0663", "\uff11", "1_0", " 1"])
def test_check_refuses_a_class_folder_that_only_looks_like_an_index(demo_bundle, tmp_path, demo_test_split, capsys, odd):
    """Class folders are labels or indexes in the digits 0-9: '¹' (which str.isdigit takes and int
    refuses), '٣' or '１' (which int reads as 3 and 1) name no class the user wrote on purpose."""
    from PIL import Image

    for i, name in enumerate(["0", "1", odd]):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        Image.fromarray(demo_test_split.images[i]).save(folder / f"{i}.png")
    rc = check_cli.main(["--bundle", str(demo_bundle), "--data", str(tmp_path / "data"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"error: class folder {odd!r}" in err and "class index" in err and "digits 0-9" in err.split("fix:")[1], err


@pytest.mark.parametrize("args, words", [
    (["--calib", "x.npy"], ["--calib has no effect here: no int8 graph is exported", "add --precision int8"]),
    (["--precision", "fp16", "--calib-count", "8", "--calib-method", "entropy"],
     ["--calib-method, --calib-count have no effect"]),
    (["--no-check", "--limit", "64"], ["--limit has no effect here: nothing is checked (--no-check)", "drop --no-check"]),
    (["--no-check", "--data", "imgs"], ["--data has no effect"]),
    (["--workspace", "512"], ["--workspace has no effect here: no TensorRT engine is built (--format onnx)"]),
    (["--triton-instances", "2"], ["--triton-instances has no effect", "add --format triton"]),
    (["--classifier-threshold", "0.3"], ["--classifier-threshold has no effect", "add --format deepstream"]),
    (["--format", "deepstream", "--operate-on-gie-id", "3"], ["--operate-on-gie-id has no effect here: only a secondary"]),
    (["--format", "trt", "--bundle", "b", "--opset", "18"],
     ["--opset has no effect here: nothing is exported (--bundle): that bundle is used as it is",
      "export anew without --bundle"]),
    (["--format", "triton", "--bundle", "b", "--out", "r", "--weights", "w.pth"], ["--weights has no effect"]),
])
def test_a_flag_that_changes_nothing_is_refused_before_any_work(no_work, args, words):
    refused(run_cli("cvt-export", *args), *words)


@pytest.mark.parametrize("command, args, words", [
    ("cvt-bench", ["--iterations", "\uff11\uff10"], ["--iterations", "is not a whole number written in the digits 0-9"]),
    ("cvt-bench", ["--min-time", "nan"], ["--min-time", "'nan' is not a decimal number"]),
    ("cvt-bench", ["--min-time", "inf"], ["'inf' is not a decimal number"]),
    ("cvt-bench", ["--min-time", "1e999"], ["'1e999' is out of range"]),
    ("cvt-bench", ["--batch", "1,\u0663"], ["--batch", "is not a whole number"]),
    ("cvt-export", ["--batch-range", "1:\u0668:32"], ["--batch-range", "is not a number or range"]),
    ("cvt-export", ["--heads", "1,\u0663,6"], ["--heads", "is not a comma list of head counts"]),
    ("cvt-export", ["--opset", "1_8"], ["--opset", "'1_8' is not a whole number"]),
    ("cvt-export", ["--format", "deepstream", "--classifier-threshold", "NaN"], ["--classifier-threshold"]),
    ("cvt-predict", ["--topk", " 5"], ["--topk", "' 5' is not a whole number"]),
    ("cvt-serve", ["--http-port", "８０００"], ["--http-port"]),
])
def test_numbers_that_only_look_like_numbers_are_refused(no_work, command, args, words):
    """Python's int() and float() take other scripts' digits, '1_000', ' 8', 'nan' and 'inf'."""
    proc = run_cli(command, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error" in proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


@pytest.mark.parametrize("args, words", [
    (["--bundle", "b", "--concurrency", "1,2"], ["--concurrency has no effect here", "no --url is given"]),
    (["--bundle", "b", "--protocol", "grpc", "--send", "images"], ["--protocol, --send have no effect"]),
    (["--url", "http://localhost:8000", "--backend", "openvino"], ["--backend has no effect here: with --url"]),
    (["--url", "http://localhost:8000", "--torch-compile"], ["--torch-compile has no effect"]),
    (["--bundle", "b", "--quick", "--min-time", "1", "--warmup", "1", "--rounds", "2"], ["--quick has no effect"]),
])
def test_a_bench_flag_that_changes_nothing_is_refused_before_any_work(no_work, args, words):
    refused(run_cli("cvt-bench", *args), *words)
