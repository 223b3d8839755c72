"""TensorRT readiness without TensorRT: the portable graphs each Jetson's parser imports, and the
static check (trt/readiness.py) that proves it, caught violations included.

Nothing here runs TensorRT: the check reads graphs against onnx-tensorrt's documented
operator table and importer facts per release. Real graphs come from real exports; the
planted violations are small hand-made graphs, each breaking one rule.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conftest import export_to, raw_pixel_copy  # noqa: E402
from cvt_deploy.bundle_write import changing  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.portable import (decompose_layernorm, flatten_weight_matmuls, make_portable,  # noqa: E402
                                        split_shape_ranges)
from cvt_deploy.trt.readiness import check_readiness, parser_table, release_of, require_ready  # noqa: E402
from cvt_deploy.trt.util import TENSORRT_RTX, tensorrt_unavailable_reason  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402

VERSIONS = ("8.5", "8.6", "10")


@pytest.fixture(scope="module")
def default_bundle(demo_full_bundle: Path) -> Path:
    """Every precision, default target (TensorRT 8.6 and newer), parity gates on."""
    return demo_full_bundle


@pytest.fixture(scope="module")
def jetpack5_bundle(tmp_path_factory: pytest.TempPathFactory, demo_model: Any) -> Path:
    """Every precision written for TensorRT 8.5 (decomposed LayerNorm), parity gates on."""
    return export_to(tmp_path_factory, demo_model, "ready-85", precisions=("fp32", "fp16", "int8"), calib_count=64,
                     check_limit=128, ort_cpu=False, tensorrt="8.5")


def _graphs(bundle: Path) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {k: v for k, v in manifest["artifacts"].items() if v["kind"] == "onnx" and v.get("target", "portable") == "portable"}


def _assert_ready(bundle: Path, versions: tuple[str, ...]) -> None:
    graphs = _graphs(bundle)
    assert {a["precision"] for a in graphs.values()} == {"fp32", "fp16", "int8"}
    for art in graphs.values():
        assert art["tensorrt_ready"] == list(versions), art["file"]
        for version in versions:
            report = check_readiness(bundle / art["file"], version)
            assert report, str(report)


def test_default_graphs_parse_on_8_6_and_10_not_8_5(default_bundle: Path) -> None:
    _assert_ready(default_bundle, ("8.6", "10"))
    for art in _graphs(default_bundle).values():
        model = onnx.load(str(default_bundle / art["file"]))
        assert not [n for n in model.graph.node if n.op_type == "Shape" and n.attribute], "Shape start/end left"
        report = check_readiness(model, "8.5")
        assert report.errors and {f.op for f in report.errors} == {"LayerNormalization"}
        assert all(f.rule == "op" and "release/8.5-GA" in f.source for f in report.errors)
    parity = {a["precision"]: a["parity"]["passed"] for a in _graphs(default_bundle).values()}
    assert parity == {"fp32": True, "fp16": True, "int8": True}


def test_jetpack5_graphs_parse_on_every_release_and_hold_the_gates(jetpack5_bundle: Path) -> None:
    _assert_ready(jetpack5_bundle, VERSIONS)
    graphs = _graphs(jetpack5_bundle)
    for art in graphs.values():
        assert art["layernorm"] == "decomposed" and art["tensorrt"] == list(VERSIONS)
        ops = {n.op_type for n in onnx.load(str(jetpack5_bundle / art["file"])).graph.node}
        assert "LayerNormalization" not in ops and "ReduceMean" in ops
        assert art["parity"]["passed"], art["parity"]
    # The fp16 stage keeps exactly the decomposed LayerNorm nodes in fp32; they are named for the 8.5 build too.
    fp32_nodes = graphs["onnx-fp32"]["fp32_nodes"]
    assert fp32_nodes and graphs["onnx-fp16"]["fp32_nodes"] == fp32_nodes == graphs["onnx-int8"]["fp32_nodes"]
    fp16 = onnx.load(str(jetpack5_bundle / graphs["onnx-fp16"]["file"]))
    inferred = onnx.shape_inference.infer_shapes(fp16)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    kept = [n for n in fp16.graph.node if n.name in set(fp32_nodes)]
    assert len(kept) == len(fp32_nodes)
    assert all(types.get(n.output[0]) == TensorProto.FLOAT for n in kept if n.output[0] in types)


@pytest.mark.parametrize("input_format,output", [("uint8-nhwc", "probs"), ("float-pixels", "logits")])
def test_raw_pixel_graphs_parse_everywhere(jetpack5_bundle: Path, tmp_path: Path, input_format: str, output: str) -> None:
    from cvt_deploy.bundle import Bundle

    bundle = raw_pixel_copy(jetpack5_bundle, tmp_path / "raw", input_format, output)
    require_ready(Bundle.open(bundle))  # what the export runs after the raw-pixel stage
    _assert_ready(bundle, VERSIONS)


def test_int8_weight_matmuls_are_2d_gemms_with_per_channel_scales(default_bundle: Path) -> None:
    model = onnx.load(str(default_bundle / "model.int8.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    per_channel = 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = producer.get(node.input[1])
        if weight is None or weight.op_type != "DequantizeLinear" or scales[weight.input[1]].size == 1:
            continue
        per_channel += 1
        assert ranks[node.input[0]] == 2, node.name
    assert per_channel >= 20  # every token MatMul of the demo model (q/k/v, proj, MLP)
    info = _graphs(default_bundle)["onnx-int8"]
    assert info["matmuls_2d"] == per_channel


def test_int8_fp16_graph_for_tensorrt_10(default_bundle: Path, jetpack5_bundle: Path) -> None:
    manifest = json.loads((default_bundle / "manifest.json").read_text())["artifacts"]
    art = manifest["onnx-int8-tensorrt-10"]
    assert art["target"] == "tensorrt-10" and art["tensorrt"] == art["tensorrt_ready"] == ["10"]
    assert art["parity"]["passed"] and art["fp16_scales"] > 0
    model = onnx.load(str(default_bundle / art["file"]))
    assert model.opset_import[0].version == 19
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    producer = {o: n for n in model.graph.node for o in n.output}
    fed = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Conv", "Gemm"):  # the int8 GEMMs take fp16 straight from their DQ
            dq = [producer[i] for i in node.input if i in producer and producer[i].op_type == "DequantizeLinear"]
            fed += bool(dq)
            assert all(types[d.output[0]] == TensorProto.FLOAT16 for d in dq), node.name
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    assert fed >= 20
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert check_readiness(model, "10")
    # Written for 8.5, it keeps the decomposed LayerNorm in fp32 too.
    art85 = json.loads((jetpack5_bundle / "manifest.json").read_text())["artifacts"]["onnx-int8-tensorrt-10"]
    assert art85["fp32_nodes"] and art85["parity"]["passed"]


# ----------------------------------------------------------------------------------------
# The rewrites: model in, model out, same numbers.


def _run(model: Any, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_rewrites_keep_the_numbers(demo_bundle: Path) -> None:
    original = onnx.load(str(demo_bundle / "model.onnx"))
    x = np.random.default_rng(0).standard_normal((3, *[d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim[1:]])).astype(np.float32)
    ref = _run(original, x)
    model = onnx.load(str(demo_bundle / "model.onnx"))
    # The session bundle is already portable: plant the exporter's Shape(start, end) back to test the split.
    shape = next(n for n in model.graph.node if n.op_type == "Shape")
    slice_node = next(n for n in model.graph.node if shape.output[0] in n.input and n.op_type == "Slice")
    planted = helper.make_node("Shape", [shape.input[0]], list(slice_node.output), name="planted", start=0, end=1)
    nodes = [planted if n is slice_node else n for n in model.graph.node if n is not shape]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    assert not check_readiness(model, "8.6")
    assert split_shape_ranges(model) == 1 and check_readiness(model, "8.6")
    np.testing.assert_array_equal(_run(model, x), ref)
    kept = decompose_layernorm(model)
    assert len(kept) == 9 * sum(1 for n in original.graph.node if n.op_type == "LayerNormalization")
    np.testing.assert_allclose(_run(model, x), ref, atol=2e-5)
    assert flatten_weight_matmuls(model) >= 20
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, x), ref, atol=2e-5)
    assert check_readiness(model, "8.5")


def test_portable_graphs_carry_kernel_shape_on_every_conv() -> None:
    # Without kernel_shape, the 8.5-10.3 importers cannot import a Conv whose weights come through
    # a DequantizeLinear; make_portable writes it for the int8 stage to inherit.
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    model = _graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [_tensor("x", ["batch", 4, 8, 8])], _tensor("y", ["batch", 8, 8, 8]), [w])
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = _run(model, x)
    info = make_portable(model, "8.6")
    kernel = [helper.get_attribute_value(a) for a in model.graph.node[0].attribute if a.name == "kernel_shape"]
    assert kernel == [[3, 3]]
    assert info["kernel_shapes"] == 1
    np.testing.assert_array_equal(_run(model, x), ref)
    qdq = _qdq_weight_graph("Conv", (8, 4, 3, 3), axis=0, scales=8, kernel_shape=False)
    assert not check_readiness(qdq, "10")
    assert make_portable(qdq, "10")["kernel_shapes"] == 1 and check_readiness(qdq, "10")


def test_every_exported_graph_has_kernel_shape_on_every_conv(default_bundle: Path, jetpack5_bundle: Path) -> None:
    for bundle in (default_bundle, jetpack5_bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())["artifacts"]
        files = sorted(a["file"] for a in manifest.values() if a["kind"] == "onnx")
        assert {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8-fp16.onnx"} <= set(files)
        for file in files:
            model = onnx.load(str(bundle / file))
            dims = {i.name: list(i.dims) for i in model.graph.initializer}
            producer = {o: n for n in model.graph.node for o in n.output}
            convs = [n for n in model.graph.node if n.op_type == "Conv"]
            assert convs, file
            for conv in convs:
                weight = conv.input[1]
                while weight not in dims:  # through the DequantizeLinear / Cast in front of int8 and fp16 weights
                    weight = producer[weight].input[0]
                kernel = [helper.get_attribute_value(a) for a in conv.attribute if a.name == "kernel_shape"]
                assert kernel == [dims[weight][2:]], f"{file}: {conv.name}"


def test_tensorrt_target_values() -> None:
    from cvt_deploy.export.pipeline import ExportOptions

    assert ExportOptions(tensorrt="10.3").tensorrt == "10"
    if ExportOptions(tensorrt="10", opset=18).opset == 18:  # where this exporter writes opset 18
        with pytest.raises(CvtDeployError, match=r"--opset 18 is newer than TensorRT 8\.6 parses"):
            ExportOptions(opset=18)
    with pytest.raises(CvtDeployError, match=r"--tensorrt '9' .*valid: 8\.5, 8\.6, 10"):
        ExportOptions(tensorrt="9")
    with pytest.raises(CvtDeployError, match="JetPack 5.1"):
        make_portable(onnx.ModelProto(), "7.1")
    assert (release_of("8.5.2.2"), release_of("8.6.1"), release_of("10.3.0.30"), release_of("8.4.3")) == \
        ("8.5", "8.6", "10", None)


# ----------------------------------------------------------------------------------------
# Planted violations: each caught, naming the node, the rule and its source.


def _graph(nodes: list[Any], inputs: list[Any], output: Any, inits: list[Any] = (), opset: int = 17) -> Any:  # type: ignore[assignment]
    g = helper.make_graph(nodes, "planted", inputs, [output], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _tensor(name: str, shape: list[Any], dtype: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, dtype, shape)


def _only(model: Any, version: str, rule: str) -> Any:
    report = check_readiness(model, version)
    errors = [f for f in report.errors if f.rule == rule]
    assert errors, str(report)
    assert not [f for f in report.errors if f.rule != rule], str(report)
    return errors[0]


#: Every planted violation below, by name: a factory of its graph. test_rtx.py feeds each to
#: NVIDIA's real parser and builder (TensorRT-RTX) and records the verdict beside the static one.
PLANTED: dict[str, Callable[[], Any]] = {}


def planted(factory: Callable[[], Any]) -> Callable[[], Any]:
    PLANTED[factory.__name__] = factory
    return factory


def _qdq_matmul(zero_point: int = 0, per_channel: bool = True, rank: int = 3, zp_type: Any = np.int8) -> Any:
    k, m = 8, 4
    x_shape = ["batch", 5, k] if rank == 3 else ["batch", k]
    w = numpy_helper.from_array(np.ones((k, m), np.int8), "w")
    ws = numpy_helper.from_array(np.full(m if per_channel else (), 0.1, np.float32), "w_scale")
    wz = numpy_helper.from_array(np.zeros(m if per_channel else (), np.int8), "w_zp")
    xs = numpy_helper.from_array(np.array(0.05, np.float32), "x_scale")
    xz = numpy_helper.from_array(np.array(zero_point, zp_type), "x_zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="token_matmul")]
    return _graph(nodes, [_tensor("x", x_shape)], _tensor("y", [*x_shape[:-1], m]), [w, ws, wz, xs, xz])


@planted
def shape_start_end() -> Any:
    return _graph([helper.make_node("Shape", ["x"], ["s"], name="batch_of", start=0, end=1)],
                  [_tensor("x", ["batch", 3, 8, 8])], _tensor("s", [1], TensorProto.INT64))


@planted
def layernorm_node() -> Any:
    ln = helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="norm", axis=-1)
    return _graph([ln], [_tensor("x", ["batch", 4])], _tensor("y", ["batch", 4]),
                  [numpy_helper.from_array(np.ones(4, np.float32), "g")])


@planted
def custom_domain_op() -> Any:
    custom = helper.make_node("MultiHeadAttention", ["x"], ["y"], name="mha", domain="com.microsoft")
    model = _graph([custom], [_tensor("x", ["batch", 4])], _tensor("y", ["batch", 4]))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_planted_shape_start_end() -> None:
    model = shape_start_end()
    for version in ("8.5", "8.6"):
        f = _only(model, version, "attribute")
        assert f.node == "node 'batch_of'" and f.op == "Shape" and "start=0, end=1" in f.message
        assert f"release/{version}-GA" in f.source
    assert check_readiness(model, "10")


def test_planted_unsupported_ops() -> None:
    model = layernorm_node()
    f = _only(model, "8.5", "op")
    assert f.node == "node 'norm'" and "no importer in TensorRT 8.5" in f.message and "operators.md" in f.source
    assert check_readiness(model, "8.6") and check_readiness(model, "10")
    model = custom_domain_op()
    for version in VERSIONS:
        assert "plugin" in _only(model, version, "op").message
    absent = sorted(set().union(*(parser_table()["ops"][v] for v in VERSIONS)) - set(parser_table()["ops"]["8.5"]))
    assert absent, "the 8.5 table lacks ops that later releases import"


@planted
def zero_point_3() -> Any:
    return _qdq_matmul(zero_point=3, rank=2)


@planted
def reduce_axes_input() -> Any:
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    reduce = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)
    return _graph([reduce], [_tensor("x", ["batch", 4])], _tensor("y", ["batch", 1]), [axes], opset=18)


@planted
def constant_ints() -> Any:
    const = helper.make_node("Constant", [], ["c"], name="ints", value_ints=[1, 2])
    return _graph([const, helper.make_node("Identity", ["c"], ["y"], name="id")], [], _tensor("y", [2], TensorProto.INT64))


@planted
def qdq_without_zero_point_or_axis() -> Any:
    model = _qdq_matmul(rank=2)
    for node in model.graph.node:
        if node.name == "w_dq":
            del node.attribute[:]  # per-channel scales, axis left to the default
        if node.name == "x_dq":
            del node.input[2]
    return model


@planted
def uint8_quantization() -> Any:
    return _qdq_matmul(zero_point=0, rank=2, zp_type=np.uint8)


@planted
def per_channel_on_3d_matmul() -> Any:
    return _qdq_matmul(rank=3)


def test_planted_zero_point_3() -> None:
    f = _only(zero_point_3(), "8.6", "qdq-zero-point")
    assert f.node in ("node 'x_q'", "node 'x_dq'") and "[3]" in f.message and "Explicit Quantization" in f.source


def test_planted_reduce_axes_input_and_constant_ints_on_8x() -> None:
    model = reduce_axes_input()
    f = _only(model, "8.6", "attribute")
    assert f.node == "node 'mean'" and "reduces over every axis" in f.message and "ReduceMean" in f.source
    assert check_readiness(model, "10")
    assert "reads them as floats" in _only(constant_ints(), "8.5", "attribute").message


def test_planted_qdq_without_zero_point_or_axis() -> None:
    model = qdq_without_zero_point_or_axis()
    assert {f.rule for f in check_readiness(model, "8.6").errors} == {"qdq-axis", "qdq-zero-point"}
    assert {f.rule for f in check_readiness(model, "10").errors} == {"qdq-axis"}


def test_planted_uint8_quantization() -> None:
    f = _only(uint8_quantization(), "8.6", "qdq-type")
    assert "UINT8" in f.message


def test_planted_per_channel_on_3d_matmul() -> None:
    model = per_channel_on_3d_matmul()
    for version in ("8.5", "8.6"):
        f = _only(model, version, "qdq-per-channel")
        assert f.node == "node 'w_dq'" and "'token_matmul'" in f.message and "[3, 2]" in f.message
    assert check_readiness(_qdq_matmul(rank=2), "8.6")  # the 2-D GEMM form passes
    assert check_readiness(_qdq_matmul(rank=3, per_channel=False), "8.6")  # per-tensor passes


def _qdq_weight_graph(op: str, w_shape: tuple[int, ...], axis: int | None, scales: int, *, kernel_shape: bool = True,
                      trans_b: int = 0, scale_type: Any = np.float32, x_type: int = TensorProto.FLOAT,
                      opset: int = 17) -> Any:
    """x -> Q/DQ (per-tensor) -> ``op``(x, DQ(w int8, per-channel scale of ``scales`` values on ``axis``))."""
    w = numpy_helper.from_array(np.ones(w_shape, np.int8), "w")
    ws = numpy_helper.from_array(np.full(scales, 0.1, scale_type), "w_scale")
    wz = numpy_helper.from_array(np.zeros(scales, np.int8), "w_zp")
    xs = numpy_helper.from_array(np.array(0.05, np.float16 if x_type == TensorProto.FLOAT16 else np.float32), "x_scale")
    xz = numpy_helper.from_array(np.array(0, np.int8), "x_zp")
    dq_axis = {} if axis is None else {"axis": axis}
    if op in ("Conv", "ConvTranspose"):
        x_shape: list[Any] = ["batch", w_shape[1] if op == "Conv" else w_shape[0], 8, 8]
        attrs: dict[str, Any] = {"kernel_shape": list(w_shape[2:])} if kernel_shape else {}
    else:  # MatMul [K, N] / Gemm B ([N, K] with transB=1)
        x_shape = ["batch", w_shape[1] if trans_b else w_shape[0]]
        attrs = {"transB": trans_b} if op == "Gemm" else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="w_dq", **dq_axis),
             helper.make_node(op, ["xd", "wd"], ["y"], name="layer", **attrs)]
    return _graph(nodes, [_tensor("x", x_shape, x_type)], _tensor("y", None, x_type), [w, ws, wz, xs, xz], opset=opset)


@planted
def per_channel_scale_count() -> Any:
    return _qdq_weight_graph("Conv", (8, 4, 3, 3), axis=0, scales=6)


#: (op, weight shape, transB, an axis off the output channels, the right axis)
AXES = [
    ("Conv", (8, 8, 3, 3), 0, 1, 0),            # [C_out, C_in/group, kH, kW]
    ("ConvTranspose", (8, 8, 3, 3), 0, 0, 1),   # [C_in, C_out/group, kH, kW]
    ("MatMul", (8, 8), 0, 0, 1),                # [K, N]
    ("Gemm", (8, 8), 1, 1, 0),                  # transB=1: [N, K]
    ("Gemm", (8, 8), 0, 0, 1),                  # transB=0: [K, N]
]
for _op, _w, _tb, _wrong, _ in AXES:
    PLANTED[f"per_channel_axis_{_wrong}_on_{_op}_transB{_tb}"] = functools.partial(
        _qdq_weight_graph, _op, _w, axis=_wrong, scales=8, trans_b=_tb)


@planted
def fp16_scales() -> Any:
    return _qdq_weight_graph("MatMul", (8, 4), axis=1, scales=4, scale_type=np.float16, x_type=TensorProto.FLOAT16)


@planted
def quantize_input_and_scale_types_differ_at_opset_21() -> Any:
    # fp16 activations, fp32 scale (ONNX allows it again from opset 21)
    model = _qdq_weight_graph("MatMul", (8, 4), axis=1, scales=4, scale_type=np.float16, x_type=TensorProto.FLOAT16,
                              opset=21)
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"))
    return model


@planted
def conv_with_dq_weights_and_no_kernel_shape() -> Any:
    return _qdq_weight_graph("Conv", (8, 4, 3, 3), axis=0, scales=8, kernel_shape=False)


@planted
def casts_to_fp16() -> Any:
    nodes = [helper.make_node("Cast", ["x"], ["h"], name="to_fp16", to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["f"], name="to_fp32", to=TensorProto.FLOAT),
             helper.make_node("Softmax", ["f"], ["y"], name="softmax", axis=-1)]
    return _graph(nodes, [_tensor("x", ["batch", 4])], _tensor("y", ["batch", 4]))


@planted
def dq_into_softmax() -> Any:
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("Softmax", ["d"], ["y"], name="softmax", axis=-1)]
    return _graph(nodes, [_tensor("x", ["batch", 4])], _tensor("y", ["batch", 4]), [s, z])


@planted
def dynamic_image_size() -> Any:
    return _graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_tensor("x", ["batch", 3, "h", 8])],
                  _tensor("y", ["batch", 3, "h", 8]))


@planted
def uint8_input_cast_to_int() -> Any:
    return _graph([helper.make_node("Cast", ["x"], ["y"], name="to_int", to=TensorProto.INT32)],
                  [_tensor("x", ["batch", 8], TensorProto.UINT8)], _tensor("y", ["batch", 8], TensorProto.INT32))


def test_planted_per_channel_scale_count() -> None:
    # TensorRT's Q/DQ importer needs one scale per channel of the quantized axis (source: the
    # per-channel facts recorded in parser_ops.json).
    model = per_channel_scale_count()
    for version in VERSIONS:
        f = _only(model, version, "qdq-scale-count")
        assert f.node == "node 'w_dq'" and "6 scales" in f.message and "dim[0] = 8" in f.message
        assert "QuantDequantLinearHelper" in f.source, f.source
    assert all(check_readiness(_qdq_weight_graph("Conv", (8, 4, 3, 3), axis=0, scales=8), v) for v in VERSIONS)


@pytest.mark.parametrize("op,w_shape,trans_b,wrong,right", AXES)
def test_planted_per_channel_axis_off_the_output_channels(op: str, w_shape: tuple[int, ...], trans_b: int, wrong: int,
                                                          right: int) -> None:
    # Square weights: the scale count fits either axis, so only the axis rule can object.
    for version in VERSIONS:
        f = _only(_qdq_weight_graph(op, w_shape, axis=wrong, scales=8, trans_b=trans_b), version, "qdq-axis")
        assert f.node == "node 'w_dq'" and f"axis {wrong}" in f.message and f"axis {right}" in f.message, f.message
        assert "'layer'" in f.message and "Explicit Quantization" in f.source
        assert check_readiness(_qdq_weight_graph(op, w_shape, axis=right, scales=8, trans_b=trans_b), version)


def test_planted_fp16_scales_on_8x() -> None:
    model = fp16_scales()
    for version in ("8.5", "8.6"):
        report = check_readiness(model, version)
        assert {f.rule for f in report.errors} == {"qdq-scale-type"}, str(report)
        assert {f.node for f in report.errors} == {"node 'x_q'", "node 'x_dq'", "node 'w_dq'"}
        assert all("FP16" in f.message and "float32" in f.message and f"release/{version}-GA" in f.source
                   for f in report.errors)
    assert check_readiness(model, "10")


def test_planted_quantize_input_and_scale_types_differ_from_opset_19() -> None:
    # Below opset 19 the parser casts the scale to the input's type, from 19 it does not.
    model = quantize_input_and_scale_types_differ_at_opset_21()
    f = _only(model, "10", "qdq-scale-type")
    assert f.node == "node 'x_q'" and "FP16" in f.message and "FP32" in f.message and "opset 21" in f.message
    assert "release/10" in f.source
    model.opset_import[0].version = 17
    assert check_readiness(model, "10")


def test_planted_conv_with_dq_weights_and_no_kernel_shape() -> None:
    model = conv_with_dq_weights_and_no_kernel_shape()
    for version in VERSIONS:
        f = _only(model, version, "attribute")
        assert f.node == "node 'layer'" and "kernel_shape" in f.message and "convMultiInput" in f.source
    # With the attribute, or with the weights a plain initializer (the one-input path reads the
    # kernel size from the weights), it imports.
    assert all(check_readiness(_qdq_weight_graph("Conv", (8, 4, 3, 3), axis=0, scales=8), v) for v in VERSIONS)
    w = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "w")
    plain = _graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [_tensor("x", ["batch", 4, 8, 8])],
                   _tensor("y", None), [w])
    assert all(check_readiness(plain, v) for v in VERSIONS)


def test_planted_casts_to_fp16_are_a_note_on_8x() -> None:
    model = casts_to_fp16()
    for version in ("8.5", "8.6"):
        report = check_readiness(model, version)
        assert report and [f.rule for f in report.findings] == ["fp16-cast"], str(report)
        f = report.findings[0]
        assert f.severity == "note" and "--fp16" in f.message and "--precisionConstraints=obey" in f.message
        assert "--layerPrecisions=softmax:fp32" in f.message and "#1823" in f.source
    assert not check_readiness(model, "10").findings


def test_external_data_graphs_are_read_from_their_folder(tmp_path: Path) -> None:
    # Big models keep their weights (and scales) in a .data file beside the graph.
    path = tmp_path / "big.onnx"
    onnx.save_model(_qdq_matmul(zero_point=3, rank=3), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)
    assert {f.rule for f in check_readiness(path, "8.6").errors} == {"qdq-zero-point", "qdq-per-channel"}


def test_planted_dq_into_an_op_tensorrt_does_not_quantize() -> None:
    f = _only(dq_into_softmax(), "10", "qdq-consumer")
    assert f.node == "node 'dq'" and "Softmax" in f.message


def test_planted_dynamic_image_size_and_uint8_input() -> None:
    f = _only(dynamic_image_size(), "10", "dynamic-dim")
    assert f.node == "input 'x'" and "dimension 2" in f.message
    assert _only(uint8_input_cast_to_int(), "8.6", "uint8-input").node == "input 'x'"


def test_require_ready_refuses_a_bundle_graph_that_would_not_parse(bundle_copy: Path) -> None:
    from cvt_deploy.bundle import Bundle

    bundle = Bundle.open(bundle_copy)
    art = bundle.artifacts["onnx-fp32"]
    model = onnx.load(str(bundle.path(art)))
    model.graph.node.append(helper.make_node("Shape", [model.graph.input[0].name], ["planted_shape"],
                                             name="planted_shape", start=0, end=1))
    onnx.save(model, str(bundle.path(art)))
    with changing(bundle):
        bundle.add(art)
    with pytest.raises(CvtDeployError, match=r"TensorRT 8\.6: node 'planted_shape' \(Shape\): attribute: .*source: "
                                             r"onnx-tensorrt .*release/8\.6-GA .*L4434"):
        require_ready(bundle)


# ----------------------------------------------------------------------------------------
# cvt-check --tensorrt, as a user runs it.


def test_cvt_check_tensorrt(default_bundle: Path, jetpack5_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.cli.check import main

    assert main(["--bundle", str(jetpack5_bundle), "--tensorrt", "8.5", "--tensorrt", "8.6", "--tensorrt", "10"]) == 0
    out = capsys.readouterr().out
    # three portable graphs on three releases, and the int8+fp16 graph on 10
    assert out.count(" ready ") == 10 and "model.int8-fp16.onnx        10  ready" in out and "not TensorRT" in out
    assert main(["--bundle", str(default_bundle), "--tensorrt", "8.5", "--json"]) == 1
    captured = capsys.readouterr()
    reports = json.loads(captured.out)
    assert len(reports) == 3 and not any(r["ready"] for r in reports)
    assert all(f["rule"] == "op" and f["op"] == "LayerNormalization" for r in reports for f in r["findings"]
               if f["severity"] == "error")
    assert "--tensorrt 8.5" in captured.err  # the fix
    assert main(["--bundle", str(default_bundle), "--tensorrt", "10", "--data", "somewhere"]) == 2
    assert "--data has no effect with --tensorrt" in capsys.readouterr().err


def test_what_the_check_says_it_read_is_what_the_table_records() -> None:
    import re

    import cvt_deploy.trt.readiness as readiness

    refs = {src["ref"] for src in parser_table()["sources"].values()}
    assert set(re.findall(r"release/[\w.]+-GA", readiness.__doc__ or "")) == refs
    line = readiness.summary([readiness.ReadinessReport("model.onnx", "10", {})]).splitlines()[-1]
    assert set(re.findall(r"release/[\w.]+-GA", line)) == refs and "not TensorRT" in line


def test_the_fp16_graph_tells_8x_how_to_build_it(default_bundle: Path, jetpack5_bundle: Path) -> None:
    for bundle, version in ((default_bundle, "8.6"), (jetpack5_bundle, "8.5")):
        notes = [f for f in check_readiness(bundle / "model.fp16.onnx", version).findings if f.rule == "fp16-cast"]
        assert len(notes) == 1 and notes[0].severity == "note", notes
        message = notes[0].message
        assert "trtexec --onnx=model.fp16.onnx --fp16 --precisionConstraints=obey --layerPrecisions=node_layer_norm" \
            in message and "model.onnx" in message, message
        for graph in ("model.onnx", "model.int8.onnx"):
            assert not [f for f in check_readiness(bundle / graph, version).findings if f.rule == "fp16-cast"]
        assert not [f for f in check_readiness(bundle / "model.fp16.onnx", "10").findings if f.rule == "fp16-cast"]


@pytest.mark.slow
def test_cvt13_graphs_are_ready_for_every_release(tmp_path_factory: pytest.TempPathFactory,
                                                  randomize_weights: Any) -> None:
    from cvt_deploy.model import create_model

    model = create_model("cvt-13")
    randomize_weights(model, seed=13)
    for target, versions in (("8.6", ("8.6", "10")), ("8.5", VERSIONS)):
        bundle = export_to(tmp_path_factory, model.eval(), f"cvt13-{target}", precisions=("fp32", "fp16", "int8"),
                           calib_count=8, check=False, ort_cpu=False, tensorrt=target)
        _assert_ready(bundle, versions)
        if tensorrt_unavailable_reason(TENSORRT_RTX) is None:  # and NVIDIA's parser and builder took each graph
            graphs = [a for a in Bundle.open(bundle).artifacts.values() if a.kind == "onnx"]
            assert len(graphs) == 4 and all(a.info["tensorrt_rtx"]["built"] for a in graphs), graphs
