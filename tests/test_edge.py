"""Edge embedding: raw-pixel graphs (export/rawpixel.py), the DeepStream config and resize
check (deepstream/), and the DLA refusals (trt/dla.py)."""
from __future__ import annotations

import configparser
import ctypes
import ctypes.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import export_to, raw_pixel_copy
from cvt_deploy.errors import CvtDeployError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

PRECISIONS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def demo_float(demo_full_bundle: Path) -> Path:
    return demo_full_bundle


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory: pytest.TempPathFactory, randomize_weights: Any) -> Path:
    """A random-weight cvt-tiny with the 224-style resize-and-crop preprocessing, at 64 pixels."""
    from cvt_deploy.model import create_model

    model = create_model("cvt-tiny", img_size=64, num_classes=10)
    randomize_weights(model, seed=3)
    return export_to(tmp_path_factory, model.eval(), "edge-random", precisions=PRECISIONS, check=False)


_FLOAT_REPORTS: dict[Path, Any] = {}


def _graph_top1(path: Path, x: np.ndarray) -> np.ndarray:
    from cvt_deploy.util import ort_session

    sess = ort_session(path)
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0]).argmax(1)


@pytest.mark.parametrize("which,input_format,output", [("demo", "uint8-nhwc", "probs"),
                                                       ("random", "uint8-nchw", "logits"),
                                                       ("random", "float-pixels", "probs")])
def test_raw_pixel_graphs_match_the_float_graphs_and_pass_the_gates(request, tmp_path, which, input_format, output,
                                                                     demo_test_split):
    from onnx import TensorProto

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.parity import check_bundle
    from cvt_deploy.preprocess import graph_input, preprocess_pixels
    from cvt_deploy.backends import load

    float_root = request.getfixturevalue("demo_float" if which == "demo" else "random_tiny")
    raw = Bundle.open(raw_pixel_copy(float_root, tmp_path / "raw", input_format, output))
    cfg = raw.config
    pixels = preprocess_pixels(list(demo_test_split.images[:120]), cfg.preprocess)
    size, c = cfg.img_size, cfg.in_chans
    want_shape = {"uint8-nhwc": [size, size, c]}.get(input_format, [c, size, size])
    for precision in PRECISIONS:
        art = raw.require("onnx", precision)
        assert (art.info["input_format"], art.info["output_kind"]) == (input_format, output)
        model = onnx.load(str(raw.path(art)))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        inp = model.graph.input[0]
        want_type = TensorProto.UINT8 if input_format.startswith("uint8") else TensorProto.FLOAT
        assert inp.type.tensor_type.elem_type == want_type
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == want_shape
        assert model.graph.output[0].name == ("probs" if output == "probs" else "logits")
        # Same pixels: the float graph normalised in numpy, the raw graph fed the pixels themselves.
        float_graph = Path(float_root) / art.file
        top_float = _graph_top1(float_graph, graph_input(pixels, cfg.preprocess, "float"))
        top_raw = _graph_top1(raw.path(art), graph_input(pixels, cfg.preprocess, input_format))
        assert (top_float == top_raw).all(), precision
    # The same gate verdicts as the float graphs (the runtimes feed the raw graphs from float
    # batches); all pass for the demo model, int8 of random weights misses its cosine gate in both.
    reports = check_bundle(raw, limit=120, progress=False)
    if float_root not in _FLOAT_REPORTS:  # the float bundle's own verdicts, the same for every raw format
        _FLOAT_REPORTS[float_root] = check_bundle(Bundle.open(float_root), limit=120, progress=False)
    float_reports = _FLOAT_REPORTS[float_root]
    # Every graph of the bundle, the ONNX Runtime CPU ones included, takes the raw pixels.
    assert [r.artifact for r in reports] == [r.artifact for r in float_reports]
    assert sorted({r.precision for r in reports}, key=PRECISIONS.index) == list(PRECISIONS)
    for rep, ref in zip(reports, float_reports):
        if rep.artifact == "onnx-int8-onnxruntime-cpu":
            # Dynamic int8 scales its activations per call, so the last-bit differences of
            # in-graph normalisation move the scales: one image may flip on a random model.
            assert abs(rep.top1_agreement - ref.top1_agreement) <= 1 / 120 and abs(rep.min_cosine - ref.min_cosine) < 2e-2
            continue
        assert bool(rep) == bool(ref) and rep.top1_agreement == ref.top1_agreement, (str(rep), str(ref))
        # int8: the last-bit differences of in-graph normalisation cross a few quantization
        # steps of the first conv's input (min cosine of a random model moves ~1e-3).
        assert abs(rep.min_cosine - ref.min_cosine) < (5e-3 if rep.precision == "int8" else 1e-3)
    assert all(reports) or which == "random", [str(r) for r in reports]
    # predict() takes images and answers as on the float bundle.
    images = list(demo_test_split.images[:40])
    for precision in PRECISIONS:
        ref = load(float_root, backend="onnxruntime", precision=precision).predict(images, topk=3)
        runtime = load(raw.root, backend="onnxruntime", precision=precision)
        assert (runtime.input_format, runtime.output_kind) == (input_format, output)
        got = runtime.predict(images, topk=3)
        assert (got.top1 == ref.top1).all()
        np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4 if precision == "fp32" else 2e-2)


def test_a_raw_pixel_graph_refuses_a_float_batch_not_made_of_pixels(tmp_path, demo_float):
    from cvt_deploy.backends import load

    runtime = load(raw_pixel_copy(demo_float, tmp_path / "raw", "uint8-nchw", "logits"), backend="onnxruntime")
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with pytest.raises(CvtDeployError, match="not made of them"):
        runtime.run(batch)
    pixels = np.zeros((2, 64, 64, 3), np.uint8)
    assert runtime.run(pixels).shape == (2, 10)  # pixels at the model's size go straight in


def test_preprocess_pixels_round_trip(demo_test_split, demo_model):
    from cvt_deploy.preprocess import pixels_from_batch, preprocess, preprocess_pixels

    cfg = demo_model.cfg.preprocess
    images = list(demo_test_split.images[:16])
    pixels = preprocess_pixels(images, cfg)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 64, 64, 3)
    assert (pixels_from_batch(preprocess(images, cfg), cfg) == pixels).all()


@pytest.mark.parametrize("key,value", [("input_format", "uint16-nhwc"), ("output_kind", "softmax")])
def test_manifest_with_an_unknown_io_kind_is_damaged(bundle_copy, key, value):
    from cvt_deploy.bundle import Bundle

    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["artifacts"]["onnx-fp32"][key] = value
    manifest.write_text(json.dumps(data))
    with pytest.raises(CvtDeployError, match=f"{key} '{value}'"):
        Bundle.open(bundle_copy)


def test_export_options_refuse_unknown_formats():
    from cvt_deploy.export.pipeline import ExportOptions

    with pytest.raises(CvtDeployError, match="--input-format"):
        ExportOptions(input_format="uint8")
    with pytest.raises(CvtDeployError, match="--output"):
        ExportOptions(output="softmax")


# -- DeepStream ---------------------------------------------------------------------------

def _glib_keyfile(path: Path) -> dict[str, str] | None:
    """[property] of ``path`` as GLib's own key-file parser reads it (None: no libglib here)."""
    name = ctypes.util.find_library("glib-2.0")
    if name is None:
        return None
    glib = ctypes.CDLL(name)
    glib.g_key_file_new.restype = ctypes.c_void_p
    glib.g_key_file_load_from_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    glib.g_key_file_get_keys.restype = ctypes.POINTER(ctypes.c_char_p)
    glib.g_key_file_get_keys.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
    glib.g_key_file_get_string.restype = ctypes.c_char_p  # leaked: a test process
    glib.g_key_file_get_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    kf = glib.g_key_file_new()
    assert glib.g_key_file_load_from_file(kf, str(path).encode(), 0, None), "GLib rejects the key file"
    keys = glib.g_key_file_get_keys(kf, b"property", None, None)
    out = {}
    i = 0
    while keys[i] is not None:
        out[keys[i].decode()] = glib.g_key_file_get_string(kf, b"property", keys[i], None).decode()
        i += 1
    return out


def _read_config(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",),
                                       inline_comment_prefixes=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # nvinfer keys are case-sensitive
    parser.read_string(path.read_text())
    assert parser.sections() == ["property"]
    props = dict(parser["property"])
    glib = _glib_keyfile(path)
    if glib is not None:
        assert glib == props
    return props


def test_export_deepstream_writes_an_exact_config_that_names_bundle_files(tmp_path, capsys):
    from cvt_deploy.cli import export as export_cli
    from cvt_deploy.deepstream import NETWORK_MODE

    out = tmp_path / "ds"
    assert export_cli.main(["--format", "deepstream", "--out", str(out), "--limit", "64", "-q"]) == 0
    props = _read_config(out / "nvinfer_config.txt")
    manifest = json.loads((out / "manifest.json").read_text())
    graph = manifest["artifacts"]["onnx-fp16"]
    assert (graph["input_format"], graph["output_kind"]) == ("float-pixels", "probs")
    for key in ("onnx-file", "labelfile-path"):
        assert (out / props[key]).is_file(), key
    assert props["onnx-file"] == graph["file"] and "model-engine-file" not in props  # no engine built here
    assert props["net-scale-factor"] == "1" and props["offsets"] == "0;0;0"
    assert props["network-mode"] == str(NETWORK_MODE["fp16"]) and props["network-type"] == "1"
    assert props["infer-dims"] == "3;64;64" and props["output-blob-names"] == "probs"
    labels = (out / props["labelfile-path"]).read_text().splitlines()
    assert len(labels) == 1 and labels[0].split(";") == [str(i) for i in range(10)]
    # The manifest lists the config (hashed) and its label file as the bundle's own.
    from cvt_deploy.bundle import Bundle

    art = Bundle.open(out).require("deepstream", "fp16")
    assert (art.file, art.info["labels"], art.info["exact"]) == ("nvinfer_config.txt", "labels.txt", True)
    Bundle.open(out).verified_path(art)


def test_deepstream_on_existing_bundles(tmp_path, demo_float, capsys):
    from cvt_deploy.cli import export as export_cli

    # uint8 graphs: nvinfer hands engines float data, so refused with the fix.
    u8 = raw_pixel_copy(demo_float, tmp_path / "u8", "uint8-nhwc", "probs")
    assert export_cli.main(["--format", "deepstream", "--bundle", str(u8)]) == 2
    err = capsys.readouterr().err
    assert "float data" in err and "--input-format float-pixels" in err
    assert not (u8 / "nvinfer_config.txt").exists()
    # Logits: the classifier parser thresholds probabilities.
    assert export_cli.main(["--format", "deepstream", "--bundle", str(demo_float), "--precision", "fp32"]) == 2
    assert "--output probs" in capsys.readouterr().err
    # Normalised float input: the averaged-std approximation, with its measured agreement.
    approx = raw_pixel_copy(demo_float, tmp_path / "approx", "float", "probs")
    assert export_cli.main(["--format", "deepstream", "--bundle", str(approx), "--precision", "fp32",
                            "--limit", "120", "--classifier-mode", "secondary", "--operate-on-gie-id", "3"]) == 0
    err = capsys.readouterr().err
    assert "averaged-std approximation" in err and "top-1 agreement with exact normalisation" in err
    props = _read_config(approx / "nvinfer_config.txt")
    assert abs(float(props["net-scale-factor"]) - 1 / (255 * np.mean([0.229, 0.224, 0.225]))) < 1e-8
    assert [round(float(v), 3) for v in props["offsets"].split(";")] == [123.675, 116.28, 103.53]
    assert (props["process-mode"], props["operate-on-gie-id"], props["onnx-file"]) == ("2", "3", "model.onnx")
    assert "APPROXIMATE" in (approx / "nvinfer_config.txt").read_text()
    from cvt_deploy.bundle import Bundle

    art = Bundle.open(approx).require("deepstream", "fp32")
    assert art.info["exact"] is False and 0 <= art.info["parity"]["top1_agreement"] <= 1


@pytest.mark.parametrize("flags,says", [(["--input-format", "uint8-nhwc"], "float data"),
                                        (["--output", "logits"], "probabilities")])
def test_export_deepstream_refuses_graphs_nvinfer_cannot_use_before_exporting(tmp_path, capsys, flags, says):
    from cvt_deploy.cli import export as export_cli

    out = tmp_path / "never"
    assert export_cli.main(["--format", "deepstream", *flags, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err and not out.exists()


def test_deepstream_keeps_a_users_files_and_rewrites_its_own(tmp_path, demo_float, capsys):
    from cvt_deploy.cli import export as export_cli

    root = raw_pixel_copy(demo_float, tmp_path / "ds", "float-pixels", "probs")
    (root / "labels.txt").write_text("mine\n")
    argv = ["--format", "deepstream", "--bundle", str(root), "--precision", "fp32"]
    assert export_cli.main(argv) == 2
    assert "not part of its bundle" in capsys.readouterr().err
    assert (root / "labels.txt").read_text() == "mine\n" and not (root / "nvinfer_config.txt").exists()
    (root / "labels.txt").unlink()
    assert export_cli.main(argv) == 0
    assert export_cli.main(argv) == 0  # now the bundle's own: rewritten
    assert "wrote" in capsys.readouterr().err


def test_deepstream_refuses_labels_it_cannot_write(demo_model):
    from dataclasses import replace

    from cvt_deploy.deepstream import labels_text

    cfg = replace(demo_model.cfg, labels=tuple(f"a;{i}" for i in range(10)))
    with pytest.raises(CvtDeployError, match="label 'a;0'"):
        labels_text(cfg)


def test_check_preprocess_deepstream_reports_accuracy_and_agreement(demo_bundle, capsys):
    from cvt_deploy.cli import check as check_cli

    assert check_cli.main(["--bundle", str(demo_bundle), "--preprocess", "deepstream", "--limit", "120", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["images"] == 120 and 0 <= report["top1_agreement"] <= 1
    assert report["accuracy_reference"] is not None and report["accuracy_candidate"] is not None
    assert "DeepStream resize" in report["candidate"]
    assert check_cli.main(["--bundle", str(demo_bundle), "--preprocess", "deepstream", "--limit", "60"]) == 0
    assert "top-1 agreement with the model's preprocessing" in capsys.readouterr().out


# -- DLA ----------------------------------------------------------------------------------

def test_dla_refuses_what_cannot_run_there():
    from cvt_deploy.trt.dla import check_dla_request
    from cvt_deploy.trt.loader import BuildOptions
    from cvt_deploy.util import BatchRange

    fixed = BatchRange(1, 1, 1)
    check_dla_request(0, "fp16", fixed)  # the one allowed combination
    with pytest.raises(CvtDeployError, match="explicit quantization") as e:
        check_dla_request(0, "int8", fixed)
    assert "--precision fp16" in (e.value.hint or "")
    with pytest.raises(CvtDeployError, match="fp16 and int8 only"):
        check_dla_request(1, "fp32", fixed)
    with pytest.raises(CvtDeployError, match="static shapes"):
        check_dla_request(0, "fp16", BatchRange(1, 8, 32))
    with pytest.raises(CvtDeployError, match="not a core index"):
        BuildOptions(dla_core=-1)


def test_export_cli_refuses_int8_dla_before_any_work(tmp_path, capsys):
    from cvt_deploy.cli import export as export_cli

    out = tmp_path / "never"
    assert export_cli.main(["--format", "trt", "--precision", "int8", "--dla-core", "0", "--batch-range", "1",
                            "--out", str(out)]) == 2
    assert "Q/DQ" in capsys.readouterr().err and not out.exists()


def test_dla_engine_build_where_tensorrt_exists(tmp_path, static_bundle):
    from cvt_deploy.trt.util import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"TensorRT is not usable here: {reason}")
    import tensorrt as trt

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.trt.loader import BuildOptions, build_engine

    bundle_dir = tmp_path / "b"
    shutil.copytree(static_bundle, bundle_dir)
    bundle = Bundle.open(bundle_dir)
    cores = trt.Builder(trt.Logger()).num_DLA_cores
    if cores == 0:
        with pytest.raises(CvtDeployError, match="no DLA"):
            build_engine(bundle, "fp16", BuildOptions(dla_core=0), progress=False)
    else:
        art = build_engine(bundle, "fp16", BuildOptions(dla_core=0), progress=False)
        assert art.info["dla_core"] == 0 and "GPU_FALLBACK" in art.info["builder_flags"]
