"""int8 calibration (export/calibrate.py): ONNX Runtime's own ranges, from statistics computed
inside the graph in one pass, so the int8 graphs are the ones its calibrator made, in seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cvt_deploy.export import calibrate as cal  # noqa: E402
from cvt_deploy.export import int8  # noqa: E402


def _ort_ranges(src: Path, batches: list[np.ndarray], method: str) -> dict[str, tuple[float, float]]:
    """ONNX Runtime's calibrator, fed one batch per collect as quantize_int8 fed it (CalibStridedMinMax)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    extra = {"symmetric": True, "percentile": int8.PERCENTILE} if method == "percentile" else {}
    calibrator = create_calibrator(src, list(int8.QUANTIZED_OPS), augmented_model_path=str(src.with_name("aug.onnx")),
                                   calibrate_method={"percentile": CalibrationMethod.Percentile,
                                                     "minmax": CalibrationMethod.MinMax}[method], extra_options=extra)
    name = calibrator.infer_session.get_inputs()[0].name
    for batch in batches:
        calibrator.collect_data(_One(name, batch))
    return {k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0]))
            for k, v in calibrator.compute_data().items()}


class _One:
    def __init__(self, name: str, batch: np.ndarray) -> None:
        self.item: dict[str, np.ndarray] | None = {name: batch}

    def get_next(self) -> dict[str, np.ndarray] | None:
        item, self.item = self.item, None
        return item


def _absmax(r: tuple[float, float]) -> float:
    return max(abs(r[0]), abs(r[1]))


@pytest.fixture(scope="module")
def demo_2d(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[np.ndarray]]:
    """The demo fp32 graph as quantize_int8 calibrates it (2-D token GEMMs), its tensors and batches."""
    import onnx

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.calibration import load_calibration
    from cvt_deploy.export.portable import flatten_weight_matmuls

    model = onnx.load(str(demo_bundle / "model.onnx"))
    excluded = int8._activation_matmuls(model)
    flatten_weight_matmuls(model)
    src = tmp_path_factory.mktemp("calib") / "fp32-2d.onnx"
    onnx.save(model, str(src))
    calib, _ = load_calibration(None, Bundle.open(demo_bundle).config, 96, progress=False)
    return src, cal.tensors_to_calibrate(model, int8.QUANTIZED_OPS, excluded), int8._calib_batches(calib, None)


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_the_ranges_are_onnxruntimes_own(demo_2d: tuple[Path, list[str], list[np.ndarray]], method: str) -> None:
    src, tensors, batches = demo_2d
    ours = cal.calibrate(src, batches, tensors, method, percentile=int8.PERCENTILE if method == "percentile" else None)
    theirs = _ort_ranges(src, batches, method)
    assert set(ours) == set(tensors) and set(tensors) < set(theirs)  # theirs: every input and output of the ops
    assert not any("attn" in t.lower() and "matmul" in t.lower() for t in tensors)
    for t in tensors:
        # what the symmetric quantizer takes of a range: its largest magnitude (scale = that / 127);
        # the same float32 (both run the graph unoptimized; rel=1e-6 leaves room for another CPU's kernels)
        assert _absmax(ours[t]) == pytest.approx(_absmax(theirs[t]), rel=1e-6), (t, ours[t], theirs[t])


def _matmul_graph(path: Path, width: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], [w])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("where", ["first batch", "last batch", "spread", "below the first edge"])
def test_the_percentile_tail_is_found_whichever_batch_holds_it(tmp_path: Path, where: str) -> None:
    """Every value above the percentile may sit in one batch; values below the first batch's
    smallest |x| (which ONNX Runtime's histogram leaves out) move its percentile."""
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((4000, 32)).astype(np.float32) for _ in range(6)]
    if where == "first batch":
        batches[0][:40] *= 50
    elif where == "last batch":
        batches[-1][:40] *= 50
    elif where == "spread":
        for b in batches:
            b[:7] *= 50
    else:
        batches[0] += np.sign(batches[0]) * 0.5  # the first batch's |x| starts at 0.5: later ones reach below
    _matmul_graph(tmp_path / "g.onnx", 32)
    ours = cal.calibrate(tmp_path / "g.onnx", batches, ["x"], "percentile", percentile=99.99)
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector("percentile", symmetric=True, num_bins=2048, num_quantized_bins=128,
                                   percentile=99.99, scenario="same")
    for b in batches:
        collector.collect({"x": [b]})
    lo, hi = collector.compute_collection_result()["x"][:2]
    assert _absmax(ours["x"]) == pytest.approx(max(abs(float(lo)), abs(float(hi))), rel=1e-6)


def test_quantize_int8_makes_the_graph_onnxruntimes_calibrator_made(demo_bundle: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The product path (ours) and ONNX Runtime's calibrator give the same quantization scales."""
    import onnx
    from onnx import numpy_helper

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.calibration import load_calibration

    calib, _ = load_calibration(None, Bundle.open(demo_bundle).config, 64, progress=False)
    ours = int8.quantize_int8(demo_bundle / "model.onnx", tmp_path / "ours.onnx", calib, progress=False)
    monkeypatch.setattr(int8, "CALIBRATED_HERE", ())
    theirs = int8.quantize_int8(demo_bundle / "model.onnx", tmp_path / "theirs.onnx", calib, progress=False)
    assert ours["calibrator"].startswith("cvt-deploy") and theirs["calibrator"] == "onnxruntime"

    def scales(path: Path) -> dict[str, Any]:
        model = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return {n.input[1]: inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"}

    a, b = scales(tmp_path / "ours.onnx"), scales(tmp_path / "theirs.onnx")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
    assert {k: v for k, v in ours.items() if k != "calibrator"} == {k: v for k, v in theirs.items() if k != "calibrator"}


def test_calibration_progress_in_a_log_counts_images_and_time_left(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where stderr is not a terminal (a log, CI) a long calibration still says where it is."""
    from cvt_deploy import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    _matmul_graph(tmp_path / "g.onnx", 8)
    batches = [np.ones((5, 8), np.float32)] * 3
    with progress.stage("quantizing"):
        bar = progress.Progress(15, "  calibrating", unit="images")
        cal.calibrate(tmp_path / "g.onnx", batches, ["x"], "minmax", progress=bar)
        bar.close()
    err = capsys.readouterr().err
    assert "quantizing ...\n" in err and "  calibrating: 5/15 images in 0s, about 0s left\n" in err, err
    assert "  calibrating: 15/15 images" in err and "\nquantizing: done in " in err, err
