"""Precision stage: fp16 and int8 (Q/DQ) graphs and their calibration data.

Structure (what TensorRT will be told), that the graphs run in ONNX Runtime at several
batch sizes, accuracy on the demo model's real held-out digits, the calibration cache, and
every calibration source with its errors. CvT-13 tests are marked slow.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from cvt_deploy.calibration import DEFAULT_CALIB_COUNT, load_calibration  # noqa: E402
from cvt_deploy.config import CvtConfig, get_config  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.onnx import ort_session, read_metadata  # noqa: E402
from cvt_deploy.export.fp16 import DEFAULT_FP32_OPS, convert_fp16  # noqa: E402
from cvt_deploy.export.int8 import DEFAULT_METHOD, QUANTIZED_OPS, quantize_int8  # noqa: E402
from cvt_deploy.preprocess import preprocess  # noqa: E402

BATCHES = (1, 3, 8)


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_graph(demo_bundle: Path) -> Path:
    """The demo bundle's fp32 graph (exported and simplified by the pipeline); read only."""
    return demo_bundle / "model.onnx"


@pytest.fixture(scope="module")
def demo_cfg(demo_model: Any) -> CvtConfig:
    return demo_model.cfg


@pytest.fixture(scope="module")
def calib(demo_cfg: CvtConfig) -> np.ndarray:
    batch, _ = load_calibration(None, demo_cfg, progress=False)
    return batch


@pytest.fixture(scope="module")
def fp16_graph(fp32_graph: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    dst = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    return dst, convert_fp16(fp32_graph, dst)


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calib-cache")


@pytest.fixture(scope="module")
def int8_graph(fp32_graph: Path, calib: np.ndarray, int8_cache: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    dst = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return dst, quantize_int8(fp32_graph, dst, calib, cache=int8_cache, progress=False)


@pytest.fixture(scope="module")
def test_batch(demo_test_split: Any, demo_cfg: CvtConfig) -> tuple[np.ndarray, np.ndarray]:
    return preprocess(list(demo_test_split.images), demo_cfg.preprocess), demo_test_split.labels


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path, threads=2)
    return np.concatenate([sess.run(None, {"pixel_values": x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def producers(model: Any) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def elem_types(model: Any) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


# --- fp16 -----------------------------------------------------------------------------------

def test_fp16_keeps_layernorm_and_softmax_fp32(fp16_graph: tuple[Path, dict[str, Any]]) -> None:
    path, _ = fp16_graph
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    types = elem_types(model)
    kept = [n for n in model.graph.node if n.op_type in DEFAULT_FP32_OPS]
    assert Counter(n.op_type for n in kept) == {"LayerNormalization": 16, "Softmax": 6}
    for node in kept:
        for name in [*node.input, *node.output]:
            if name:
                assert types[name] == TensorProto.FLOAT, f"{node.op_type} {node.name}: {name} is not fp32"
    # ... and the rest really is fp16: weights of every Conv/MatMul/Gemm and their outputs.
    init = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            assert types[node.output[0]] == TensorProto.FLOAT16, node.name
            for name in node.input[1:]:
                if name in init:
                    assert init[name].data_type == TensorProto.FLOAT16, f"{node.name}: weight {name} is not fp16"


def test_fp16_io_is_fp32_with_casts_at_the_boundary(fp16_graph: tuple[Path, dict[str, Any]]) -> None:
    path, info = fp16_graph
    model = onnx.load(str(path))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    first = consumers(model)[model.graph.input[0].name]
    assert {n.op_type for n in first} == {"Cast"} and all(a.i == TensorProto.FLOAT16 for n in first for a in n.attribute)
    assert producers(model)[model.graph.output[0].name].op_type == "Cast"
    assert info["precision"] == "fp16" and info["io"] == "fp32"
    assert info["fp32_ops"] == list(DEFAULT_FP32_OPS)
    assert info["fp32_ops_present"] == {"LayerNormalization": 16, "Softmax": 6}
    assert info["nodes_fp16"] > info["nodes_fp32"] > 0 and info["nodes_cast"] > 0
    assert read_metadata(path)["precision"] == "fp16"
    json.dumps(info)  # goes into the manifest


def test_fp16_io_can_be_fp16(fp32_graph: Path, tmp_path: Path) -> None:
    info = convert_fp16(fp32_graph, tmp_path / "io16.onnx", keep_io_fp32=False, keep_fp32_ops=("LayerNormalization",))
    model = onnx.load(str(tmp_path / "io16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert info["io"] == "fp16" and info["fp32_ops_present"] == {"LayerNormalization": 16}
    types = elem_types(model)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "Softmax")


def test_fp16_agrees_with_fp32_on_held_out_digits(fp32_graph: Path, fp16_graph: tuple[Path, dict[str, Any]],
                                                  test_batch: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = test_batch
    ref, out = logits(fp32_graph, x), logits(fp16_graph[0], x)
    agreement = float((ref.argmax(1) == out.argmax(1)).mean())
    assert agreement >= 0.995, f"fp16 top-1 agreement {agreement:.2%}"
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cos.min() > 0.999


def test_fp16_refuses_non_fp32_sources(fp16_graph: tuple[Path, dict[str, Any]], int8_graph: tuple[Path, dict[str, Any]],
                                       tmp_path: Path) -> None:
    for src in (fp16_graph[0], int8_graph[0]):
        with pytest.raises(CvtDeployError, match="fp32 graph"):
            convert_fp16(src, tmp_path / "again.onnx")
    with pytest.raises(CvtDeployError, match="does not exist"):
        convert_fp16(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(CvtDeployError, match="not a readable ONNX"):
        convert_fp16(tmp_path / "junk.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "x.onnx").exists()


# --- int8 -----------------------------------------------------------------------------------

def test_int8_qdq_only_on_conv_matmul_gemm_inputs(int8_graph: tuple[Path, dict[str, Any]]) -> None:
    path, _ = int8_graph
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    cons, prod = consumers(model), producers(model)
    init = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            users = {c.op_type for c in cons.get(node.output[0], [])}
            assert users and users <= set(QUANTIZED_OPS), f"{node.name} feeds {users}"
            src = node.input[0]
            assert src in init or prod[src].op_type == "QuantizeLinear", f"{node.name} dequantizes {src}"
        if node.op_type == "QuantizeLinear":
            assert {c.op_type for c in cons[node.output[0]]} == {"DequantizeLinear"}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Add", "Sigmoid", "Mul"):
            for name in node.input:
                p = prod.get(name)
                assert p is None or p.op_type not in ("QuantizeLinear", "DequantizeLinear"), node.name
    # Every Conv/Gemm and every MatMul with a weight is quantized on data and weight inputs;
    # activation-activation MatMuls (q @ k^T, attn @ v) are not, by default.
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            weighted = node.op_type != "MatMul" or any(
                prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" and prod[i].input[0] in init
                for i in node.input)
            dq = [prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in node.input[:2]]
            assert dq == ([True, True] if weighted else [False, False]), f"{node.op_type} {node.name}: {dq}"


def test_int8_symmetric_zero_points_and_per_channel_weights(int8_graph: tuple[Path, dict[str, Any]]) -> None:
    path, _ = int8_graph
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    cons = consumers(model)
    weights = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        assert len(node.input) == 3, f"{node.name} has no explicit zero point"
        zp = init[node.input[2]]
        assert zp.data_type == TensorProto.INT8, f"{node.name}: zero point is {TensorProto.DataType.Name(zp.data_type)}"
        assert not numpy_helper.to_array(zp).any(), f"{node.name}: zero point is not 0"
        if node.op_type == "DequantizeLinear" and node.input[0] in init:
            weights += 1
            w = init[node.input[0]]
            assert w.data_type == TensorProto.INT8
            user = cons[node.output[0]][0]
            axis = {a.name: a.i for a in node.attribute}.get("axis")
            trans_b = {a.name: a.i for a in user.attribute}.get("transB", 0)
            expected_axis = 0 if user.op_type == "Conv" or (user.op_type == "Gemm" and trans_b) else 1
            assert axis == expected_axis, f"{node.name}: axis {axis} for a {user.op_type} weight"
            scale = numpy_helper.to_array(init[node.input[1]])
            assert scale.shape == (w.dims[axis],), f"{node.name}: {scale.shape} scales for {tuple(w.dims)}"
            assert (scale > 0).all()
    assert weights == 21 + 36 + 1  # every Conv, Linear (MatMul) and the head (Gemm)


def test_int8_info_and_metadata(int8_graph: tuple[Path, dict[str, Any]], calib: np.ndarray) -> None:
    path, info = int8_graph
    assert info["precision"] == "int8" and info["method"] == DEFAULT_METHOD
    assert info["samples"] == len(calib) == DEFAULT_CALIB_COUNT and info["per_channel"] is True
    assert info["quantized_ops"] == list(QUANTIZED_OPS) and info["attention_matmuls"] is False
    assert info["quantized_nodes"] == {"Conv": 21, "Gemm": 1, "MatMul": 36}
    assert info["cache"] == "miss"
    json.dumps(info)
    meta = read_metadata(path)
    assert meta["precision"] == "int8" and json.loads(meta["conversion"])["method"] == DEFAULT_METHOD


@pytest.mark.parametrize("which", ["fp16", "int8"])
def test_graphs_run_in_onnxruntime_at_several_batches(which: str, fp16_graph: tuple[Path, dict[str, Any]],
                                                      int8_graph: tuple[Path, dict[str, Any]]) -> None:
    path = (fp16_graph if which == "fp16" else int8_graph)[0]
    sess = ort_session(path)
    for n in BATCHES:
        out = sess.run(None, {"pixel_values": np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32)})[0]
        assert out.shape == (n, 10) and out.dtype == np.float32 and np.isfinite(out).all()


def test_int8_accuracy_on_held_out_digits(fp32_graph: Path, int8_graph: tuple[Path, dict[str, Any]],
                                          test_batch: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = test_batch
    ref, out = logits(fp32_graph, x), logits(int8_graph[0], x)
    acc32, acc8 = float((ref.argmax(1) == labels).mean()), float((out.argmax(1) == labels).mean())
    assert acc32 > 0.98, "the demo model itself is broken"
    assert acc8 >= acc32 - 0.01, f"int8 accuracy {acc8:.2%} vs fp32 {acc32:.2%}"
    cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cos.min() > 0.98


def test_calibration_cache_hit_skips_calibration(fp32_graph: Path, calib: np.ndarray, int8_cache: Path,
                                                 int8_graph: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import onnxruntime.quantization  # noqa: F401

    import cvt_deploy.export.int8 as int8_module

    ort_quantize = sys.modules["onnxruntime.quantization.quantize"]  # the package exports a function of that name
    assert len(list(int8_cache.glob("*.json"))) == 1
    calls: list[Any] = []  # either calibrator: ours (percentile, minmax) or ONNX Runtime's (entropy)
    for module, name in ((ort_quantize, "create_calibrator"), (int8_module, "calibrate")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    info = quantize_int8(fp32_graph, tmp_path / "again.onnx", calib, cache=int8_cache, progress=False)
    assert info["cache"] == "hit" and not calls, "a cache hit must not calibrate"
    assert (tmp_path / "again.onnx").read_bytes() == int8_graph[0].read_bytes()
    # Other data or another method is another key: it calibrates and adds a second entry.
    info = quantize_int8(fp32_graph, tmp_path / "other.onnx", calib[:64], cache=int8_cache, progress=False)
    assert info["cache"] == "miss" and calls and len(list(int8_cache.glob("*.json"))) == 2


def test_calibration_cache_file_damaged_or_stale_is_recomputed(fp32_graph: Path, calib: np.ndarray,
                                                               tmp_path: Path) -> None:
    # A damaged file of ours inside the cache folder is said and recomputed ...
    folder = tmp_path / "cache"
    info = quantize_int8(fp32_graph, tmp_path / "f.onnx", calib[:32], method="minmax", cache=folder, progress=False)
    (entry,) = folder.iterdir()
    entry.write_text("{ not json")
    assert quantize_int8(fp32_graph, tmp_path / "g.onnx", calib[:32], method="minmax", cache=folder,
                         progress=False)["cache"] == "miss"
    assert json.loads(entry.read_text())["method"] == "minmax"
    # ... but a single FILE.json that is not one of our caches may be the user's: never overwritten.
    cache = tmp_path / "ranges.json"
    cache.write_text("{ not json")
    with pytest.raises(CvtDeployError, match="not a cvt-deploy calibration cache"):
        quantize_int8(fp32_graph, tmp_path / "a.onnx", calib[:32], method="minmax", cache=cache, progress=False)
    assert cache.read_text() == "{ not json"
    cache.unlink()
    info = quantize_int8(fp32_graph, tmp_path / "a.onnx", calib[:32], method="minmax", cache=cache, progress=False)
    assert info["cache"] == "miss" and json.loads(cache.read_text())["method"] == "minmax"
    assert quantize_int8(fp32_graph, tmp_path / "b.onnx", calib[:32], method="minmax", cache=cache,
                         progress=False)["cache"] == "hit"
    # A single-file cache holds one key: another method replaces it.
    assert quantize_int8(fp32_graph, tmp_path / "c.onnx", calib[:32], method="entropy", cache=cache,
                         progress=False)["cache"] == "miss"
    assert json.loads(cache.read_text())["method"] == "entropy"


def test_attention_matmuls_can_be_quantized(fp32_graph: Path, calib: np.ndarray, tmp_path: Path) -> None:
    info = quantize_int8(fp32_graph, tmp_path / "attn.onnx", calib[:32], attention_matmuls=True, progress=False)
    assert info["quantized_nodes"] == {"Conv": 21, "Gemm": 1, "MatMul": 48}
    model = onnx.load(str(tmp_path / "attn.onnx"))
    prod = producers(model)
    for node in model.graph.node:
        if node.op_type == "MatMul":
            assert all(prod[i].op_type == "DequantizeLinear" for i in node.input), node.name


def test_quantize_int8_refuses_bad_arguments(fp32_graph: Path, calib: np.ndarray, int8_graph: tuple[Path, dict[str, Any]],
                                             tmp_path: Path) -> None:
    dst = tmp_path / "x.onnx"
    with pytest.raises(CvtDeployError, match="unknown calibration method 'kl'"):
        quantize_int8(fp32_graph, dst, calib, method="kl")
    with pytest.raises(CvtDeployError, match=r"shape \(4, 3, 32, 32\)"):
        quantize_int8(fp32_graph, dst, np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(CvtDeployError, match="dtype float64"):
        quantize_int8(fp32_graph, dst, calib[:4].astype(np.float64))
    with pytest.raises(CvtDeployError, match="already quantized"):
        quantize_int8(int8_graph[0], dst, calib[:4])
    assert not dst.exists()


def test_fixed_batch_graph(static_bundle: Path, calib: np.ndarray, tmp_path: Path) -> None:
    """A graph exported with a fixed batch of 4: calibration pads 10 images to full batches."""
    src = static_bundle / "model.onnx"
    info = quantize_int8(src, tmp_path / "int8.onnx", calib[:10], progress=False)
    assert info["samples"] == 10
    convert_fp16(src, tmp_path / "fp16.onnx")
    for name in ("int8.onnx", "fp16.onnx"):
        out = ort_session(tmp_path / name).run(None, {"pixel_values": calib[:4]})[0]
        assert out.shape == (4, 10)


# --- CvT-13 ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cvt13_fp16_and_int8(cvt13_export: Any, tmp_path: Path) -> None:
    cfg = cvt13_export.model.cfg
    batch, description = load_calibration(None, cfg, 16, progress=False)
    assert "not from this cvt-13" in description
    q = quantize_int8(cvt13_export.path, tmp_path / "int8.onnx", batch, progress=False)
    assert q["quantized_nodes"] == {"Conv": 42, "Gemm": 1, "MatMul": 78}
    h = convert_fp16(cvt13_export.path, tmp_path / "fp16.onnx")
    assert h["fp32_ops_present"] == {"LayerNormalization": 30, "Softmax": 13}
    x = batch[:8]
    ref = logits(cvt13_export.path, x)
    for name, min_cos in (("fp16.onnx", 0.999), ("int8.onnx", 0.98)):
        sess = ort_session(tmp_path / name)
        for n in BATCHES:
            assert sess.run(None, {"pixel_values": x[:n]})[0].shape == (n, 1000)
        out = logits(tmp_path / name, x)
        cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
        assert cos.min() > min_cos, f"{name}: cosine {cos.min():.5f}"


# --- calibration sources --------------------------------------------------------------------

@pytest.fixture
def digits(demo_test_split: Any) -> np.ndarray:
    return demo_test_split.images[:12]


def test_calibration_from_folder(digits: np.ndarray, demo_cfg: CvtConfig, tmp_path: Path) -> None:
    from PIL import Image

    files = []
    for i, im in enumerate(digits):
        sub = tmp_path / "imgs" / f"class_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        files.append(sub / f"{i:02d}.png")
        Image.fromarray(im).save(files[-1])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    batch, description = load_calibration(tmp_path / "imgs", demo_cfg, progress=False)
    assert batch.shape == (12, 3, 64, 64) and batch.dtype == np.float32
    assert description == f"12 images from folder {tmp_path / 'imgs'}"
    np.testing.assert_array_equal(batch, preprocess(sorted(files), demo_cfg.preprocess))
    # A subset is spread over the sorted files (so over the class folders), not the first N.
    batch, description = load_calibration(tmp_path / "imgs", demo_cfg, 3, progress=False)
    np.testing.assert_array_equal(batch, preprocess([sorted(files)[i] for i in (0, 6, 11)], demo_cfg.preprocess))
    assert description.startswith("3 of 12 images")


def test_calibration_from_npy_layouts(digits: np.ndarray, demo_cfg: CvtConfig, tmp_path: Path) -> None:
    expected = preprocess(list(digits), demo_cfg.preprocess)
    np.save(tmp_path / "nhw.npy", digits)
    np.save(tmp_path / "nhwc.npy", np.repeat(digits[..., None], 3, axis=3))
    np.save(tmp_path / "nchw.npy", expected)
    for name in ("nhw.npy", "nhwc.npy", "nchw.npy"):
        batch, description = load_calibration(tmp_path / name, demo_cfg, progress=False)
        assert batch.dtype == np.float32 and str(tmp_path / name) in description
        np.testing.assert_allclose(batch, expected, atol=1e-6, err_msg=name)
    batch, _ = load_calibration(tmp_path / "nchw.npy", demo_cfg, 4, progress=False)
    assert batch.shape == (4, 3, 64, 64)


def test_calibration_default_is_the_demo_split(demo_cfg: CvtConfig) -> None:
    from cvt_deploy.demo import demo_split

    batch, description = load_calibration(None, demo_cfg, progress=False)
    assert DEFAULT_CALIB_COUNT == 256 and batch.shape == (256, 3, 64, 64)
    assert description == "demo calibration split: 256 handwritten-digit images"
    np.testing.assert_array_equal(batch[:5], preprocess(list(demo_split("calib").images[:5]), demo_cfg.preprocess))
    other = get_config("cvt-tiny", num_classes=5)
    batch, description = load_calibration(None, other, 8, progress=False)
    assert batch.shape == (8, 3, 64, 64) and "not from this cvt-tiny model's domain" in description


def test_calibration_source_errors(demo_cfg: CvtConfig, digits: np.ndarray, tmp_path: Path) -> None:
    def fails(source: Any, match: str, count: int = 8) -> None:
        with pytest.raises(CvtDeployError, match=match) as info:
            load_calibration(source, demo_cfg, count, progress=False)
        assert info.value.hint

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no images")
    fails(tmp_path / "nowhere", "does not exist")
    (tmp_path / "notes.txt").write_text("x")
    fails(tmp_path / "notes.txt", "neither a folder nor a .npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    fails(tmp_path / "junk.npy", "cannot read")
    np.save(tmp_path / "small.npy", np.zeros((4, 3, 32, 32), np.float32))
    fails(tmp_path / "small.npy", r"shape \(4, 3, 32, 32\).*\(N, 3, 64, 64\)")
    np.save(tmp_path / "nchw_u8.npy", np.zeros((4, 3, 8, 8), np.uint8))
    fails(tmp_path / "nchw_u8.npy", "looks like NCHW")
    np.save(tmp_path / "ints.npy", digits.astype(np.int64))
    fails(tmp_path / "ints.npy", "int64")
    np.save(tmp_path / "nan.npy", np.full((2, 3, 64, 64), np.nan, np.float32))
    fails(tmp_path / "nan.npy", "NaN")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    fails(tmp_path / "bad", "broken.png")
    fails(None, "not a positive whole number", count=0)
