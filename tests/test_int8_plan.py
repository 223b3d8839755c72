"""An int8 plan that keeps named layers float (``--int8-keep-float``, ``ExportOptions.int8_keep_float``):
every int8 graph of the bundle follows it, the manifest records it, and wrong use is refused.

One export of the demo model for the whole module (parity gates, the TensorRT readiness check
and, where installed, the TensorRT-RTX build all run in it); the refusals stop before any work,
or (an unknown name, which needs the fp32 graph) right after the fp32 graph is written.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import export_to, refused, run_cli, snapshot  # noqa: E402

from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.int8_plan import plan_int8  # noqa: E402
from cvt_deploy.export.names import module_names  # noqa: E402
from cvt_deploy.export.pipeline import ExportOptions  # noqa: E402

# A whole block by its prefix; the first conv (it reads the graph input); the q and k convs of one
# attention whose v conv stays int8 (one quantized reader of a shared tensor: ONNX Runtime's
# quantizer reroutes every reader through the Q/DQ pair, the plan's must be fed float again); the
# classifier head (a Gemm: ONNX Runtime's dynamic quantizer rewrites it as <name>_MatMul + Add).
KEEP = ("stage2.blocks.1", "stage0.patch_embed.proj", "stage1.blocks.1.attn.conv_proj_q",
        "stage1.blocks.1.attn.conv_proj_k", "head")
OPENVINO = importlib.util.find_spec("openvino") is not None


def _fp32_graph_from(src: Path, calls: list[Path]) -> Any:
    """An ``export_onnx`` that copies ``src`` (the demo model's genuine graph): the torch exporter is
    the slowest stage of an export and the same for every plan."""

    def export_onnx(model: Any, path: Any, **kw: Any) -> Path:
        assert model.cfg.variant == "cvt-tiny", "the demo model's graph only"
        calls.append(Path(path))
        shutil.copyfile(src, path)
        return Path(path)

    return export_onnx


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, demo_model: Any, demo_bundle: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cvt_deploy.export.pipeline.export_onnx", _fp32_graph_from(demo_bundle / "model.onnx", []))
        return export_to(tmp_path_factory, demo_model, "int8-plan", shared=True, precisions=("fp32", "int8"),
                         calib_count=64, check_limit=128, int8_keep_float=KEEP, openvino=OPENVINO)


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())["artifacts"]


@pytest.fixture(scope="module")
def kept(bundle: Path) -> set[str]:
    return set(plan_int8(bundle / "model.onnx", KEEP).nodes)


def _load(path: Path) -> Any:
    return onnx.load(str(path))


def _dq_fed(model: Any) -> dict[str, int]:
    """Weighted node -> how many of its inputs a DequantizeLinear writes."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name: sum(producer.get(i) == "DequantizeLinear" for i in n.input)
            for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}


def test_the_plan_resolves_modules_prefixes_and_node_names_in_graph_order(bundle: Path) -> None:
    fp32 = _load(bundle / "model.onnx")
    modules = module_names(fp32)
    block = [n for n, m in modules.items() if m.startswith("stage2.blocks.1.")]
    proj = next(n for n, m in modules.items() if m == "stage1.blocks.0.attn.proj")
    plan = plan_int8(fp32, ("head", proj, "stage2.blocks.1"))
    order = [n.name for n in fp32.graph.node]
    assert set(plan.nodes) == {*block, proj, next(n for n, m in modules.items() if m == "head")}
    assert list(plan.nodes) == sorted(plan.nodes, key=order.index) and len(block) == 9
    assert plan.keep_float == ("head", proj, "stage2.blocks.1") and plan.modules[proj] == "stage1.blocks.0.attn.proj"
    assert plan_int8(fp32, ()).nodes == ()
    with pytest.raises(CvtDeployError) as e:
        plan_int8(fp32, ("stage2.blocks.1.attn.prjo", "head", "stage9"))
    assert "'stage2.blocks.1.attn.prjo', 'stage9'" in e.value.message and "stage2.blocks.1.attn.proj" in e.value.message


def test_kept_layers_have_no_qdq_in_the_int8_graphs_and_the_others_do(bundle: Path, kept: set[str]) -> None:
    fp32 = module_names(_load(bundle / "model.onnx"))
    assert len(kept) == 1 + 2 + 9 + 1  # patch embedding, q and k convs, the block's 9, head
    for file in ("model.int8.onnx", "model.int8-fp16.onnx"):
        model = _load(bundle / file)
        fed = _dq_fed(model)
        assert kept <= set(fed), file  # the node names are the fp32 graph's
        assert not [n for n in kept if fed[n]], file
        # every other layer with weights reads its input and weight through Q/DQ
        assert {n: fed[n] for n in fp32 if n not in kept and fed[n] < 2} == {}, file
        assert {n: c for n, c in fed.items() if n not in fp32 and c} == {}, file  # q @ k^T, attn @ v: float
        inits = {i.name: i.data_type for i in model.graph.initializer}
        weights = [i for n in model.graph.node if n.name in kept for i in n.input[1:2]]
        want = onnx.TensorProto.FLOAT16 if file == "model.int8-fp16.onnx" else onnx.TensorProto.FLOAT
        assert {inits[w] for w in weights} == {want}, file  # float weights, fp16 where all outside Q/DQ is


def test_the_ort_cpu_int8_graph_keeps_the_same_matmuls_float(bundle: Path, kept: set[str]) -> None:
    fp32 = _load(bundle / "model.ort-cpu.onnx")
    int8 = {n.name: n.op_type for n in _load(bundle / "model.ort-cpu.int8.onnx").graph.node}
    weighted = [n.name for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and n.name in module_names(fp32)]
    assert weighted and [n for n in weighted if n in kept]
    for name in weighted:
        if name in kept:  # a Gemm comes back as <name>_MatMul + Add, still float
            assert int8.get(name) in ("MatMul", "Gemm") or int8.get(f"{name}_MatMul") == "MatMul", name
        else:
            assert name not in int8 and f"{name}_MatMul" not in int8, name  # now a MatMulInteger


def test_the_manifest_records_the_plan_on_every_int8_artifact(manifest: dict[str, Any], kept: set[str]) -> None:
    int8 = {n: a for n, a in manifest.items() if a["precision"] == "int8"}
    assert {"onnx-int8", "onnx-int8-tensorrt-10", "onnx-int8-onnxruntime-cpu"} <= set(int8)
    assert ("openvino-int8" in int8) == OPENVINO  # the IR of model.int8.onnx: it follows that graph
    for name, art in int8.items():
        plan = art["int8_plan"]
        assert plan["keep_float"] == list(KEEP) and set(plan["nodes"]) == kept, name
        assert plan["modules"][plan["nodes"][-1]] == "head", name  # in graph order
        assert art["parity"]["passed"], name  # the gates still hold
    assert all("int8_plan" not in a for a in manifest.values() if a["precision"] != "int8")
    assert int8["onnx-int8"]["tensorrt_ready"] and int8["onnx-int8-tensorrt-10"]["tensorrt_ready"]
    rtx = [a.get("tensorrt_rtx") for a in int8.values() if a.get("tensorrt_rtx")]
    assert all(r["built"] for r in rtx)


def test_an_unknown_name_is_refused_by_name_and_the_old_bundle_is_kept(bundle: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(bundle, out)
    before = snapshot(out)
    exported: list[Path] = []
    monkeypatch.setattr("cvt_deploy.export.pipeline.export_onnx", _fp32_graph_from(bundle / "model.onnx", exported))
    proc = run_cli("cvt-export", "--precision", "int8", "--int8-keep-float", "stage2.blocks.1.attn.prjo,head",
                   "--int8-keep-float", "nope", "--out", str(out), "--no-check", "--no-timing", "--no-rtx-build", "-q")
    refused(proc, "--int8-keep-float: 'stage2.blocks.1.attn.prjo', 'nope' are no layer of this model",
            "stage2.blocks.1.attn.proj")
    assert exported, "refused once the fp32 graph was there to resolve the names against"
    assert snapshot(out) == before


@pytest.mark.parametrize("args, words", [
    (["--int8-keep-float", "head"], ["--int8-keep-float has no effect here: no int8 graph is exported",
                                     "add --precision int8"]),
    (["--precision", "fp16", "--int8-keep-float", "head"], ["--int8-keep-float has no effect"]),
    (["--format", "trt", "--bundle", "b", "--precision", "int8", "--int8-keep-float", "head"],
     ["--int8-keep-float has no effect here: nothing is exported or calibrated (--bundle)"]),
    (["--precision", "int8", "--int8-keep-float", ""], ["--int8-keep-float '': an empty layer name"]),
    (["--precision", "int8", "--int8-keep-float", "head,,stage2"], ["an empty layer name", "comma list"]),
])
def test_keep_float_without_an_int8_export_or_a_name_is_refused_before_any_work(no_work: None, args: list[str],
                                                                                 words: list[str]) -> None:
    refused(run_cli("cvt-export", *args), *words)


def test_export_options_check_the_names_before_any_work() -> None:
    assert ExportOptions(precisions=("int8",), int8_keep_float="head,stage2").int8_keep_float == ("head", "stage2")
    assert ExportOptions(precisions=("int8",), int8_keep_float=["head", "head"]).int8_keep_float == ("head",)
    for bad, words in (({"precisions": ("fp32", "fp16"), "int8_keep_float": ("head",)}, "no int8 graph"),
                       ({"precisions": ("int8",), "int8_keep_float": ("head", " ")}, "no layer name"),
                       ({"precisions": ("int8",), "int8_keep_float": (3,)}, "is not a layer name")):
        with pytest.raises(CvtDeployError, match=words):
            ExportOptions(**bad)
