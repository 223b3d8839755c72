"""Layer-by-layer parity (cvt-check --layers, cvt_deploy.layers): each candidate graph of a bundle
beside its fp32 graph, compared at every named layer, block output and the logits; the first
layer where the error jumps, found where a layer was broken on purpose; bounded memory."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cvt_deploy.bundle_write import changing  # noqa: E402
from cvt_deploy import layers  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.cli import check as check_cli  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.names import module_names  # noqa: E402
from cvt_deploy.layer_report import REL_FLOOR, LayerReport, LayerRow, first_jump  # noqa: E402
from cvt_deploy.layers import GROUP, check_layers, layer_parity  # noqa: E402

LIMIT = 16


@pytest.fixture(scope="module")
def reports(demo_full_bundle: Path) -> dict[str, LayerReport]:
    """Every fp16 and int8 ONNX graph of the demo bundle on onnxruntime, by artifact name (once)."""
    got = check_layers(Bundle.open(demo_full_bundle), precisions=["fp16", "int8"], limit=LIMIT, progress=False)
    return {r.artifact: r for r in got}


def row(rep: LayerReport, name: str) -> LayerRow:
    return next(r for r in rep.rows if name in (r.module, r.node, r.kind))


def test_every_fp16_and_int8_graph_is_a_candidate(reports: dict[str, LayerReport]) -> None:
    assert sorted(reports) == ["onnx-fp16", "onnx-int8", "onnx-int8-onnxruntime-cpu", "onnx-int8-tensorrt-10"]
    assert all(r.images == LIMIT and r.backend == "onnxruntime" and r.group == GROUP for r in reports.values())


def test_the_table_names_modules_nodes_blocks_and_logits(reports: dict[str, LayerReport]) -> None:
    rep = reports["onnx-int8"]
    text = str(rep)
    assert "stage0.patch_embed.proj" in text and "node_conv2d " in text
    assert row(rep, "stage0.patch_embed.proj").kind == "Conv"
    assert row(rep, "stage1.blocks.1.attn.proj").node.startswith("node_MatMul_")
    blocks = [r.module for r in rep.rows if r.kind == "block"]
    assert blocks == ["stage0.blocks.0", "stage1.blocks.0", "stage1.blocks.1", "stage2.blocks.0", "stage2.blocks.1",
                      "stage2.blocks.2"]
    assert "stage2.blocks.2 " in text and row(rep, "stage2.blocks.2").node.startswith("node_add")
    assert rep.rows[-1].kind == "logits" and rep.rows[-1].compared
    # every row compared, depth in graph order; a Linear is compared after its bias Add (a 2-D view in Q/DQ)
    assert not rep.skipped_rows and [r.index for r in rep.rows] == list(range(len(rep.rows)))
    assert row(rep, "stage0.blocks.0.mlp.fc2").candidate_tensor.endswith("_2d_bias")
    assert not any(r.module == "" and r.kind == "MatMul" for r in rep.rows)  # attention MatMuls: --layers all only


def test_fp16_stays_close_at_every_layer(reports: dict[str, LayerReport]) -> None:
    rep = reports["onnx-fp16"]
    assert rep.compared_rows and all(r.min_cosine is not None and r.min_cosine > 0.999 for r in rep.compared_rows)
    assert rep.first_jump is None and "first jump: none" in str(rep)


def test_the_int8_logits_row_is_what_parity_measures(reports: dict[str, LayerReport], demo_full_bundle: Path) -> None:
    from cvt_deploy.data import load_eval_data
    from cvt_deploy.parity import compare
    from cvt_deploy.runtimes.ort import OrtRuntime

    bundle = Bundle.open(demo_full_bundle)
    batch = load_eval_data(None, bundle.config, LIMIT, progress=False).batch
    fp32, int8 = (OrtRuntime.from_bundle(bundle, artifact=a).run(batch) for a in ("onnx-fp32", "onnx-int8"))
    parity = compare(fp32, int8, precision="int8")
    logits = row(reports["onnx-int8"], "logits")
    assert logits.min_cosine is not None and logits.min_cosine > 0.99
    assert logits.min_cosine == pytest.approx(parity.min_cosine, abs=2e-3)
    assert logits.max_abs_diff == pytest.approx(parity.max_abs, rel=0.25)


def test_onnxruntime_cpu_graphs_compare_what_they_kept(reports: dict[str, LayerReport]) -> None:
    rep = reports["onnx-int8-onnxruntime-cpu"]
    skipped = rep.skipped_rows
    # attention folded into one op (its q/k/v Linears' bias Adds gone), the head quantized as a whole
    assert skipped and all(r.module.endswith(("attn.proj_q", "attn.proj_k", "attn.proj_v")) or r.module == "head"
                           for r in skipped)
    assert f"skipped {len(skipped)} of {len(rep.rows)} points" in str(rep)
    assert row(rep, "stage0.patch_embed.proj").compared and row(rep, "stage2.blocks.2").compared
    assert row(rep, "stage1.blocks.0.mlp.fc1").compared  # its MatMul is a MatMulInteger there: the bias Add is kept
    assert row(rep, "logits").min_cosine > 0.99  # type: ignore[operator]


def test_json_round_trips(reports: dict[str, LayerReport], monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str], demo_full_bundle: Path) -> None:
    shown = [reports["onnx-fp16"], reports["onnx-int8"]]
    monkeypatch.setattr(layers, "check_layers", lambda *a, **k: shown)
    assert check_cli.main(["--bundle", str(demo_full_bundle), "--layers", "--json", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == [json.loads(json.dumps(r.to_dict())) for r in shown]
    assert got[0]["first_jump"] is None and "worst-image cosine" in got[0]["jump_rule"]
    assert {"module", "node", "min_cosine", "mean_cosine", "max_rel_error", "max_abs_diff"} <= set(got[1]["layers"][0])
    back = [LayerReport.from_dict(d) for d in got]
    assert [b.to_dict() for b in back] == got and str(back[1]) == str(shown[1])


def test_the_command_prints_tables_and_plots(demo_full_bundle: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    rc = check_cli.main(["--bundle", str(demo_full_bundle), "--layers", "--precision", "fp16", "--limit", "4",
                         "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "onnxruntime fp16 (model.fp16.onnx) vs fp32 ONNX graph" in out and "stage1.blocks.1" in out
    assert "first jump = the first layer whose worst-image cosine" in out
    assert "passes of at most 16" in err and f"plot: {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_plot_names_the_extra(demo_full_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(layers, "check_layers", lambda *a, **k: pytest.fail("ran before refusing --plot"))
    rc = check_cli.main(["--bundle", str(demo_full_bundle), "--layers", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "'matplotlib'" in err and "cvt-deploy[plot]" in err


@pytest.mark.parametrize("group, mode", [(GROUP, "all"), (24, "named")])
def test_at_most_group_tensors_per_pass(demo_full_bundle: Path, monkeypatch: pytest.MonkeyPatch, group: int,
                                        mode: str) -> None:
    """Memory is bounded: no session ever exposes more than ``group`` tensors, and every point is covered."""
    real = layers.ort_session
    outputs: list[int] = []

    def spy(model: Any, *a: Any, **k: Any) -> Any:
        session = real(model, *a, **k)
        outputs.append(len(session.get_outputs()))
        assert k.get("optimize") is False  # unfused: every compared tensor keeps its name
        return session

    monkeypatch.setattr(layers, "ort_session", spy)
    rep = layer_parity(Bundle.open(demo_full_bundle), "onnx-int8", limit=4, progress=False, group=group, mode=mode)
    compared = len(rep.compared_rows)
    assert max(outputs) <= group and not rep.skipped_rows and rep.group == group
    assert len(outputs) == 2 * math.ceil(compared / group)  # one fp32 and one candidate session per pass
    attention = [r for r in rep.compared_rows if r.module == "" and r.node.startswith("node_matmul")]
    assert len(attention) == (12 if mode == "all" else 0)  # two attention MatMuls per block: --layers all only


def _break_layer(bundle_dir: Path, module: str) -> str:
    """Multiply the int8 weight scale of ``module`` by 8 in the bundle's int8 graph; its node."""
    from onnx import numpy_helper

    bundle = Bundle.open(bundle_dir)
    art = bundle.artifacts["onnx-int8"]
    model = onnx.load(str(bundle.path(art)))
    node_name = next(n for n, m in module_names(model).items() if m == module)
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = producer[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 8, scale.name))
    onnx.save(model, str(bundle.path(art)))
    with changing(bundle):
        bundle.add(art)  # the manifest's sha256 follows the change
    return node_name


@pytest.mark.parametrize("module", ["stage1.blocks.1.attn.conv_proj_v.conv", "stage2.blocks.0.mlp.fc1"])
def test_the_first_jump_is_the_broken_layer(demo_full_bundle: Path, tmp_path: Path, module: str) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(demo_full_bundle, copy)
    node = _break_layer(copy, module)
    rep = layer_parity(Bundle.open(copy), "onnx-int8", limit=8, progress=False)
    jump = rep.first_jump
    assert jump is not None and (jump.module, jump.node) == (module, node)
    assert jump.mean_rel_error is not None and jump.mean_rel_error > 3  # cosine hides a scale; relative error does not
    before = [r for r in rep.compared_rows if r.index < jump.index]
    assert before and all(r.mean_rel_error is not None and r.mean_rel_error < REL_FLOOR for r in before)
    assert f"first jump: {module} ({node})" in str(rep) and "<- first jump" in str(rep)
    assert LayerReport.from_dict(json.loads(json.dumps(rep.to_dict()))).first_jump.module == module  # type: ignore[union-attr]


def test_the_jump_rule() -> None:
    def rows(*figures: tuple[float, float]) -> list[LayerRow]:
        return [LayerRow(i, "Conv", f"m{i}", f"n{i}", min_cosine=c, mean_rel_error=e) for i, (c, e) in enumerate(figures)]

    assert first_jump(rows((0.9999, 0.01), (0.9995, 0.02), (0.999, 0.04))) is None  # accumulation
    assert first_jump(rows((0.9999, 0.01), (0.97, 0.05))) == 1  # the cosine falls by more than 0.02
    assert first_jump(rows((0.9999, 0.03), (0.9999, 0.08), (0.999, 0.3))) == 2  # 3.75x and above the floor
    assert first_jump(rows((1.0, 1e-4), (1.0, 9e-4))) is None  # fp16's 9x of nothing
    nan = rows((0.9999, 0.01), (0.9999, 0.01))
    nan[1].nonfinite = 3
    assert first_jump(nan) == 1


def test_openvino_ir(demo_ir_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.open(demo_ir_bundle)
    assert [a.file for _, a in layers.candidates(bundle, ["openvino"], ["fp16"])] == ["model.fp16.openvino.xml"]
    rep = layer_parity(bundle, "openvino-fp16", backend="openvino", limit=4, progress=False, group=100)
    assert rep.candidate == "openvino fp16 (model.fp16.openvino.xml)" and not rep.skipped_rows
    assert all(r.min_cosine is not None and r.min_cosine > 0.999 for r in rep.compared_rows)
    assert not any("ran on OpenVINO in its place" in n for n in rep.notes)
    # an IR that lost its tensor names: its portable ONNX graph runs on OpenVINO instead, and the report says so
    real = layers._ov_tensor_names
    calls: list[int] = []

    def lost(model: Any) -> set[str]:
        calls.append(1)
        return set() if len(calls) == 1 else real(model)

    monkeypatch.setattr(layers, "_ov_tensor_names", lost)
    rep = layer_parity(bundle, "openvino-fp16", backend="openvino", limit=4, progress=False, group=100)
    assert any("model.fp16.onnx ran on OpenVINO in its place" in n for n in rep.notes)
    assert not rep.skipped_rows and row(rep, "logits").min_cosine > 0.999  # type: ignore[operator]


def test_a_raw_pixel_bundle(demo_full_bundle: Path, tmp_path: Path) -> None:
    """Graphs that take uint8 pixels and end in a softmax: each graph is fed what it takes."""
    from conftest import raw_pixel_copy

    raw = raw_pixel_copy(demo_full_bundle, tmp_path / "raw", "uint8-nhwc", "probs")
    (rep,) = check_layers(Bundle.open(raw), precisions=["fp16"], limit=4, progress=False)
    assert rep.artifact == "onnx-fp16" and not rep.skipped_rows
    assert all(r.min_cosine is not None and r.min_cosine > 0.999 for r in rep.compared_rows)


@pytest.mark.parametrize("extra, message", [
    (["--tensorrt", "10"], "--layers and --tensorrt are two different checks"),
    (["--device", "cuda"], "--device has no effect with --layers"),
    (["--preprocess", "deepstream"], "--preprocess has no effect with --layers"),
    (["--backend", "tensorrt"], "--layers runs graphs on onnxruntime, openvino, not tensorrt"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--backend", "openvino", "--precision", "fp32"], "has no candidate graph at fp32 for --layers on openvino"),
    (["--limit", "0"], "must be a whole number >= 1"),
    (["--plot", "layers.txt"], "--plot layers.txt: unsupported image type .txt"),
])
def test_bad_input_is_refused_before_any_work(demo_full_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    if "--plot" in extra:
        pytest.importorskip("matplotlib")
    monkeypatch.setattr(layers, "layer_parity", lambda *a, **k: pytest.fail("compared although refused"))
    rc = check_cli.main(["--bundle", str(demo_full_bundle), "--layers", *extra, "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "fix:" in err, err


def test_plot_needs_layers_and_layers_takes_only_all(demo_full_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_cli.main(["--bundle", str(demo_full_bundle), "--plot", "x.png", "-q"]) == 2
    assert "--plot draws the layer table of --layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_cli.build_parser().parse_args(["--bundle", "b", "--layers", "most"])
    assert check_cli.build_parser().parse_args(["--bundle", "b", "--layers"]).layers == "named"
    assert check_cli.build_parser().parse_args(["--bundle", "b", "--layers", "all"]).layers == "all"


def test_library_errors_name_the_fix(demo_full_bundle: Path) -> None:
    bundle = Bundle.open(demo_full_bundle)
    for call, message in [(lambda: layer_parity(bundle, "torch-fp32"), "is a torch artifact"),
                          (lambda: layer_parity(bundle, "nope"), "has no artifact 'nope'"),
                          (lambda: layer_parity(bundle, "onnx-int8", mode="some"), "layer mode 'some'")]:
        with pytest.raises(CvtDeployError, match=message) as e:
            call()
        assert e.value.hint
