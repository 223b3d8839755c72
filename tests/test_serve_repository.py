"""cvt-export --format triton: model repositories whose configs parse with Triton's own schema
and match the bundle. (The tritonserver shipped by PyTriton has only the Python backend, so
these native ONNX Runtime / TensorRT models are not loaded by a server here.)"""
from __future__ import annotations

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
    (out / "cvt-onnx-fp32" / "stale").write_text("x")
    write_model_repository(demo_bundle, out)
    assert not (out / "cvt-onnx-fp32" / "stale").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CvtDeployError, match="refusing"):
        write_model_repository(demo_bundle, other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "repo"]  # no temporary folder left


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
