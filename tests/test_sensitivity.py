"""int8 layer sensitivity (cvt_deploy/sensitivity.py) on a model whose int8 truly breaks: the demo
model with outlier channels planted in one attention's output projection (conftest planted_int8)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.sensitivity import SensitivityReport, keep_float, quantized_layers, rank_int8_layers  # noqa: E402
from cvt_deploy.util import ort_session  # noqa: E402


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    return np.concatenate([sess.run(None, {"pixel_values": x[i:i + 120]})[0] for i in range(0, len(x), 120)])


def graphs(bundle: Path) -> tuple[Path, Path]:
    b = Bundle.open(bundle)
    return b.path(b.require("onnx", "int8")), b.path(b.require("onnx", "fp32"))


def bundle_images(bundle: Bundle, count: int = 64) -> np.ndarray:
    """The first ``count`` check images of a bundle, as the ranking reads them by default."""
    from cvt_deploy.data import load_eval_data

    return load_eval_data(None, bundle.config, count, progress=False).batch


@pytest.fixture(scope="module")
def planted_ranking(planted_int8: Any) -> SensitivityReport:
    """Every quantized layer of the planted model's int8 graph ranked on 64 check images."""
    return rank_int8_layers(planted_int8.bundle, progress=False)


@pytest.fixture(scope="module")
def check_batch(planted_int8: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundle's check images (the demo held-out split, as cvt-check reads it), their labels and
    the planted model's PyTorch logits: the reference the gates are judged against."""
    import torch

    from cvt_deploy.data import load_eval_data

    ev = load_eval_data(None, planted_int8.model.cfg, progress=False)
    with torch.no_grad():
        ref = planted_int8.model(torch.from_numpy(ev.batch)).numpy()
    assert ev.labels is not None
    return ev.batch, ev.labels, ref


def test_planting_leaves_fp32_as_it_was(planted_int8: Any, check_batch: Any, demo_reference: np.ndarray) -> None:
    import torch

    from cvt_deploy.checkpoints import load_checkpoint

    x, _, ref = check_batch
    assert np.abs(ref - demo_reference[:len(ref)]).max() < 1e-3  # the demo's logits, to float rounding
    attn = planted_int8.model.get_submodule(planted_int8.module.rsplit(".", 1)[0])
    rows = attn.proj_v.weight.detach().abs().amax(1)
    assert rows[list(planted_int8.channels)].min() > 50 * rows.median()  # the outliers are there
    with torch.no_grad():  # and the checkpoint is the same model (cvt-export --weights takes it)
        batch = torch.from_numpy(x[:64])
        np.testing.assert_array_equal(load_checkpoint(planted_int8.weights)(batch).numpy(),
                                      planted_int8.model(batch).numpy())


def test_planted_int8_misses_its_gate(planted_int8: Any) -> None:
    bundle = Bundle.open(planted_int8.bundle)
    fp32, int8 = bundle.require("onnx", "fp32").info["parity"], bundle.require("onnx", "int8").info["parity"]
    assert fp32["passed"]
    assert not int8["passed"]
    failed = {c["name"] for c in int8["checks"] if not c["ok"]}
    assert "min cosine" in failed and int8["min_cosine"] < 0.5, int8  # a clear miss, not a borderline one


def test_ranking_puts_the_planted_layer_first(planted_int8: Any, planted_ranking: SensitivityReport) -> None:
    import onnx

    report = planted_ranking
    int8, _ = graphs(planted_int8.bundle)
    assert len(report.rows) == len(quantized_layers(onnx.load(str(int8))))  # every one of them
    assert report.rows[0].module == planted_int8.module, str(report)
    top, second = report.rows[0], report.rows[1]
    assert top.gain > 0.9 and second.gain < 0.1, str(report)  # that one layer is int8's whole error
    assert top.min_cosine >= 0.98 > report.int8_min_cosine
    assert report.rank(planted_int8.module) == 1 and report.rank(top.node) == 1
    assert report.images == 64 and report.cached == 0
    text = str(report)
    assert planted_int8.module in text and "(every layer int8)" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["rows"][0]["module"] == planted_int8.module and d["rows"][0]["rank"] == 1


def test_keeping_the_planted_layer_float_passes_the_gate(planted_int8: Any, planted_ranking: SensitivityReport,
                                                         check_batch: Any, tmp_path: Path) -> None:
    from cvt_deploy.parity import compare

    x, labels, ref = check_batch
    int8, fp32 = graphs(planted_int8.bundle)
    assert keep_float(int8, fp32, [planted_int8.module], tmp_path / "kept.onnx") == [planted_ranking.rows[0].node]
    before = compare(ref, logits(int8, x), labels, precision="int8")
    after = compare(ref, logits(tmp_path / "kept.onnx", x), labels, precision="int8")
    assert not before and after, (before.failed, after.failed)
    assert after.min_cosine > 0.99 and after.top1_agreement > 0.99


def test_a_variant_is_the_graph_it_stands_for(planted_int8: Any, tmp_path: Path) -> None:
    """A ranked layer's figures, measured from the last cut before it on, are those of the whole
    int8 graph with that layer kept float (every kind of layer: embedding Conv, projection,
    MLP, head; early and late)."""
    names = [planted_int8.module, "stage0.patch_embed.proj", "stage0.blocks.0.attn.conv_proj_k.conv",
             "stage1.blocks.1.mlp.fc2", "stage2.blocks.2.attn.proj_q", "head"]
    report = rank_int8_layers(planted_int8.bundle, layers=names, progress=False)
    assert sorted(r.module for r in report.rows) == sorted(names)
    int8, fp32 = graphs(planted_int8.bundle)
    x = bundle_images(Bundle.open(planted_int8.bundle))
    ref = logits(fp32, x)
    for row in report.rows:
        keep_float(int8, fp32, [row.node], tmp_path / "kept.onnx")
        y = logits(tmp_path / "kept.onnx", x)
        cos = (ref * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
        assert abs(cos.min() - row.min_cosine) < 1e-5 and abs(cos.mean() - row.mean_cosine) < 1e-6, row
        assert (ref.argmax(1) == y.argmax(1)).mean() == row.top1_agreement


def test_the_edit_is_what_the_quantizer_writes(planted_int8: Any, tmp_path: Path) -> None:
    """Keeping a layer float by removing its Q/DQ gives the graph quantize_static writes with the
    layer in nodes_to_exclude from the same ranges (export/int8.py's keep-float plan)."""
    import inspect

    int8_plan = pytest.importorskip("cvt_deploy.export.int8_plan")
    from cvt_deploy.calibration import load_calibration
    from cvt_deploy.export.int8 import quantize_int8

    if "plan" not in inspect.signature(quantize_int8).parameters:
        pytest.skip("this quantize_int8 keeps no layer float")
    int8, fp32 = graphs(planted_int8.bundle)
    bundle = Bundle.open(planted_int8.bundle)
    calib, _ = load_calibration(None, bundle.config, 64, progress=False)  # what the bundle was calibrated on
    quantize_int8(fp32, tmp_path / "excluded.onnx", calib, plan=int8_plan.plan_int8(fp32, [planted_int8.module]),
                  progress=False)
    keep_float(int8, fp32, [planted_int8.module], tmp_path / "edited.onnx")
    x = bundle_images(bundle)
    np.testing.assert_array_equal(logits(tmp_path / "excluded.onnx", x), logits(tmp_path / "edited.onnx", x))


def test_the_cache_resumes_a_ranking(planted_int8: Any, tmp_path: Path) -> None:
    names = ["stage2.blocks.2.mlp.fc1", "head"]
    first = rank_int8_layers(planted_int8.bundle, layers=names, cache=tmp_path, limit=16, progress=False)
    (cache,) = tmp_path.glob("sensitivity-*.json")
    again = rank_int8_layers(planted_int8.bundle, layers=names, cache=tmp_path, limit=16, progress=False)
    assert first.cached == 0 and again.cached == 2 and again.rows == first.rows
    other = rank_int8_layers(planted_int8.bundle, layers=names, cache=tmp_path, limit=8, progress=False)
    assert other.cached == 0  # other images: measured again, in a file of their own
    cache.write_text("{not json")
    damaged = rank_int8_layers(planted_int8.bundle, layers=names, cache=tmp_path, limit=16, progress=False)
    assert damaged.cached == 0 and damaged.rows == first.rows


def test_refusals(planted_int8: Any, tmp_path: Path) -> None:
    int8, fp32 = graphs(planted_int8.bundle)
    with pytest.raises(CvtDeployError, match="fp32 graph it was quantized from"):
        rank_int8_layers(int8)
    with pytest.raises(CvtDeployError, match="brings its own fp32 graph"):
        rank_int8_layers(planted_int8.bundle, fp32)
    with pytest.raises(CvtDeployError, match="no layer of this model"):
        rank_int8_layers(planted_int8.bundle, layers=["stage9.nothing"], progress=False)
    with pytest.raises(CvtDeployError, match="has no quantized layer"):
        rank_int8_layers(fp32, fp32, data=np.zeros((2, 3, 64, 64), np.float32), progress=False)
    # an fp32 graph that is not the one quantized (same names and shapes, other weights) is refused
    import onnx
    from onnx import numpy_helper

    other = onnx.load(str(fp32))
    for init in other.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(w * 1.5, init.name))
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(CvtDeployError, match="not the graph this int8 graph was quantized from"):
        rank_int8_layers(int8, tmp_path / "other.onnx", layers=[planted_int8.module], progress=False)


# --- cvt-check --rank-int8 -----------------------------------------------------------------

@pytest.fixture
def rank_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where cvt-check --rank-int8 caches per-layer results: under tmp_path, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "cvt-deploy" / "sensitivity"


def check_main(*argv: str) -> int:
    from cvt_deploy.cli import check

    return check.main(list(argv))


def test_cvt_check_ranks_the_planted_layer_first_then_reads_the_cache(planted_int8: Any, rank_cache: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import re

    bundle, module = str(planted_int8.bundle), planted_int8.module
    assert check_main("--bundle", bundle, "--rank-int8", "--limit", "16", "-q") == 0
    out = capsys.readouterr().out
    first = re.search(r"^ +1 +(\S+) +node_", out, re.M)
    assert first and first.group(1) == module, out
    assert "(every layer int8)" in out and re.search(r"ranked \d+ layer\(s\) in [\d.]+ s, 0 from the cache", out), out
    (next_line,) = [line for line in out.splitlines() if line.startswith("next: ")]
    assert next_line.startswith("next: cvt-export --weights ") and "--precision int8" in next_line, next_line
    assert next_line.endswith(f"--int8-keep-float {module} --out {bundle}"), next_line
    assert "--int8-keep-float auto" in out
    assert len(list(rank_cache.glob("sensitivity-*.json"))) == 1

    assert check_main("--bundle", bundle, "--rank-int8", "--limit", "16", "-q", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"][0]["module"] == module and got["rows"][0]["rank"] == 1
    assert got["cached"] == len(got["rows"]) > 50 and got["images"] == 16  # every layer from the cache


def test_cvt_check_gives_no_advice_where_int8_already_meets_its_gates(demo_full_bundle: Path, rank_cache: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's int8 passes (its parity is recorded): the table says where its error comes from, and
    the command does not tell the user to keep a layer float."""
    assert check_main("--bundle", str(demo_full_bundle), "--rank-int8", "--rank-layers", "head", "--limit", "8",
                      "-q") == 0
    out = capsys.readouterr().out
    assert "already meets its gates" in out and "next:" not in out, out


def test_cvt_check_rank_layers_ranks_only_those(planted_int8: Any, rank_cache: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main("--bundle", str(planted_int8.bundle), "--rank-int8", "--rank-layers", planted_int8.module,
                      "--backend", "onnxruntime", "--limit", "16", "-q", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["module"] for r in rows] == [planted_int8.module]


@pytest.mark.parametrize("extra, flag", [
    (["--tensorrt", "10"], "--tensorrt"), (["--layers"], "--layers"), (["--plot", "x.png"], "--plot x.png"),
    (["--device", "cuda"], "--device cuda"), (["--preprocess", "deepstream"], "--preprocess deepstream"),
    (["--precision", "int8"], "--precision int8"), (["--backend", "onnxruntime,openvino"], "--backend openvino"),
    (["--limit", "0"], "--limit 0")])
def test_cvt_check_rank_int8_refuses_what_cannot_apply(planted_int8: Any, rank_cache: Path, extra: list[str],
                                                        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main("--bundle", str(planted_int8.bundle), "--rank-int8", "-q", *extra) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err or f"and {flag} are" in err, err
    assert "fix:" in err and not rank_cache.exists()


def test_cvt_check_rank_layers_needs_rank_int8(planted_int8: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main("--bundle", str(planted_int8.bundle), "--rank-layers", "head") == 2
    assert "--rank-layers chooses the layers --rank-int8 ranks" in capsys.readouterr().err


def test_cvt_check_rank_int8_without_an_int8_graph(planted_int8: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    bundle = tmp_path / "fp32"
    shutil.copytree(planted_int8.bundle, bundle, ignore=shutil.ignore_patterns("*int8*"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"] = {k: v for k, v in manifest["artifacts"].items() if v["precision"] != "int8"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert check_main("--bundle", str(bundle), "--rank-int8", "-q") == 2
    err = capsys.readouterr().err
    assert f"{bundle} has no int8 ONNX graph to rank" in err, err
    assert "fix: export it with one: cvt-export --weights " in err and f"--precision int8 --out {bundle}" in err


def test_the_layer_table_points_at_the_planted_layer_first(planted_int8: Any) -> None:
    """cvt-check --layers on the planted model: the first jump is the layer whose input carries the
    outliers, not the one that made them (its output is right: only its consumer's int8 breaks)."""
    from cvt_deploy.layers import check_layers

    reports = check_layers(Bundle.open(planted_int8.bundle), precisions=["int8"], limit=64, progress=False)
    assert {r.artifact for r in reports} == {"onnx-int8", "onnx-int8-tensorrt-10"}
    for report in reports:  # the Q/DQ graph, and the same with fp16 outside Q/DQ
        jump = report.first_jump
        assert jump is not None and jump.module == planted_int8.module, str(report)
        rows = {r.module: r for r in report.rows if r.module}
        assert rows[planted_int8.source].min_cosine > 0.99 > 0.5 > rows[planted_int8.module].min_cosine
