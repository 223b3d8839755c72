"""ONNX export: graph structure, numerical parity with PyTorch, metadata, the manifest,
simplify, and export_bundle's atomicity when a stage or the parity gates fail."""
from __future__ import annotations

import json
import os
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cvt_deploy  # noqa: E402
from cvt_deploy.bundle import BatchRange, Bundle  # noqa: E402
from cvt_deploy.checkpoints import file_sha256  # noqa: E402
from cvt_deploy.config import CvtConfig  # noqa: E402
from cvt_deploy.demo import DEMO_WEIGHTS  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.onnx import (  # noqa: E402
    DEFAULT_OPSET,
    check_batches,
    export_onnx,
    fold_batchnorm,
    graph_metadata,
    ort_session,
    read_metadata,
    simplify,
    stamp_metadata,
)
from cvt_deploy.export.pipeline import export_bundle  # noqa: E402
from cvt_deploy.parity import ParityFailure  # noqa: E402
from cvt_deploy.parity import Gates  # noqa: E402
from conftest import rand_batch  # noqa: E402

FP32_TOL = 1e-4


@torch.no_grad()
def torch_logits(model, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def assert_graph_structure(path: Path, size: int, num_classes: int) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "Einsum" not in ops, "attention must be plain MatMul/Softmax (TensorRT parses no Einsum everywhere)"
    assert "BatchNormalization" not in ops, "the conv-projection BatchNorms must be folded into the convs"
    assert {"MatMul", "Softmax", "Conv"} <= ops
    assert "LayerNormalization" in ops, "opset 17 keeps LayerNorm as one node"
    assert default_opset(model) == DEFAULT_OPSET == 17
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["logits"]
    in_dims = model.graph.input[0].type.tensor_type.shape.dim
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    # Dynamic batch: a symbolic name, no fixed value; every other dimension fixed.
    assert in_dims[0].dim_param and not in_dims[0].dim_value
    assert [d.dim_value for d in in_dims[1:]] == [3, size, size]
    assert out_dims[0].dim_param and not out_dims[0].dim_value
    assert out_dims[1].dim_value == num_classes


# --- CvT-13 (random weights) ------------------------------------------------------------


@pytest.mark.slow
def test_cvt13_graph_structure(cvt13_export):
    assert_graph_structure(cvt13_export.path, 224, 1000)


@pytest.fixture(scope="module")
def cvt13_reference(cvt13_export) -> tuple[np.ndarray, np.ndarray]:
    """Eight random 224x224 images and CvT-13's PyTorch logits for them (rows are independent)."""
    x = rand_batch(8, seed=8, size=224)
    ref = torch_logits(cvt13_export.model, x)
    assert ref.std() > 0.1, "reference logits too uniform for a meaningful comparison"
    return x, ref


@pytest.mark.slow
def test_cvt13_onnxruntime_matches_pytorch_at_batches_1_3_8(cvt13_export, cvt13_reference):
    x, ref = cvt13_reference
    sess = ort_session(cvt13_export.path)
    for n in (1, 3, 8):
        out = sess.run(None, {"pixel_values": x[:n]})[0]
        assert out.shape == (n, 1000)
        assert np.abs(out - ref[:n]).max() <= FP32_TOL, f"batch {n}"


@pytest.mark.slow
def test_cvt13_bare_onnx_runs_from_its_metadata(cvt13_export, cvt13_reference):
    from cvt_deploy.backends import load

    x, ref = cvt13_reference
    rt = load(cvt13_export.path)
    assert rt.backend == "onnxruntime"
    assert rt.config == cvt13_export.model.cfg
    assert np.abs(rt.run(x[3:5]) - ref[3:5]).max() <= FP32_TOL


# --- the tiny (demo) model ----------------------------------------------------------------


def test_tiny_graph_structure(demo_bundle):
    assert_graph_structure(demo_bundle / "model.onnx", 64, 10)


def test_tiny_onnxruntime_matches_pytorch_at_batches_1_3_8(demo_export, demo_test_split):
    from cvt_deploy.preprocess import preprocess

    sess = ort_session(demo_export.root / "model.onnx")
    real = preprocess(list(demo_test_split.images[:8]), demo_export.model.cfg.preprocess)
    for n in (1, 3, 8):
        for x in (rand_batch(n, seed=10 + n), real[:n]):
            out = sess.run(None, {"pixel_values": x})[0]
            ref = torch_logits(demo_export.model, x)
            assert out.shape == (n, 10)
            assert np.abs(out - ref).max() <= FP32_TOL, f"batch {n}"


def test_fold_batchnorm_is_exact_and_leaves_the_original_alone(demo_model, randomize_weights):
    model = cvt_deploy.create_model("cvt-tiny", num_classes=10)
    randomize_weights(model, seed=7)  # BatchNorm statistics far from identity
    folded = fold_batchnorm(model)
    x = rand_batch(3, seed=1)
    assert np.abs(torch_logits(folded, x) - torch_logits(model, x)).max() <= FP32_TOL
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_opset_below_17_is_refused_before_exporting(demo_model, tmp_path, leftovers):
    target = tmp_path / "out" / "model.onnx"
    with pytest.raises(CvtDeployError) as e:
        export_onnx(demo_model, target, opset=16)
    assert "opset 16" in e.value.message and "17" in e.value.message
    assert "LayerNormalization" in e.value.message
    assert e.value.hint and "--opset 17" in e.value.hint
    assert not target.exists()
    assert leftovers(target.parent) == []


def test_check_batches_catches_a_graph_with_a_fixed_batch(static_bundle):
    """The guard against torch's exporter specialising the batch: a static graph fails it."""
    with pytest.raises(CvtDeployError, match="rejects batch 1"):
        check_batches(static_bundle / "model.onnx", 3, 64, BatchRange(1, 8, 8))
    check_batches(static_bundle / "model.onnx", 3, 64, BatchRange(4, 4, 4))  # its own range passes


# --- static batch ---------------------------------------------------------------------------


def test_static_batch_export_has_a_fixed_dimension(static_bundle):
    model = onnx.load(str(static_bundle / "model.onnx"))
    in_dims = model.graph.input[0].type.tensor_type.shape.dim
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in in_dims] == [4, 3, 64, 64]
    assert not in_dims[0].dim_param
    assert [d.dim_value for d in out_dims] == [4, 10]
    assert Bundle.open(static_bundle).batch == BatchRange(4, 4, 4)
    assert json.loads(read_metadata(static_bundle / "model.onnx")["batch"]) == {"min": 4, "opt": 4, "max": 4}
    # Control: the graph itself really refuses other batch sizes.
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    sess = ort_session(static_bundle / "model.onnx")
    with pytest.raises(InvalidArgument, match="invalid dimensions"):
        sess.run(None, {"pixel_values": rand_batch(3, 0)})


# --- metadata -------------------------------------------------------------------------------


def test_graph_metadata_round_trips(demo_export):
    meta = read_metadata(demo_export.root / "model.onnx")
    assert CvtConfig.from_json(meta["config"]) == demo_export.model.cfg
    assert meta["precision"] == "fp32"
    assert json.loads(meta["batch"]) == BatchRange().to_dict()
    assert meta["source_sha256"] == file_sha256(DEMO_WEIGHTS)
    versions = json.loads(meta["versions"])
    assert versions["cvt_deploy"] == cvt_deploy.__version__
    for dist in ("torch", "onnx", "onnxruntime"):
        assert versions[dist] == importlib_metadata.version(dist)
    # The raw keys carry the cvt_deploy. prefix; read_metadata strips it.
    raw = {p.key for p in onnx.load(str(demo_export.root / "model.onnx"), load_external_data=False).metadata_props}
    assert {"cvt_deploy.config", "cvt_deploy.precision", "cvt_deploy.batch"} <= raw


def test_graph_metadata_values_are_strings():
    meta = graph_metadata('{"a": 1}', "fp16", {"batch": {"min": 1}, "note": "x", "n": 3})
    assert meta == {"cvt_deploy.config": '{"a": 1}', "cvt_deploy.precision": "fp16",
                    "cvt_deploy.batch": '{"min": 1}', "cvt_deploy.note": "x", "cvt_deploy.n": "3"}


def test_stamp_metadata_replaces_our_keys_and_keeps_the_rest(demo_bundle, tmp_path, leftovers):
    path = tmp_path / "model.onnx"
    shutil.copyfile(demo_bundle / "model.onnx", path)
    before = read_metadata(path)
    stamp_metadata(path, {"cvt_deploy.precision": "fp16", "cvt_deploy.extra": "1"})
    after = read_metadata(path)
    assert after["precision"] == "fp16" and after["extra"] == "1"
    assert after["config"] == before["config"] and after["batch"] == before["batch"]
    keys = [p.key for p in onnx.load(str(path), load_external_data=False).metadata_props]
    assert len(keys) == len(set(keys)), "a stamped key must replace, not duplicate"
    assert leftovers(tmp_path) == []
    # The graph still runs and gives the same logits.
    x = rand_batch(2, 3)
    a = ort_session(path).run(None, {"pixel_values": x})[0]
    b = ort_session(demo_bundle / "model.onnx").run(None, {"pixel_values": x})[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b"not an onnx file at all", id="garbage"),
    pytest.param(None, id="truncated"),
])
def test_read_metadata_of_a_bad_file_is_a_clear_error(demo_bundle, tmp_path, content):
    path = tmp_path / "model.onnx"
    data = (demo_bundle / "model.onnx").read_bytes()
    path.write_bytes(data[: len(data) // 3] if content is None else content)
    with pytest.raises(CvtDeployError) as e:
        read_metadata(path)
    assert "not a readable ONNX file" in e.value.message and str(path) in e.value.message


# --- the bundle and its manifest ------------------------------------------------------------


def test_manifest_lists_artifacts_with_matching_sha256(demo_export):
    root = demo_export.root
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["format"] == "cvt-deploy-bundle" and raw["format_version"] == 1
    assert CvtConfig.from_dict(raw["model"]) == demo_export.model.cfg
    assert raw["batch"] == BatchRange().to_dict()
    assert raw["source"] == {"checkpoint": str(DEMO_WEIGHTS), "sha256": file_sha256(DEMO_WEIGHTS)}
    # the portable fp32 graph, and the ONNX Runtime CPU graph beside it (export/ort_cpu.py)
    assert set(raw["artifacts"]) == {"onnx-fp32", "onnx-fp32-onnxruntime-cpu", "torch-fp32"}
    assert raw["artifacts"]["onnx-fp32-onnxruntime-cpu"]["target"] == "onnxruntime-cpu"
    files = {a["file"] for a in raw["artifacts"].values()}
    assert files == {"model.onnx", "model.ort-cpu.onnx", "model.safetensors"}
    assert {p.name for p in root.iterdir()} == files | {"manifest.json"}
    for art in raw["artifacts"].values():
        assert len(art["sha256"]) == 64
        assert art["sha256"] == file_sha256(root / art["file"]), art["file"]
    onnx_art = raw["artifacts"]["onnx-fp32"]
    assert (onnx_art["kind"], onnx_art["precision"], onnx_art["opset"]) == ("onnx", "fp32", 17)
    assert (onnx_art["input"], onnx_art["output"]) == ("pixel_values", "logits")
    # What simplify did is recorded as it is: a graph kept as exported says why (the exporter's
    # own folding leaves onnxsim little to do; the portable rewrites come after it).
    simplified = onnx_art["simplify"]
    if simplified["simplified"]:
        assert simplified["nodes_after"] < simplified["nodes_before"]
    else:
        assert simplified["reason"] and simplified["nodes_after"] == simplified["nodes_before"]
    # The Bundle API reads back what was written.
    bundle = Bundle.open(root)
    assert bundle.config == demo_export.model.cfg
    assert bundle.require("onnx").file == "model.onnx"
    assert bundle.find("onnx", "fp16") is None


def test_export_with_check_writes_parity_into_the_manifest(demo_export):
    artifacts = json.loads((demo_export.root / "manifest.json").read_text())["artifacts"]
    # The portable graph and the ORT-CPU graph, each checked on ONNX Runtime (OpenVINO's own
    # figures, where it is installed, sit beside them: test_openvino).
    checked = {name for name, art in artifacts.items() if art.get("parity")}
    assert checked == {"onnx-fp32", "onnx-fp32-onnxruntime-cpu"}
    assert all(artifacts[n]["parity"]["backend"] == "onnxruntime" and artifacts[n]["parity"]["passed"] for n in checked)
    parity = artifacts["onnx-fp32"]["parity"]
    assert parity["passed"] is True
    assert parity["images"] == 360 and "demo held-out digits" in parity["data"]
    assert parity["max_abs"] <= FP32_TOL
    assert parity["top1_agreement"] == 1.0
    assert parity["accuracy_candidate"] >= 0.97
    assert {c["name"] for c in parity["checks"]} == {"max |diff|", "min cosine", "top-1 agreement"}
    assert all(c["ok"] for c in parity["checks"])


def _foldable_graph(path: Path) -> int:
    """A seven-node graph whose constant part onnxsim folds: y = (x * (2 * 3)) + 2, via Identity."""
    from onnx import TensorProto, helper

    const = lambda name, v: helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [1], [v]))  # noqa: E731
    nodes = [const("two", 2.0), const("three", 3.0), helper.make_node("Mul", ["two", "three"], ["six"]),
             helper.make_node("Mul", ["pixel_values", "six"], ["scaled"]), helper.make_node("Identity", ["scaled"], ["same"]),
             helper.make_node("Identity", ["same"], ["again"]), helper.make_node("Add", ["again", "two"], ["logits"])]
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 4, 4])
    model = helper.make_model(helper.make_graph(nodes, "foldable", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return len(nodes)


def test_simplify_folds_constants_keeps_outputs_and_leaves_no_scratch(tmp_path, leftovers):
    path = tmp_path / "model.onnx"
    nodes = _foldable_graph(path)
    x = np.random.default_rng(9).standard_normal((2, 3, 4, 4)).astype(np.float32)
    result = simplify(path)
    assert result["simplified"] is True, result
    kept = onnx.load(str(path)).graph.node
    assert result["nodes_before"] == nodes and result["nodes_after"] == len(kept)
    assert sorted(n.op_type for n in kept) == ["Add", "Constant", "Constant", "Mul"]  # 2 * 3 folded, Identity gone
    np.testing.assert_allclose(ort_session(path).run(None, {"pixel_values": x})[0], x * 6 + 2, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert leftovers(tmp_path) == []


def test_simplify_leaves_a_graph_it_cannot_shrink_as_it_is(demo_bundle, tmp_path, leftovers):
    path = tmp_path / "model.onnx"
    shutil.copyfile(demo_bundle / "model.onnx", path)  # simplified by the export already
    before = path.read_bytes()
    result = simplify(path)
    assert result["simplified"] is False and "no smaller graph" in result["reason"], result
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] and leftovers(tmp_path) == []


# --- export_bundle: failures leave nothing ------------------------------------------------------


def test_parity_failure_leaves_no_bundle_and_no_temporary_folders(demo_model, tmp_path, monkeypatch,
                                                                   stub_export_onnx, leftovers):
    monkeypatch.setitem(cvt_deploy.parity.GATES, "fp32", Gates(max_abs=0.0))
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "bundle"
    with pytest.raises(ParityFailure) as e:
        export_bundle(demo_model, out, check_limit=32, progress=False)
    assert stub_export_onnx, "the export stage ran"
    report = e.value.reports[0]
    assert all(not r for r in e.value.reports)
    assert not report and report.max_abs > 0
    assert report.failed and report.failed[0].startswith("max |diff|")
    assert "parity gates failed for onnxruntime fp32 on cpu" in e.value.message and "max |diff|" in e.value.message
    assert "--no-check" in e.value.hint
    assert not out.exists()
    assert list(parent.iterdir()) == []


def test_failed_reexport_keeps_the_previous_bundle(bundle_copy, demo_model, monkeypatch, stub_export_onnx, leftovers):
    before = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    monkeypatch.setitem(cvt_deploy.parity.GATES, "fp32", Gates(max_abs=0.0))
    with pytest.raises(ParityFailure):
        export_bundle(demo_model, bundle_copy, check_limit=16, progress=False)
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir()} == before
    assert leftovers(bundle_copy.parent) == []
    assert sorted(p.name for p in bundle_copy.parent.iterdir()) == [bundle_copy.name]


def test_reexport_replaces_a_previous_bundle(bundle_copy, demo_model, stub_export_onnx, leftovers):
    (bundle_copy / "model.onnx").write_bytes(b"stale")
    result = export_bundle(demo_model, bundle_copy, batch=BatchRange(1, 2, 16), check=False, progress=False)
    assert result.bundle.root == bundle_copy
    bundle = Bundle.open(bundle_copy)
    assert bundle.batch == BatchRange(1, 2, 16)
    assert "parity" not in bundle.require("onnx").info  # check=False records no parity
    assert file_sha256(bundle_copy / "model.onnx") == bundle.require("onnx").sha256
    assert leftovers(bundle_copy.parent) == []


def test_interrupted_export_leaves_nothing(demo_model, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cvt_deploy.export.pipeline.export_onnx", interrupted)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(demo_model, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_folder_that_is_not_a_bundle(demo_model, tmp_path, stub_export_onnx):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(CvtDeployError) as e:
        export_bundle(demo_model, out, progress=False)
    assert "not empty" in e.value.message and "holds no cvt-deploy bundle" in e.value.message
    assert (out / "thesis.txt").read_text() == "do not delete"
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]
    assert stub_export_onnx == []


def test_export_to_an_unwritable_place_fails_before_exporting(demo_model, tmp_path, stub_export_onnx):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CvtDeployError) as e:
        export_bundle(demo_model, blocker / "sub" / "bundle", progress=False)
    assert "cannot write" in e.value.message
    assert stub_export_onnx == []
    with pytest.raises(CvtDeployError, match="exists and is not a folder"):
        export_bundle(demo_model, blocker, progress=False)
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_export_rejects_an_unknown_precision(demo_model, tmp_path, stub_export_onnx):
    with pytest.raises(CvtDeployError, match="unknown precision 'fp8'"):
        export_bundle(demo_model, tmp_path / "b", precisions=("fp32", "fp8"), progress=False)
    assert list(tmp_path.iterdir()) == [] and stub_export_onnx == []


@pytest.mark.parametrize("text, expected, dynamic", [
    ("8", BatchRange(8, 8, 8), False), ("1:32", BatchRange(1, 8, 32), True), ("1:4", BatchRange(1, 4, 4), True),
    ("1:8:32", BatchRange(1, 8, 32), True), ("16:64", BatchRange(16, 16, 64), True),
])
def test_batch_range_parse(text, expected, dynamic):
    r = BatchRange.parse(text)
    assert r == expected
    assert r.dynamic is dynamic


@pytest.mark.parametrize("text, message", [
    ("0", "not 1 <= min"), ("x", "not a number"), ("1:2:3:4", "too many parts"), ("8:4", "not 1 <= min"), ("", "not a number"),
])
def test_batch_range_parse_rejects(text, message):
    with pytest.raises(CvtDeployError, match=message):
        BatchRange.parse(text)


def test_no_stray_files_beside_the_session_bundle(demo_bundle, leftovers):
    assert leftovers(demo_bundle.parent) == []
    assert sorted(p.name for p in demo_bundle.parent.iterdir()) == ["bundle"]
    assert os.access(demo_bundle / "model.onnx", os.R_OK)
    # Temporary files are created private; the bundle's own files must not stay that way.
    assert (demo_bundle / "model.onnx").stat().st_mode & 0o044


def test_an_export_leaves_the_environment_as_it_was(demo_bundle):
    """Libraries publish their scratch folders in the environment (torch's inductor:
    TORCHINDUCTOR_CACHE_DIR); pointing into the export's removed staging folder, they made
    the next torch process recreate it beside the bundle."""
    assert not {k: v for k, v in os.environ.items() if v.startswith(str(demo_bundle.parent))}


def test_export_onnx_leaves_no_graph_when_verification_fails(demo_model, static_bundle, tmp_path, monkeypatch, leftovers):
    """Simulate the failure check_batches guards against: torch's exporter returning a graph
    whose batch dimension is fixed (here the genuine static-batch demo graph)."""
    specialised = onnx.load(str(static_bundle / "model.onnx"))

    class Program:
        model_proto = specialised

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    target = tmp_path / "model.onnx"
    with pytest.raises(CvtDeployError, match="rejects batch 1"):
        export_onnx(demo_model, target)
    assert leftovers(tmp_path) == []
    assert not target.exists(), "a graph that failed verification was left at the output path"


def test_ctrl_c_inside_the_exporter_stops_as_interrupted_not_as_an_export_failure(demo_model, tmp_path, monkeypatch):
    """torch.onnx wraps a KeyboardInterrupt raised in its tracing in its own error type; the
    export must still stop as interrupted (exit 128+signal), not blame the exporter."""
    import torch

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export") from e

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(demo_model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
