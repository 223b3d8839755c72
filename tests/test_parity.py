"""Parity metrics and gates: compare() on constructed logits, report truthiness, the tables,
JSON, and check_runtime on real runtimes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cvt_deploy.errors import CvtDeployError
from cvt_deploy.parity import GATES, Gates, ParityReport, compare, summary_table


def ref_logits(n: int = 6, c: int = 10, seed: int = 0) -> np.ndarray:
    """Logits whose top-1 leads the runner-up by at least 1 (so small noise cannot flip it)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c))
    top = x.argmax(1)
    x[np.arange(n), top] = np.sort(x, 1)[:, -2] + 1.0 + rng.random(n)
    return x


# --- metrics ---------------------------------------------------------------------------------


def test_identical_logits():
    ref = ref_logits()
    r = compare(ref, ref.copy())
    assert r.max_abs == r.mean_abs == r.max_rel == 0.0
    assert r.min_cosine == pytest.approx(1.0, abs=1e-12)
    assert r.top1_agreement == r.top5_overlap == 1.0
    assert r.images == 6 and r.precision == "fp32"
    assert r and not r.failed


def test_known_max_abs_mean_abs_and_relative_error():
    ref = ref_logits()
    cand = ref.copy()
    cand[2, 5] += 0.25
    cand[4, 1] -= 0.1
    r = compare(ref, cand)
    assert r.max_abs == pytest.approx(0.25)
    assert r.mean_abs == pytest.approx(0.35 / ref.size)
    expected_rel = max(0.25 / np.abs(ref[2]).max(), 0.1 / np.abs(ref[4]).max())
    assert r.max_rel == pytest.approx(expected_rel)


def test_cosine_is_per_image_minimum():
    ref = ref_logits(n=4)
    cand = ref.copy()
    cand[0] *= 3.0           # same direction: cosine 1, large abs error
    cand[1] = -ref[1]        # opposite: cosine -1
    r = compare(ref, cand)
    assert r.min_cosine == pytest.approx(-1.0)
    r0 = compare(ref[:1], cand[:1])
    assert r0.min_cosine == pytest.approx(1.0)
    assert r0.max_abs == pytest.approx(2 * np.abs(ref[0]).max())
    # Orthogonal rows: cosine 0.
    a = np.array([[1.0, 0.0, 0.0]])
    assert compare(a, np.array([[0.0, 1.0, 0.0]]), gates=Gates()).min_cosine == pytest.approx(0.0)


def test_top1_agreement_and_top5_overlap():
    ref = ref_logits(n=8, c=10)
    cand = ref.copy()
    for row in (1, 6):  # swap the top-1 and the lowest class in two of eight images
        order = np.argsort(-ref[row])
        cand[row, order[0]], cand[row, order[-1]] = ref[row, order[-1]], ref[row, order[0]]
    r = compare(ref, cand)
    assert r.top1_agreement == pytest.approx(6 / 8)
    # In those rows the top-5 sets share 4 of 5 classes.
    assert r.top5_overlap == pytest.approx((6 + 2 * 4 / 5) / 8)


def test_fewer_than_five_classes():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    cand = np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    r = compare(ref, cand, gates=Gates())
    assert r.top5_overlap == 1.0  # with 3 classes, "top-5" is all of them
    assert r.top1_agreement == 0.5


def test_accuracy_from_labels():
    ref = ref_logits(n=10)
    labels = ref.argmax(1).copy()
    labels[0] = (labels[0] + 1) % 10  # the reference gets 9 of 10 right
    cand = ref.copy()
    for row in (1, 2):  # the candidate also loses two that the reference had right
        cand[row, labels[row]] = -10.0
    r = compare(ref, cand, labels, precision="int8")
    assert r.accuracy_reference == pytest.approx(0.9)
    assert r.accuracy_candidate == pytest.approx(0.7)
    assert r.accuracy_drop == pytest.approx(20.0)  # percentage points
    assert ("accuracy drop (points)", pytest.approx(20.0), "<=", 1.0, False) == r.checks[-1]
    assert not r
    assert compare(ref, cand).accuracy_drop is None  # no labels, no accuracy


# --- gates -----------------------------------------------------------------------------------


def test_big_error_is_falsy_and_names_the_failed_gate():
    ref = ref_logits()
    cand = ref.copy()
    cand[3, 0] += 0.5
    r = compare(ref, cand)
    assert not r
    assert bool(r) is False
    assert r.failed[0] == "max |diff| 0.5 (must be <= 0.001)"
    assert not any(f.startswith("top-1") for f in r.failed)
    verdicts = {name: ok for name, _, _, _, ok in r.checks}
    assert verdicts["max |diff|"] is False and verdicts["top-1 agreement"] is True
    assert "FAIL" in summary_table([r]) and "PASS" not in summary_table([r])
    assert "gates (fp32): FAIL: max |diff|" in str(r)
    d = r.to_dict()
    assert d["passed"] is False


def test_truthy_when_every_gate_holds():
    ref = ref_logits()
    r = compare(ref, ref + 1e-6, candidate_name="onnxruntime fp32 on cpu", reference_name="torch", data="demo")
    assert r
    assert r.failed == []
    assert [c[0] for c in r.checks] == ["max |diff|", "min cosine", "top-1 agreement"]
    table = summary_table([r])
    assert "PASS" in table and "FAIL" not in table and "onnxruntime fp32 on cpu" in table
    text = str(r)
    assert "gates (fp32): PASS" in text and "onnxruntime fp32 on cpu vs torch on 6 images (demo)" in text
    d = r.to_dict()
    assert d["passed"] is True
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert d["checks"][0] == {"name": "max |diff|", "value": pytest.approx(1e-6), "op": "<=", "limit": 1e-3, "ok": True}


def test_summary_table_mixes_pass_and_fail():
    ref = ref_logits()
    good, bad = compare(ref, ref, candidate_name="good"), compare(ref, ref + 1.0, candidate_name="bad")
    lines = summary_table([good, bad]).splitlines()
    assert "gates" in lines[0]
    assert lines[2].startswith("good") and lines[2].rstrip().endswith("PASS")
    assert lines[3].startswith("bad") and lines[3].rstrip().endswith("FAIL")


def test_gates_follow_the_precision():
    ref = ref_logits()
    cand = ref * 1.001  # max |diff| ~ 1e-3 * |logit|: too far for fp32, fine for fp16 and int8
    assert compare(ref, cand).max_abs > GATES["fp32"].max_abs
    assert not compare(ref, cand, precision="fp32")
    assert compare(ref, cand, precision="fp16")
    assert compare(ref, cand, precision="int8")
    assert [c[0] for c in compare(ref, cand, precision="int8").checks] == ["min cosine"]
    # An unknown precision is judged by the strictest gates.
    assert not compare(ref, cand, precision="bf16")


def test_explicit_gates_and_ungated_metrics():
    ref = ref_logits()
    cand = ref + 0.5
    assert compare(ref, cand, gates=Gates(max_abs=1.0))
    assert not compare(ref, cand, gates=Gates(max_abs=0.4))
    empty = compare(ref, cand, gates=Gates())
    assert empty.checks == [] and empty  # nothing gated: vacuously passing
    assert not compare(ref, ref + 1e-9, gates=Gates(max_abs=0.0))


def test_monkeypatched_gates_are_used_by_default(monkeypatch):
    ref = ref_logits()
    monkeypatch.setitem(GATES, "fp32", Gates(max_abs=0.0))
    r = compare(ref, ref + 1e-9)
    assert not r and r.failed[0].startswith("max |diff|")


def test_bad_shapes_and_non_finite_candidates():
    ref = ref_logits()
    with pytest.raises(CvtDeployError, match="logit shapes differ"):
        compare(ref, ref[:, :5])
    with pytest.raises(CvtDeployError, match="logit shapes differ"):
        compare(ref[0], ref[0])
    cand = ref.copy()
    cand[1, 1] = np.nan
    cand[4, 0] = np.inf
    with pytest.raises(CvtDeployError, match="NaN/inf logits on 2 images"):
        compare(ref, cand, candidate_name="x")


def test_report_dataclass_defaults_are_falsy_free():
    r = ParityReport("c", "r", "fp32", 1, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    assert r and r.accuracy_drop is None and r.to_dict()["passed"] is True


# --- on real runtimes --------------------------------------------------------------------------


def test_check_runtime_onnxruntime_against_torch(demo_bundle, demo_test_split):
    pytest.importorskip("torch")
    from cvt_deploy.parity import check_runtime, run_batches
    from cvt_deploy.preprocess import preprocess
    from cvt_deploy.backends import load

    cand = load(demo_bundle, backend="onnxruntime")
    ref = load(demo_bundle, backend="torch")
    split = demo_test_split.head(40)
    batch = preprocess(list(split.images), cand.config.preprocess)
    chunked = run_batches(cand, batch, chunk=16, progress=False)  # 16 + 16 + 8
    np.testing.assert_allclose(chunked, cand.run(batch), atol=1e-6)
    r = check_runtime(cand, ref, batch, split.labels, data="demo", progress=False)
    assert r, r.failed
    # on the CPU, load() runs the bundle's ONNX Runtime CPU graph, and says so
    assert r.candidate == "onnxruntime fp32 on cpu (onnxruntime-cpu graph)" and r.reference == "torch fp32 on cpu"
    assert r.max_abs <= 1e-4 and r.top1_agreement == 1.0
    assert r.accuracy_candidate == r.accuracy_reference >= 0.97
    assert r.accuracy_drop == 0.0


# --- evaluation data (data.load_eval_data) -------------------------------------------------------


@pytest.fixture
def digit_folder(tmp_path, demo_test_split):
    """The first 20 held-out digits as PNGs in one sub-folder per class."""
    from PIL import Image

    root = tmp_path / "digits"
    for i in range(20):
        label = str(demo_test_split.labels[i])
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo_test_split.images[i]).save(root / label / f"{i:02d}.png")
    return root


def test_eval_data_demo_split(demo_model):
    from cvt_deploy.data import load_eval_data

    ev = load_eval_data(None, demo_model.cfg, limit=50, progress=False)
    assert ev.batch.shape == (50, 3, 64, 64) and ev.batch.dtype == np.float32
    assert ev.labels is not None and len(ev.labels) == 50
    other = demo_model.cfg.replace(labels=tuple("abcdefghij"))
    unlabelled = load_eval_data(None, other, limit=10, progress=False)
    assert unlabelled.labels is None and "agreement only" in unlabelled.description


def test_eval_data_labelled_folder(demo_model, digit_folder, demo_test_split):
    from cvt_deploy.data import load_eval_data

    ev = load_eval_data(digit_folder, demo_model.cfg, progress=False)
    assert len(ev) == 20 and "labelled" in ev.description
    assert sorted(ev.labels.tolist()) == sorted(demo_test_split.labels[:20].tolist())
    # Folder names may be class indices too: the demo's labels are "0".."9", so rename to prove
    # the index path with labels that are not digits.
    named = demo_model.cfg.replace(labels=tuple(f"digit-{i}" for i in range(10)))
    assert load_eval_data(digit_folder, named, progress=False).labels.tolist() == ev.labels.tolist()


def test_eval_data_folder_errors(demo_model, digit_folder, tmp_path):
    from PIL import Image

    from cvt_deploy.data import load_eval_data

    with pytest.raises(CvtDeployError, match="is not a folder"):
        load_eval_data(tmp_path / "missing", demo_model.cfg, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvtDeployError, match="no images"):
        load_eval_data(tmp_path / "empty", demo_model.cfg, progress=False)
    Image.new("RGB", (8, 8)).save(digit_folder / "loose.png")
    with pytest.raises(CvtDeployError, match="mixes images in the top folder with class sub-folders"):
        load_eval_data(digit_folder, demo_model.cfg, progress=False)
    (digit_folder / "loose.png").unlink()
    (digit_folder / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(digit_folder / "cat" / "x.png")
    with pytest.raises(CvtDeployError, match="class folder 'cat'"):
        load_eval_data(digit_folder, demo_model.cfg, progress=False)


def test_eval_data_unlabelled_folder(demo_model, tmp_path, demo_test_split):
    from PIL import Image

    from cvt_deploy.data import load_eval_data

    for i in range(3):
        Image.fromarray(demo_test_split.images[i]).save(tmp_path / f"{i}.png")
    ev = load_eval_data(tmp_path, demo_model.cfg, progress=False)
    assert len(ev) == 3 and ev.labels is None and "unlabelled" in ev.description
