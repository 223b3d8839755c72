"""``--int8-keep-float auto`` (export/int8_auto.py) on a model whose int8 truly breaks: the demo model
with outlier channels planted in one attention's output projection (conftest planted_int8).

The default int8 export of that model misses its gate (tests/test_sensitivity.py shows it, and the
slow test there runs the whole export); here ``auto`` finds the planted layer, keeps it (and only
it) float, and every int8 graph of the bundle then meets the gate on ONNX Runtime and OpenVINO.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import refused, run_cli  # noqa: E402

from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.int8_auto import auto_plan, check_max_drop, explain, trial_gates  # noqa: E402
from cvt_deploy.export.int8_plan import Int8Plan  # noqa: E402
from cvt_deploy.export.pipeline import ExportOptions  # noqa: E402
from cvt_deploy.parity import GATES  # noqa: E402

OPENVINO = importlib.util.find_spec("openvino") is not None


def _check_data(cfg: Any, labels: bool = True) -> Any:
    from cvt_deploy.data import EvalData, load_eval_data

    ev = load_eval_data(None, cfg, progress=False)
    return ev if labels else EvalData(ev.images, None, f"{ev.description}, labels dropped")


@pytest.fixture(scope="module")
def auto_export(planted_int8: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, str]:
    """The planted model exported with ``auto`` as cvt-export does it (checked on ONNX Runtime and, where
    installed, OpenVINO), on 128 check images; the torch exporter is replaced by a copy of the same
    model's graph (the fixture's)."""
    from cvt_deploy.bundle import atomic_output
    from cvt_deploy.export.pipeline import export_bundle

    def export_onnx(model: Any, path: Any, **kw: Any) -> Path:
        assert model is planted_int8.model
        with atomic_output(path) as tmp:
            shutil.copyfile(planted_int8.bundle / "model.onnx", tmp)
        return Path(path)

    out = tmp_path_factory.mktemp("auto") / "bundle"
    import contextlib
    import io

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr("cvt_deploy.export.pipeline.export_onnx", export_onnx)
        patch.setenv("XDG_CACHE_HOME", str(out.parent / "cache"))
        result = export_bundle(planted_int8.model, out, precisions=("fp32", "int8"), calib_count=64, check_limit=128,
                               int8_keep_float=("auto",), rtx_build=False, time_cpu=False)
    return result, out, err.getvalue()


def test_auto_keeps_the_planted_layer_float_and_every_int8_graph_meets_its_gate(planted_int8: Any,
                                                                                auto_export: Any) -> None:
    result, out, _ = auto_export
    int8 = [r for r in result.reports if r.precision == "int8"]
    backends = {r.backend for r in int8}
    assert backends == ({"onnxruntime", "openvino"} if OPENVINO else {"onnxruntime"}), backends
    # on ONNX Runtime: portable, int8+fp16, ONNX Runtime CPU; on OpenVINO: the portable graph, with its own
    # int8 kernels (its IR follows model.int8.onnx: tests/test_int8_plan.py)
    assert len(int8) == (4 if OPENVINO else 3), [r.candidate for r in int8]
    assert all(int8), [(r.candidate, r.failed) for r in int8 if not r]
    assert min(r.min_cosine for r in int8) > 0.99  # the default int8 graph: 0.52 on these 128 images


def test_the_manifest_says_which_layer_and_why_on_every_int8_artifact(planted_int8: Any, auto_export: Any) -> None:
    _, out, _ = auto_export
    artifacts = json.loads((out / "manifest.json").read_text())["artifacts"]
    int8 = {name: a for name, a in artifacts.items() if a["precision"] == "int8"}
    assert {"onnx-int8", "onnx-int8-tensorrt-10", "onnx-int8-onnxruntime-cpu"} <= set(int8)
    for art in int8.values():
        assert art["parity"]["passed"]
        plan = art["int8_plan"]
        assert plan["keep_float"] == ["auto"]
        assert list(plan["modules"].values()) == [planted_int8.module] and len(plan["nodes"]) == 1
        auto = plan["auto"]
        assert [c["module"] for c in auto["chosen"]] == [planted_int8.module] and auto["chosen"][0]["rank"] == 1
        assert auto["chosen"][0]["gain"] > 0.9
        assert [(t["layers"], t["passed"]) for t in auto["trials"]] == [(0, False), (1, True)]
        assert auto["result"]["layers"] == 1 and auto["result"]["min_cosine"] >= GATES["int8"].min_cosine
        assert auto["ranked"]["layers"] > 50 and auto["images"] == 128


def test_the_export_says_what_it_chose(planted_int8: Any, auto_export: Any) -> None:
    _, _, err = auto_export
    import re

    before = re.search(r"0 layers float: min cosine (-?[0-9.]+)", err)
    assert before and float(before.group(1)) < 0.9 and "misses: min cosine" in err, err
    assert "1 layer float:" in err and "meets the gates" in err
    table = err[err.index("auto: kept float"):]
    assert planted_int8.module in table.splitlines()[3] and "with them float: min cosine 0.99" in table


def test_a_model_whose_int8_holds_keeps_nothing_more_and_ranks_nothing(demo_full_bundle: Path, demo_model: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kw: Any) -> None:
        raise AssertionError("ranked a graph that meets its gates")

    monkeypatch.setattr("cvt_deploy.sensitivity.rank_int8_layers", never)
    from cvt_deploy.export.int8_plan import plan_int8

    base = plan_int8(demo_full_bundle / "model.onnx", ["head"])  # what the user named stays named
    plan = auto_plan(demo_full_bundle / "model.int8.onnx", demo_full_bundle / "model.onnx", base,
                     _check_data(demo_model.cfg), progress=False)
    assert plan.nodes == base.nodes and plan.modules == {base.nodes[0]: "head"}
    assert plan.keep_float == ("head", "auto")
    assert plan.auto is not None and plan.auto["ranked"] is None and plan.auto["chosen"] == []
    assert [(t["layers"], t["passed"]) for t in plan.auto["trials"]] == [(0, True)]
    assert "nothing more is kept float" in explain(plan)


@pytest.mark.slow  # 8 s: the search goes to ~30 layers
def test_max_drop_keeps_more_layers_float_until_it_holds(planted_int8: Any, tmp_path: Path) -> None:
    """Without labels, ``max_drop`` bounds top-1 disagreement: 0 asks for every image's top-1 as fp32's,
    which one layer float does not give here (99.72% on an AVX-512 VNNI CPU, where 29 did): the search
    keeps more, the fewest it finds (the ranking on 16 images: the planted layer still leads)."""
    ev = _check_data(planted_int8.model.cfg, labels=False)
    plan = auto_plan(planted_int8.bundle / "model.int8.onnx", planted_int8.bundle / "model.onnx", Int8Plan(), ev,
                     max_drop=0.0, rank_images=16, cache=tmp_path, progress=False)
    auto = plan.auto
    assert auto is not None and auto["gates"]["min_top1_agreement"] == 1.0 and auto["ranked"]["images"] == 16
    k = auto["result"]["layers"]
    assert len(plan.nodes) == k and auto["result"]["top1_agreement"] == 1.0
    passed = {t["layers"]: t["passed"] for t in auto["trials"]}
    assert passed[k] and passed[k - 1] is False, auto["trials"]  # the fewest: one layer less misses
    assert auto["chosen"][0]["module"] == planted_int8.module
    assert [c["rank"] for c in auto["chosen"]] == list(range(1, k + 1))


def test_trial_gates() -> None:
    g = GATES["int8"]
    assert trial_gates(None, True) == g and trial_gates(None, False) == g
    assert trial_gates(0.5, True).max_accuracy_drop == 0.5 and trial_gates(0.5, True).min_cosine == g.min_cosine
    assert trial_gates(0.5, False).min_top1_agreement == pytest.approx(0.995)
    assert trial_gates(0.5, False).max_accuracy_drop == g.max_accuracy_drop


@pytest.mark.parametrize("value, words", [(-0.1, "is not a number of percentage points >= 0"),
                                          (math.nan, "is not a number"), (True, "is not a number"),
                                          ("0.5", "is not a number"), (1.5, "looser than the int8 gate (1 points)")])
def test_max_drop_refusals(value: Any, words: str) -> None:
    with pytest.raises(CvtDeployError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_max_drop(value, 1.0)
    assert check_max_drop(0, 1.0) == 0.0 and check_max_drop(None, 1.0) is None


def test_export_options() -> None:
    assert ExportOptions(precisions=("int8",), int8_keep_float="auto").int8_auto
    assert ExportOptions(precisions=("int8",), int8_keep_float="head,auto", int8_max_drop=0.25).int8_max_drop == 0.25
    assert not ExportOptions(precisions=("int8",), int8_keep_float="head").int8_auto
    with pytest.raises(CvtDeployError, match="bounds what --int8-keep-float auto chooses"):
        ExportOptions(precisions=("int8",), int8_keep_float="head", int8_max_drop=0.5)
    with pytest.raises(CvtDeployError, match="looser than the int8 gate"):
        ExportOptions(precisions=("int8",), int8_keep_float="auto", int8_max_drop=2)


@pytest.mark.parametrize("args, words", [
    (["--int8-max-drop", "0.5"], ["--int8-max-drop has no effect here: no int8 graph is exported"]),
    (["--precision", "int8", "--int8-max-drop", "0.5"], ["--int8-max-drop (int8_max_drop) bounds what",
                                                         "add --int8-keep-float auto"]),
    (["--precision", "int8", "--int8-keep-float", "auto", "--int8-max-drop", "-1"], ["--int8-max-drop -1.0"]),
])
def test_cli_refusals_before_any_work(no_work: None, args: list[str], words: list[str]) -> None:
    refused(run_cli("cvt-export", *args, "--out", "never"), *words)


@pytest.mark.parametrize("value", ["x", "nan", "1e999"])
def test_cli_takes_a_finite_number(no_work: None, value: str) -> None:
    proc = run_cli("cvt-export", "--precision", "int8", "--int8-keep-float", "auto", "--int8-max-drop", value,
                   "--out", "never")
    assert proc.returncode == 2 and "argument --int8-max-drop" in proc.stderr and "Traceback" not in proc.stderr


def test_the_trials_are_the_graphs_they_stand_for(planted_int8: Any, tmp_path: Path) -> None:
    """The export quantizes the chosen plan for real: its logits are the trial's (keep_float edits
    the graph as the quantizer would), so what auto measured is what the bundle holds."""
    from cvt_deploy.calibration import load_calibration
    from cvt_deploy.export.int8 import quantize_int8
    from cvt_deploy.export.int8_plan import plan_int8
    from cvt_deploy.sensitivity import graph_logits, keep_float

    fp32, int8 = planted_int8.bundle / "model.onnx", planted_int8.bundle / "model.int8.onnx"
    batch, _ = load_calibration(None, planted_int8.model.cfg, 64, progress=False)
    quantize_int8(fp32, tmp_path / "real.onnx", batch, plan=plan_int8(fp32, [planted_int8.module]),
                  cache=tmp_path / "calib", progress=False)
    keep_float(int8, fp32, [planted_int8.module], tmp_path / "trial.onnx")
    x = _check_data(planted_int8.model.cfg).images[:64]
    np.testing.assert_array_equal(graph_logits(tmp_path / "real.onnx", x), graph_logits(tmp_path / "trial.onnx", x))


@pytest.mark.slow
def test_the_default_int8_export_of_the_planted_model_misses_its_gate(planted_int8: Any, tmp_path: Path) -> None:
    """The whole export, as cvt-export runs it: its int8 gate refuses the planted model, and nothing
    is written (with ``auto``, the fixture above, it passes)."""
    from cvt_deploy.export.pipeline import export_bundle
    from cvt_deploy.parity import ParityFailure

    with pytest.raises(ParityFailure) as e:
        export_bundle(planted_int8.model, tmp_path / "default", precisions=("fp32", "int8"), calib_count=64,
                      time_cpu=False, progress=False)
    missed = [r for r in e.value.reports if r.precision == "int8" and not r]
    assert missed and all(r.min_cosine < 0.98 for r in missed), [(r.candidate, r.failed) for r in missed]
    assert not (tmp_path / "default").exists()


@pytest.mark.slow
def test_cvt13_auto_layers_and_ranking(cvt13_export: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CvT-13 (224 px, random weights: its int8 holds) exported with ``auto``, then the layer table and
    the ranking of its 121 quantized layers: each runs and reports (16 check images here; the times
    for 64 are in docs/precision.md)."""
    from cvt_deploy.export.pipeline import export_bundle

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "cvt13"
    export_bundle(cvt13_export.model, out, precisions=("fp32", "int8"), calib_count=16, check_limit=16,
                  int8_keep_float=("auto",), ort_cpu=False, rtx_build=False, time_cpu=False, progress=False)
    plan = json.loads((out / "manifest.json").read_text())["artifacts"]["onnx-int8"]["int8_plan"]
    assert plan["keep_float"] == ["auto"] and plan["auto"]["images"] == 16
    assert plan["nodes"] == [c["node"] for c in plan["auto"]["chosen"]]
    assert plan["auto"]["trials"][-1]["passed"] or plan["auto"]["result"]["layers"] > 0

    proc = run_cli("cvt-check", "--bundle", str(out), "--layers", "--precision", "int8", "--limit", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = next(r for r in json.loads(proc.stdout) if r["artifact"] == "onnx-int8")
    modules = [row["module"] for row in report["layers"]]
    assert "stage2.blocks.9" in modules and report["layers"][-1]["kind"] == "logits", modules[-5:]
    assert report["images"] == 8 and all(row["min_cosine"] is not None for row in report["layers"])

    proc = run_cli("cvt-check", "--bundle", str(out), "--rank-int8", "--limit", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranking = json.loads(proc.stdout)
    assert len(ranking["rows"]) == 121 and ranking["images"] == 8 and ranking["cuts"] > 1
    assert all(-1 <= r["min_cosine"] <= r["mean_cosine"] <= 1 for r in ranking["rows"])


def test_data_and_limit_count_for_auto_even_without_the_gates(no_work: None, tmp_path: Path) -> None:
    """--no-check skips the gates, not auto's trials: --data and --limit still choose their images."""
    args = ["--precision", "int8", "--no-check", "--data", str(tmp_path), "--limit", "64", "--out", "never"]
    refused(run_cli("cvt-export", *args), "--data, --limit", "no effect", "--no-check")
    proc = run_cli("cvt-export", *args, "--int8-keep-float", "auto")
    assert "no effect" not in proc.stderr and "ran before the refusal" in proc.stderr, proc.stderr[-2000:]
