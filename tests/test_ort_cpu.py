"""ONNX Runtime CPU graphs (export/ort_cpu.py) beside the portable ones, and the portable int8
graph that TensorRT compiles, pinned as it is.

The rewrite is checked on the demo bundle and on a CvT whose stages differ in every way the
pattern depends on (class token or not, dw_bn / avg / linear projections, q/k/v bias or not).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvt_deploy import bundle_write

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.ort_cpu import FILES, TARGET, PatternNotFound, rewrite_for_ort_cpu  # noqa: E402
from cvt_deploy.util import ort_session  # noqa: E402


def _logits(path: Path | bytes, x: np.ndarray) -> np.ndarray:
    session = ort_session(path, 1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _rand(b: int, size: int) -> np.ndarray:
    return np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_int8_bundle(demo_full_bundle: Path) -> Path:
    """The demo model exported with every precision, parity checked (the default export path)."""
    return demo_full_bundle


@pytest.fixture(scope="module")
def mixed_graph(tmp_path_factory: pytest.TempPathFactory, randomize_weights: Any) -> tuple[Path, Any]:
    """A tiny CvT: stage 0 dw_bn + class token + no q/k/v bias, stage 1 avg, stage 2 linear + class token."""
    pytest.importorskip("torch")
    from cvt_deploy.export.onnx import export_onnx
    from cvt_deploy.model import create_model

    model = create_model("cvt-tiny", num_classes=10, cls_token=(True, False, True),
                         qkv_projections=("dw_bn", "avg", "linear"), qkv_bias=(False, True, True))
    randomize_weights(model, seed=3)
    path = tmp_path_factory.mktemp("mixed") / "model.onnx"
    export_onnx(model, path)
    return path, model


def test_rewrite_of_every_stage_kind_matches_the_portable_graph(mixed_graph: tuple[Path, Any]) -> None:
    path, model = mixed_graph
    source = onnx.load(str(path))
    before = onnx.load(str(path)).SerializeToString()
    rewritten, counts = rewrite_for_ort_cpu(source)
    assert source.SerializeToString() == before  # model in, model out: the input is untouched
    onnx.checker.check_model(rewritten)
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert ops["MultiHeadAttention"] == counts["attention"] == sum(model.cfg.depths)
    assert ops["Softmax"] == 0 and counts["layout"] > 0 and counts["transposes"] < counts["transposes_before"]
    mha = [n for n in rewritten.graph.node if n.op_type == "MultiHeadAttention"]
    assert all(n.domain == "com.microsoft" for n in mha)
    init = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    # q/k/v biases folded in where the stage has them; stage 0 (no bias) has no bias input
    assert [len(n.input) for n in mha] == [3] + [4] * (len(mha) - 1)
    assert all(init[n.input[3]].shape == (3 * 32,) for n in mha[1:3])
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in mha]
    assert heads == [1] + [2] * 2 + [4] * 3
    for b in (1, 3):
        x = _rand(b, model.cfg.img_size)
        np.testing.assert_allclose(_logits(rewritten.SerializeToString(), x), _logits(path, x), atol=1e-4, rtol=0)


def test_no_attention_pattern_means_no_graph_and_a_reason() -> None:
    # A Softmax that is not CvT attention: the pass refuses rather than writing something wrong.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g", [x], [y]))
    with pytest.raises(PatternNotFound) as e:
        rewrite_for_ort_cpu(model)
    assert "no ONNX Runtime CPU graph" in e.value.message and "attention" in e.value.message
    no_softmax = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(PatternNotFound, match="no Softmax"):
        rewrite_for_ort_cpu(no_softmax)


def test_export_stage_says_why_and_writes_nothing_when_the_pattern_is_missing(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.bundle import Artifact, BatchRange
    from cvt_deploy.config import get_config
    from cvt_deploy.export.ort_cpu import write_ort_cpu_graphs

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3, 64, 64])
    graph = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["pixel_values"], ["logits"], axis=-1)],
                                                "g", [x], [y]))
    with bundle_write.create(tmp_path / "b", get_config("cvt-tiny"), BatchRange(), {}) as bundle:
        onnx.save(graph, str(bundle.root / "model.onnx"))
        bundle.add(Artifact("onnx-fp32", "model.onnx", "onnx", "fp32"))
        assert write_ort_cpu_graphs(bundle, ("fp32", "int8"), {"fp32": {}, "int8": {}}) == []
        assert set(bundle.artifacts) == {"onnx-fp32"} and not (bundle.root / FILES["fp32"]).exists()
    assert "no ONNX Runtime CPU graph" in capsys.readouterr().err
    assert set(Bundle.open(tmp_path / "b").artifacts) == {"onnx-fp32"}


def test_export_writes_ort_cpu_graphs_that_pass_the_gates(demo_int8_bundle: Path) -> None:
    bundle = Bundle.open(demo_int8_bundle)
    for precision in ("fp32", "int8"):
        portable, cpu = bundle.find("onnx", precision), bundle.find("onnx", precision, TARGET)
        assert portable is not None and cpu is not None and portable.target == "portable" and cpu.target == TARGET
        assert cpu.file == FILES[precision] and cpu.info["portable"] == portable.name
        for art in (portable, cpu):
            assert art.info["parity"]["passed"] and art.info["parity"]["artifact"] == art.name
    cpu8 = onnx.load(str(bundle.path(bundle.find("onnx", "int8", TARGET))))
    ops = Counter(n.op_type for n in cpu8.graph.node)
    assert ops["MatMulInteger"] > 0 and ops["MultiHeadAttention"] == 6 and "QuantizeLinear" not in ops
    assert ops["Conv"] == 21  # convolutions stay float: they keep ORT's NCHWc layout
    raw = json.loads((demo_int8_bundle / "manifest.json").read_text())
    assert raw["artifacts"]["onnx-fp32"].get("target", "portable") == "portable"
    assert raw["artifacts"][f"onnx-int8-{TARGET}"]["target"] == TARGET


def test_load_picks_the_cpu_graph_on_cpu_and_the_portable_one_by_name(demo_int8_bundle: Path) -> None:
    from cvt_deploy.backends import load
    from cvt_deploy.runtimes.ort import OrtRuntime

    bundle = Bundle.open(demo_int8_bundle)
    for precision in ("fp32", "int8"):
        runtime = load(bundle, backend="onnxruntime", precision=precision)
        assert Path(runtime.path).name == FILES[precision] and runtime.target == TARGET  # type: ignore[attr-defined]
        assert TARGET in runtime.describe()
    portable = OrtRuntime.from_bundle(bundle, artifact="onnx-int8")
    assert Path(portable.path).name == "model.int8.onnx" and portable.target == "portable"
    with pytest.raises(CvtDeployError, match="no ONNX graph named"):
        OrtRuntime.from_bundle(bundle, artifact="onnx-fp64")
    with pytest.raises(CvtDeployError, match="CPU provider, not cuda"):
        OrtRuntime.from_bundle(bundle, device="cuda", artifact=f"onnx-int8-{TARGET}")
    # The TensorRT builder and the GPU providers look graphs up as portable: never a CPU graph.
    assert bundle.find("onnx", "int8") is not None and bundle.find("onnx", "int8").target == "portable"  # type: ignore[union-attr]


def test_check_bundle_checks_every_graph(demo_int8_bundle: Path) -> None:
    from cvt_deploy.parity import check_bundle

    reports = check_bundle(Bundle.open(demo_int8_bundle), limit=64, progress=False)
    assert sorted(r.artifact for r in reports) == sorted(["onnx-fp32", "onnx-fp16", "onnx-int8", f"onnx-fp32-{TARGET}",
                                                          f"onnx-int8-{TARGET}", "onnx-int8-tensorrt-10"])
    assert all(reports)


def test_manifest_target_is_validated(demo_int8_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(demo_int8_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["artifacts"][f"onnx-int8-{TARGET}"]["target"] = "onnxruntime-gpu"
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CvtDeployError, match="target 'onnxruntime-gpu'"):
        Bundle.open(copy)


def test_portable_int8_graph_is_unchanged_for_tensorrt(demo_int8_bundle: Path) -> None:
    """Q/DQ pairs on Conv/MatMul/Gemm inputs only, int8 zero points 0, no contrib or integer ops."""
    model = onnx.load(str(demo_int8_bundle / "model.int8.onnx"))
    init = {i.name: i for i in model.graph.initializer}
    users: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    ops = Counter(n.op_type for n in model.graph.node)
    assert not {"MultiHeadAttention", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat"} & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    fed = Counter()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = init[n.input[2]]
            assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
        if n.op_type == "DequantizeLinear":
            fed.update(u.op_type for u in users[n.output[0]])
    # every Conv (21) and the head Gemm take two DQ inputs; every weight MatMul (36) too
    assert fed == Counter({"Conv": 42, "MatMul": 72, "Gemm": 2})
