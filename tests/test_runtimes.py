"""Runtimes: backend choice, predictions against PyTorch, bare .onnx files, static batches,
bad bundles and bad inputs, thread safety, and the ONNX Runtime path without torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from cvt_deploy.bundle_write import changing  # noqa: E402
from cvt_deploy.bundle import BatchRange, Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.preprocess import preprocess  # noqa: E402
from cvt_deploy.backends import PREFERENCE, available_backends, backend_class, load
from cvt_deploy.runtimes import Prediction  # noqa: E402
from cvt_deploy.runtimes.ort import OrtRuntime  # noqa: E402
from cvt_deploy.runtimes.pytorch import TorchRuntime  # noqa: E402
from conftest import rand_batch  # noqa: E402

FP32_TOL = 1e-4


def write_manifest(root: Path, text: str) -> None:
    (root / "manifest.json").write_text(text)


def edit_manifest(root: Path, fn) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    fn(raw)
    write_manifest(root, json.dumps(raw))


# --- backend choice and accuracy ----------------------------------------------------------


def test_available_backends_lists_every_backend_with_a_reason(demo_bundle):
    reasons = available_backends(Bundle.open(demo_bundle))
    assert list(reasons) == list(PREFERENCE)
    assert reasons["onnxruntime"] is None and reasons["torch"] is None
    if reasons["tensorrt"] is not None:
        assert isinstance(reasons["tensorrt"], str) and reasons["tensorrt"]


def test_load_without_backend_picks_the_first_usable_and_matches_pytorch(demo_export, demo_test_split, demo_reference):
    """Whole held-out set: the chosen backend's top-1 is PyTorch's, and the demo model is accurate."""
    rt = load(demo_export.root)
    reasons = available_backends(Bundle.open(demo_export.root))
    assert rt.backend == next(name for name in PREFERENCE if reasons[name] is None)
    assert rt.config == demo_export.model.cfg and rt.precision == "fp32"
    pred = rt.predict(list(demo_test_split.images))
    assert len(pred.labels) == len(demo_test_split) == 360
    ref = demo_reference
    np.testing.assert_array_equal(pred.top1, ref.argmax(1))
    assert np.abs(pred.logits - ref).max() <= FP32_TOL
    accuracy = float((pred.top1 == demo_test_split.labels).mean())
    assert accuracy >= 0.97, accuracy
    assert [row[0] for row in pred.labels] == [str(i) for i in pred.top1]


def test_package_level_load_is_the_runtimes_load(demo_bundle, demo_test_split):
    import cvt_deploy

    images = list(demo_test_split.images[:16])
    a = cvt_deploy.load(demo_bundle, backend="onnxruntime", precision="fp32").predict(images)
    b = load(demo_bundle, backend="onnxruntime", precision="fp32").predict(images)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert (a.top1 == demo_test_split.labels[:16]).mean() >= 0.9


def test_onnxruntime_and_torch_backends_agree(demo_bundle, demo_test_split):
    images = list(demo_test_split.images[:40])
    a = load(demo_bundle, backend="onnxruntime")
    b = load(demo_bundle, backend="torch")
    assert isinstance(a, OrtRuntime) and isinstance(b, TorchRuntime)
    pa, pb = a.predict(images), b.predict(images)
    assert np.abs(pa.logits - pb.logits).max() <= FP32_TOL
    np.testing.assert_array_equal(pa.top1, pb.top1)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_runtime_has_the_lifecycle(demo_bundle, demo_test_split, monkeypatch, backend):
    """The base class owns the lifecycle: ``with`` closes, ``synchronize`` is always there."""
    closed = []
    with load(demo_bundle, backend=backend) as runtime:
        monkeypatch.setattr(type(runtime), "close", lambda self: closed.append(self))
        logits = runtime.run(preprocess(list(demo_test_split.images[:4]), runtime.config.preprocess))
        runtime.synchronize()
        assert logits.shape == (4, 10) and not closed
    assert closed == [runtime]


def test_prediction_topk_scores_and_labels(demo_bundle, demo_test_split):
    rt = load(demo_bundle, backend="onnxruntime")
    pred = rt.predict(list(demo_test_split.images[:5]), topk=3)
    assert pred.indices.shape == pred.scores.shape == (5, 3)
    assert np.all(np.diff(pred.scores, axis=1) <= 0), "best first"
    assert np.all((pred.scores > 0) & (pred.scores <= 1))
    full = Prediction.from_logits(pred.logits, rt.config, topk=100)
    assert full.indices.shape == (5, 10)  # clipped to the class count
    np.testing.assert_allclose(full.scores.sum(1), 1.0, atol=1e-5)
    d = pred.to_dict(["a", "b", "c", "d", "e"])
    assert d[0]["input"] == "a" and len(d[0]["top"]) == 3 and d[0]["top"][0]["label"] == pred.labels[0][0]


def test_every_input_kind_gives_the_same_answer(demo_bundle, demo_test_split, tmp_path):
    from PIL import Image

    rt = load(demo_bundle, backend="onnxruntime")
    imgs = demo_test_split.images[:4]
    paths = []
    for i, im in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    ref = rt.predict(list(imgs)).logits
    for kind in (paths, [str(p) for p in paths], [Image.fromarray(im) for im in imgs],
                 np.stack([np.stack([im] * 3, -1) for im in imgs]),  # NHWC uint8 batch
                 preprocess(list(imgs), rt.config.preprocess)):       # preprocessed NCHW float32
        np.testing.assert_allclose(rt.predict(kind).logits, ref, atol=1e-5)


# --- bare .onnx files -----------------------------------------------------------------------


def test_bare_onnx_gets_config_labels_and_preprocessing_from_metadata(demo_export, demo_test_split):
    rt = load(demo_export.root / "model.onnx")
    assert isinstance(rt, OrtRuntime)
    assert rt.config == demo_export.model.cfg
    assert rt.config.labels == tuple(str(i) for i in range(10))
    assert rt.config.preprocess.size == 64 and rt.config.preprocess.resize == "squash"
    direct = OrtRuntime.from_onnx(demo_export.root / "model.onnx")
    images = list(demo_test_split.images[:16])
    # the same graph loaded from the bundle (on the CPU, load() would pick the bundle's ORT-CPU graph)
    ref = OrtRuntime.from_bundle(Bundle.open(demo_export.root), artifact="onnx-fp32").predict(images)
    for r in (rt, direct):
        pred = r.predict(images)
        np.testing.assert_array_equal(pred.logits, ref.logits)
        assert pred.labels == ref.labels


def test_bare_onnx_refuses_other_backends(demo_bundle):
    with pytest.raises(CvtDeployError, match="runs on onnxruntime or openvino, not torch"):
        load(demo_bundle / "model.onnx", backend="torch")


def test_bare_onnx_without_our_metadata_is_refused(demo_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(demo_bundle / "model.onnx"))
    del model.metadata_props[:]
    path = tmp_path / "foreign.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(CvtDeployError) as e:
        load(path)
    assert "carries no cvt-deploy metadata" in e.value.message and str(path) in e.value.message


# --- static batch: padding and splitting -------------------------------------------------------


def test_static_bundle_pads_and_splits(static_bundle, demo_bundle, demo_test_split):
    rt = load(static_bundle, backend="onnxruntime")
    assert rt.batch_range == BatchRange(4, 4, 4)
    dynamic = load(demo_bundle, backend="onnxruntime")
    seen: list[int] = []
    inner = rt._run

    def spy(batch):
        seen.append(len(batch))
        return inner(batch)

    rt._run = spy  # type: ignore[method-assign]
    for n in (3, 4, 9):
        images = list(demo_test_split.images[:n])
        pred = rt.predict(images)
        assert pred.logits.shape == (n, 10)
        np.testing.assert_allclose(pred.logits, dynamic.predict(images).logits, atol=FP32_TOL)
    assert seen == [4, 4, 4, 4, 4], "3 -> one padded chunk; 4 -> one; 9 -> 4 + 4 + padded 1"


def test_bare_static_onnx_pads_and_splits_too(static_bundle, demo_test_split):
    rt = load(static_bundle / "model.onnx")
    assert rt.predict(list(demo_test_split.images[:3])).logits.shape == (3, 10)


# --- bad bundles ----------------------------------------------------------------------------


def _graph_load_runs(bundle_dir):
    """(path, artifact name) of the graph load(bundle, "onnxruntime") runs here: on the CPU the
    bundle's ONNX Runtime CPU graph where it has one."""
    bundle = Bundle.open(bundle_dir)
    art = bundle.find("onnx", "fp32", "onnxruntime-cpu") or bundle.require("onnx", "fp32")
    return bundle.path(art), art.name


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("as_bare_file", [False, True], ids=["bundle", "bare"])
def test_corrupt_onnx_is_a_clear_error(bundle_copy, damage, as_bare_file):
    path, _ = _graph_load_runs(bundle_copy)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x08\x07garbage" * 10, "empty": b""}[damage])
    with pytest.raises(CvtDeployError) as e:
        rt = load(path if as_bare_file else bundle_copy)
        rt.predict(rand_batch(1, 0))
    assert path.name in e.value.message
    if as_bare_file:
        assert "ONNX Runtime cannot load" in e.value.message
    else:  # inside a bundle the manifest's hash catches the damage before ONNX Runtime sees it
        assert "does not match the bundle's manifest" in e.value.message
    assert "re-export" in (e.value.hint or "")


def test_corrupt_onnx_with_matching_hash_still_is_a_clear_error(bundle_copy):
    """A manifest rewritten to the damaged file's hash: ONNX Runtime's own refusal, worded."""
    from cvt_deploy.bundle import Bundle

    path, name = _graph_load_runs(bundle_copy)
    path.write_bytes(path.read_bytes()[:1000])
    bundle = Bundle.open(bundle_copy)
    with changing(bundle):
        bundle.add(bundle.artifacts[name])  # re-hashes the file
    with pytest.raises(CvtDeployError) as e:
        load(bundle_copy, backend="onnxruntime")
    assert "ONNX Runtime cannot load" in e.value.message and "re-export" in (e.value.hint or "")


def test_bit_flipped_onnx_in_a_bundle_is_detected(bundle_copy, demo_test_split):
    path, _ = _graph_load_runs(bundle_copy)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2  # inside the weight initialisers: still a parseable protobuf
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))
    images = list(demo_test_split.images[:32])
    with pytest.raises(CvtDeployError, match="sha256|checksum|corrupt"):
        load(bundle_copy, backend="onnxruntime").predict(images)


def test_missing_artifact_file_is_named(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    for call in (lambda: Bundle.open(bundle_copy), lambda: load(bundle_copy)):
        with pytest.raises(CvtDeployError) as e:
            call()
        assert "model.onnx" in e.value.message and "missing" in e.value.message
        assert "copy the whole bundle" in (e.value.hint or "")


def test_not_a_bundle(tmp_path):
    with pytest.raises(CvtDeployError, match="is not a folder"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvtDeployError, match="has no manifest.json"):
        load(tmp_path / "empty")


@pytest.mark.parametrize("content", [
    pytest.param("{", id="bad-json"),
    pytest.param("", id="empty"),
    pytest.param('{"format": "something-else"}', id="wrong-format"),
    pytest.param('{"format": "cvt-deploy-bundle", "artifacts": {}}', id="no-model"),
    pytest.param('{"format": "cvt-deploy-bundle", "model": {}, "batch": {}, "artifacts": {}}', id="empty-model"),
    pytest.param("\udcff", id="not-utf8"),
])
def test_damaged_manifest_is_a_clear_error(bundle_copy, content):
    (bundle_copy / "manifest.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CvtDeployError) as e:
        Bundle.open(bundle_copy)
    assert "manifest.json is damaged" in e.value.message
    assert "re-export" in (e.value.hint or "")


def test_manifest_from_a_newer_version_says_upgrade(bundle_copy):
    edit_manifest(bundle_copy, lambda raw: raw.update(format_version=99))
    with pytest.raises(CvtDeployError) as e:
        Bundle.open(bundle_copy)
    assert "format version 99" in e.value.message and "upgrade" in (e.value.hint or "")


@pytest.mark.parametrize("damage", ["list", "null", "artifacts-list", "file-null"])
def test_manifest_of_the_wrong_json_shape_is_a_clear_error(bundle_copy, damage):
    if damage == "list":
        write_manifest(bundle_copy, "[]")
    elif damage == "null":
        write_manifest(bundle_copy, "null")
    elif damage == "artifacts-list":
        edit_manifest(bundle_copy, lambda raw: raw.update(artifacts=[]))
    else:
        edit_manifest(bundle_copy, lambda raw: raw["artifacts"]["onnx-fp32"].update(file=None))
    with pytest.raises(CvtDeployError, match="manifest.json is damaged"):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize("damage", ["batch-min-0", "labels-vs-classes"])
def test_invalid_values_in_the_manifest_name_the_manifest(bundle_copy, damage):
    if damage == "batch-min-0":
        edit_manifest(bundle_copy, lambda raw: raw.update(batch={"min": 0, "opt": 1, "max": 2}))
    else:
        edit_manifest(bundle_copy, lambda raw: raw["model"].update(num_classes=5))
    with pytest.raises(CvtDeployError) as e:
        Bundle.open(bundle_copy)
    assert "manifest.json" in e.value.message


def test_unknown_backend_fails_before_any_file_is_read(demo_bundle, tmp_path):
    for source in (demo_bundle, tmp_path / "does-not-exist"):
        with pytest.raises(CvtDeployError) as e:
            load(source, backend="tensorflow")
        assert "unknown backend 'tensorflow'" in e.value.message
        assert "onnxruntime" in (e.value.hint or "") and "torch" in (e.value.hint or "")
    with pytest.raises(CvtDeployError, match="unknown backend"):
        backend_class("ort")


def test_missing_precision_and_unknown_device(demo_bundle):
    with pytest.raises(CvtDeployError) as e:
        load(demo_bundle, backend="onnxruntime", precision="fp16")
    assert "no onnx fp16 artifact" in e.value.message and "onnx-fp32" in e.value.message
    with pytest.raises(CvtDeployError, match="no backend can run"):
        load(demo_bundle, precision="int8")
    with pytest.raises(CvtDeployError, match="not 'tpu'"):
        load(demo_bundle, backend="onnxruntime", device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(CvtDeployError, match="CUDAExecutionProvider"):
            load(demo_bundle, backend="onnxruntime", device="cuda")


# --- bad inputs to predict ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_runtime(demo_bundle):
    return load(demo_bundle, backend="onnxruntime")


@pytest.mark.parametrize("batch, message", [
    pytest.param(np.zeros((2, 3, 32, 32), np.float32), "has shape (2, 3, 32, 32), the model takes (N, 3, 64, 64)", id="wrong-hw"),
    pytest.param(np.zeros((2, 1, 64, 64), np.float32), "has shape (2, 1, 64, 64)", id="wrong-channels"),
    pytest.param(np.zeros((1, 3, 64, 64), np.int32), "dtype int32", id="int32-nchw"),
    pytest.param(np.zeros((64, 64, 3), np.int32), "must be uint8", id="int32-hwc"),
    pytest.param(np.zeros((3, 64, 64), np.float32), "looks like one preprocessed CHW image", id="float-chw"),
    pytest.param(np.zeros((0, 3, 64, 64), np.float32), "empty", id="zero-images"),
    pytest.param([], "no images were given", id="empty-list"),
    pytest.param(np.full((2, 3, 64, 64), np.nan, np.float32), "NaN or infinite values in 2 of 2", id="nan"),
    pytest.param(np.where(np.arange(2)[:, None, None, None] == 1, np.inf, np.zeros((2, 3, 64, 64), np.float32)).astype(np.float32),
                 "NaN or infinite values in 1 of 2", id="inf-in-one"),
    pytest.param("/nonexistent/cat.jpg", "does not exist", id="missing-file"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bad_input_to_predict_raises(demo_bundle, ort_runtime, batch, message, backend):
    rt = ort_runtime if backend == "onnxruntime" else load(demo_bundle, backend="torch")
    with pytest.raises(CvtDeployError) as e:
        rt.predict(batch)
    assert message in e.value.message
    assert e.value.hint


def test_non_finite_logits_raise_instead_of_returning_labels(ort_runtime, monkeypatch):
    monkeypatch.setattr(ort_runtime, "_run", lambda b: np.full((len(b), 10), np.nan, np.float32))
    with pytest.raises(CvtDeployError, match="NaN/inf logits"):
        ort_runtime.predict(rand_batch(2, 0))


def test_a_file_that_is_not_an_image(ort_runtime, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CvtDeployError, match="not a readable image"):
        ort_runtime.predict([str(bad)])


# --- thread safety --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_one_runtime_from_four_threads_gives_the_sequential_logits(demo_bundle, backend):
    rt = load(demo_bundle, backend=backend)
    batches = [rand_batch(n, seed=100 + i) for i, n in enumerate((1, 2, 3, 5, 4, 2))]
    expected = [rt.run(b) for b in batches]
    assert all(np.abs(expected[0][0] - e[0]).max() > 1e-2 for e in expected[1:]), "inputs must give distinct logits"
    jobs = [i for _ in range(3) for i in range(len(batches))]  # every batch 3 times, interleaved
    start = threading.Barrier(4)
    local = threading.local()
    idents: set[int] = set()

    def work(i: int) -> tuple[int, np.ndarray]:
        if not getattr(local, "started", False):
            local.started = True
            idents.add(threading.get_ident())
            start.wait(timeout=60)  # the four workers' first calls really run at once
        return i, rt.predict(batches[i]).logits

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, jobs))
    assert len(idents) == 4 and len(results) == len(jobs)
    for i, logits in results:
        np.testing.assert_allclose(logits, expected[i], rtol=0, atol=1e-6)


# --- without torch --------------------------------------------------------------------------

TORCH_FREE = r"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import cvt_deploy
from cvt_deploy.demo import demo_split
from cvt_deploy.backends import available_backends, load
bundle = sys.argv[1]
split = demo_split("test").head(48)
pred = load(bundle, backend="onnxruntime").predict(list(split.images))
auto = load(bundle)
auto_pred = auto.predict(list(split.images))
print(json.dumps({
    "top1": pred.top1.tolist(), "auto_top1": auto_pred.top1.tolist(), "auto_backend": auto.backend,
    "torch_reason": available_backends()["torch"],
    "torch_module": repr(sys.modules.get("torch", "absent")),
    "heavy": sorted(m for m in ("onnx", "safetensors", "transformers", "torchvision") if sys.modules.get(m) is not None),
}))
"""


def test_onnxruntime_backend_runs_without_torch(demo_export, demo_reference):
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(demo_export.root)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_module"] in ("None", "'absent'"), "something replaced the blocked torch module"
    assert out["heavy"] == [], f"the ONNX Runtime path imported {out['heavy']}"
    assert out["auto_backend"] == "onnxruntime", "with torch unavailable, load() must pick onnxruntime"
    assert out["torch_reason"] and "not installed" in out["torch_reason"]
    assert out["top1"] == demo_reference[:48].argmax(1).tolist() == out["auto_top1"]


def test_the_public_load_passes_every_argument_of_the_backends_load(monkeypatch):
    """cvt_deploy.load is backends.load under its public name: same parameters, each passed on
    (it dropped ``batch``, which the measured choice of CPU path uses)."""
    import inspect

    import cvt_deploy
    import cvt_deploy.backends

    public = inspect.signature(cvt_deploy.load).parameters
    assert list(public) == list(inspect.signature(cvt_deploy.backends.load).parameters)
    seen = {}
    monkeypatch.setattr(cvt_deploy.backends, "load", lambda source, **kw: seen.update(kw, source=source))
    cvt_deploy.load("b", backend="onnxruntime", device="cpu", precision="int8", threads=3, batch=8)
    assert seen == {"source": "b", "backend": "onnxruntime", "device": "cpu", "precision": "int8", "threads": 3,
                    "batch": 8}
