"""cvt-export --format triton: model repositories whose configs parse with Triton's own schema
and match the bundle. (The tritonserver shipped by PyTriton has only the Python backend, so
these native ONNX Runtime / TensorRT models are not loaded by a server here.)"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="model repositories need the 'serve' extra: pip install 'cvt-deploy[serve]'")

from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.serve.repository import RepositoryOptions, validate_config, write_model_repository  # noqa: E402
from cvt_deploy.util import file_sha256  # noqa: E402


def parse(path: Path):
    return validate_config(path.read_text(), str(path))


def test_repository_matches_the_bundle(demo_bundle, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    bundle = Bundle.open(demo_bundle)
    cfg = bundle.config
    out = tmp_path / "repo"
    names = write_model_repository(bundle, out)
    assert names == ["cvt-onnx-fp32"]
    model = out / "cvt-onnx-fp32"
    config = parse(model / "config.pbtxt")
    assert config.name == "cvt-onnx-fp32" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == bundle.batch.max
    (inp,), (outp,) = config.input, config.output
    art = bundle.find("onnx", "fp32")
    assert (inp.name, inp.data_type, list(inp.dims)) == (art.info["input"], pb.TYPE_FP32, [cfg.in_chans, cfg.img_size, cfg.img_size])
    assert (outp.name, outp.data_type, list(outp.dims)) == (art.info["output"], pb.TYPE_FP32, [cfg.num_classes])
    labels = (model / outp.label_filename).read_text().splitlines()
    assert labels == [cfg.label(i) for i in range(cfg.num_classes)]
    assert config.HasField("dynamic_batching") and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert config.model_warmup[0].inputs[inp.name].zero_data
    assert file_sha256(model / "1" / "model.onnx") == art.sha256
    readme = (out / "README.md").read_text()
    assert "docker run" in readme and "tritonserver --model-repository=/models" in readme


def test_gpu_instances_with_the_ort_tensorrt_accelerator(demo_bundle, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    options = RepositoryOptions(model_name="digits", device="gpu", instances=2, ort_tensorrt=True, max_batch=8)
    write_model_repository(demo_bundle, tmp_path / "repo", options)
    config = parse(tmp_path / "repo" / "digits-onnx-fp32" / "config.pbtxt")
    assert config.max_batch_size == 8
    group = config.instance_group[0]
    assert (group.kind, group.count) == (pb.ModelInstanceGroup.KIND_GPU, 2)
    (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"


def test_fixed_batch_bundle_gets_full_shapes_and_no_batching(static_bundle, tmp_path):
    bundle = Bundle.open(static_bundle)
    assert not bundle.batch.dynamic
    write_model_repository(bundle, tmp_path / "repo")
    config = parse(tmp_path / "repo" / "cvt-onnx-fp32" / "config.pbtxt")
    cfg = bundle.config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [bundle.batch.max, cfg.in_chans, cfg.img_size, cfg.img_size]
    assert list(config.output[0].dims) == [bundle.batch.max, cfg.num_classes]


def test_rewrite_replaces_a_repository_and_refuses_other_folders(demo_bundle, tmp_path):
    out = tmp_path / "repo"
    write_model_repository(demo_bundle, out)
    (out / "cvt-onnx-fp32" / "1" / "model.onnx").write_bytes(b"an old graph")
    write_model_repository(demo_bundle, out)
    art = Bundle.open(demo_bundle).find("onnx", "fp32")
    assert file_sha256(out / "cvt-onnx-fp32" / "1" / "model.onnx") == art.sha256  # ours: replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CvtDeployError, match="refusing"):
        write_model_repository(demo_bundle, other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "repo"]  # no temporary folder left


def test_a_reexport_keeps_the_users_models_and_files_and_removes_only_its_own(demo_full_bundle, tmp_path):
    out = tmp_path / "repo"
    assert write_model_repository(demo_full_bundle, out) == ["cvt-onnx-fp32", "cvt-onnx-fp16", "cvt-onnx-int8"]
    (out / "my-detector" / "1").mkdir(parents=True)  # the user's own model beside ours
    (out / "my-detector" / "config.pbtxt").write_text('name: "my-detector"\n')
    (out / "cvt-onnx-fp32" / "NOTES.md").write_text("tuned on 2026-11-30")  # the user's file inside our model
    (out / "cvt-onnx-int8" / "2").mkdir()
    (out / "cvt-onnx-int8" / "2" / "model.onnx").write_bytes(b"the user's own version 2")
    mine = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ("my-detector" in str(p) or p.name == "NOTES.md"
                                                                          or "/2/" in str(p))}
    assert write_model_repository(demo_full_bundle, out, RepositoryOptions(precisions=["fp32"])) == ["cvt-onnx-fp32"]
    assert {p: p.read_bytes() for p in mine} == mine  # every file cvt-export did not write is there, unchanged
    assert not (out / "cvt-onnx-fp16").exists()  # ours only: gone with the precision
    assert sorted(p.name for p in (out / "cvt-onnx-int8").iterdir()) == ["2"]  # ours removed, the user's kept
    parse(out / "cvt-onnx-fp32" / "config.pbtxt")


@pytest.mark.parametrize("entry", ["photos", "./cvt-onnx-fp32/1/model.onnx", "cvt-onnx-fp32/./1/model.onnx", ".",
                                   "cvt-onnx-fp32", "../outside.txt"])
def test_an_odd_marker_entry_claims_nothing(demo_full_bundle, tmp_path, entry):
    """A hand-edited marker naming the user's folder, the repository itself, a place outside it or
    another spelling of a file the new repository writes: a re-export removes none of them."""
    from cvt_deploy.serve.repository import MARKER

    out = tmp_path / "repo"
    write_model_repository(demo_full_bundle, out, RepositoryOptions(precisions=["fp32"]))
    (out / "photos").mkdir()
    (out / "photos" / "x.jpg").write_bytes(b"the user's photo")
    (tmp_path / "outside.txt").write_text("the user's notes")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].append(entry)
    (out / MARKER).write_text(json.dumps(marker))
    write_model_repository(demo_full_bundle, out, RepositoryOptions(precisions=["fp32"]))
    assert (out / "photos" / "x.jpg").read_bytes() == b"the user's photo"
    assert (tmp_path / "outside.txt").read_text() == "the user's notes"
    graph = out / "cvt-onnx-fp32" / "1" / "model.onnx"
    assert graph.is_file() and file_sha256(graph) == file_sha256(demo_full_bundle / "model.ort-cpu.onnx") \
        or file_sha256(graph) == file_sha256(demo_full_bundle / "model.onnx")
    parse(out / "cvt-onnx-fp32" / "config.pbtxt")


def test_a_users_file_where_a_new_one_goes_is_refused_before_anything_moves(demo_full_bundle, tmp_path):
    out = tmp_path / "repo"
    write_model_repository(demo_full_bundle, out, RepositoryOptions(precisions=["fp32"]))
    (out / "cvt-onnx-int8").mkdir()
    (out / "cvt-onnx-int8" / "labels.txt").write_text("my labels")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CvtDeployError, match="cvt-onnx-int8/labels.txt; refusing to overwrite"):
        write_model_repository(demo_full_bundle, out, RepositoryOptions(precisions=["fp32", "int8"]))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("kind", ["symlink", "mount point", "."])
def test_out_may_be_a_symlink_a_mount_point_or_the_current_folder(demo_bundle, tmp_path, kind, monkeypatch):
    from conftest import tmpfs

    target = tmp_path / "real"
    target.mkdir()
    if kind == "symlink":
        out = tmp_path / "link"
        out.symlink_to(target)
    elif kind == ".":
        monkeypatch.chdir(target)
        out = Path(".")
    for _ in range(2):  # written, then written again over itself
        if kind == "mount point":
            with tmpfs(target, size="16m"):
                write_model_repository(demo_bundle, target)
                assert (target / "cvt-onnx-fp32" / "1" / "model.onnx").is_file()
                assert target.is_mount()
            continue
        write_model_repository(demo_bundle, out)
        assert (target / "cvt-onnx-fp32" / "1" / "model.onnx").is_file()
    if kind == "symlink":
        assert out.is_symlink()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_the_repository_is_as_readable_as_the_umask_says(demo_bundle, tmp_path, umask, folder, file):
    old = os.umask(umask)
    try:
        write_model_repository(demo_bundle, tmp_path / "repo")
    finally:
        os.umask(old)
    for p in [tmp_path / "repo", *(tmp_path / "repo").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (folder if p.is_dir() else file), p


def test_names_from_the_manifest_are_escaped_in_config_pbtxt(bundle_copy, tmp_path):
    hostile = 'x" } } parameters { key: "injected" value: { string_value: "y'
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["model"]["variant"] = hostile + "\n\\ \u00e9"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    write_model_repository(bundle_copy, tmp_path / "repo")
    config = parse(tmp_path / "repo" / "cvt-onnx-fp32" / "config.pbtxt")
    assert config.parameters["cvt_deploy.variant"].string_value == hostile + "\n\\ \u00e9"  # exactly, as data
    assert set(config.parameters) == {"cvt_deploy.variant", "cvt_deploy.precision"}  # nothing injected


@pytest.mark.parametrize("label", ["two\nlines", "carriage\rreturn", "escape\x1b[31m"])
def test_labels_that_would_break_labels_txt_are_refused(bundle_copy, tmp_path, label):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["model"]["labels"][3] = label
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CvtDeployError, match="label 3 of the bundle is .* would shift every later class"):
        write_model_repository(bundle_copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_a_graph_that_does_not_match_the_manifest_is_refused_before_any_config(bundle_copy, tmp_path):
    import onnx

    graph = bundle_copy / "model.onnx"
    model = onnx.load(str(graph))
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 7  # says 7 classes: another model's graph
    onnx.save(model, str(graph))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["artifacts"]["onnx-fp32"]["sha256"] = file_sha256(graph)  # the hash agrees: only the check can tell
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CvtDeployError, match="model.onnx does not match the bundle's manifest: its output .* 10 classes"):
        write_model_repository(bundle_copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_nothing_is_written_when_the_bundle_lacks_the_precision(demo_bundle, tmp_path):
    with pytest.raises(CvtDeployError, match="no ONNX or TensorRT artifact at int8"):
        write_model_repository(demo_bundle, tmp_path / "repo", RepositoryOptions(precisions=["int8"]))
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_breaks_the_schema_is_refused():
    with pytest.raises(CvtDeployError, match="Triton's schema"):
        validate_config('name: "x"\nmax_batch_size: "eight"\n', "x/config.pbtxt")


def test_cli_writes_a_repository(demo_bundle, tmp_path, capsys):
    from cvt_deploy.cli.export import main

    assert main(["--format", "triton", "--bundle", str(demo_bundle), "--out", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "cvt-onnx-fp32" / "1" / "model.onnx").is_file()
    assert main(["--format", "triton", "--bundle", str(demo_bundle)]) == 2
    assert "--out" in capsys.readouterr().err
