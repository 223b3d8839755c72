"""A bundle is a sandbox: every name its own files choose stays inside its folder.

A bundle may come from a colleague or a download, so its manifest, sidecars and graphs are
someone else's text. Each case builds the hostile bundle from a real export, runs the command
a user would, and asserts a clean refusal (or the right answer) with the user's files unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import refused, run_cli, snapshot  # noqa: E402
from cvt_deploy import backends as runtimes  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.util import file_sha256  # noqa: E402


@pytest.fixture(scope="module")
def digit(tmp_path_factory, demo_test_split) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("digit") / "digit.png"
    Image.fromarray(demo_test_split.images[0]).save(path)
    return path


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def predicted(bundle: Path, image: Path) -> list:
    proc = run_cli("cvt-predict", "--bundle", str(bundle), "--backend", "onnxruntime", "--json", str(image))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the bundle: what a hostile name points at (it must never be read)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def test_a_file_symlinked_out_of_the_bundle_is_refused_before_it_is_read(bundle_copy, outside, digit):
    # The manifest names model.onnx; the hostile copy makes it a symlink to a graph elsewhere,
    # with the manifest's hash updated to match: the hash alone cannot catch it.
    shutil.move(bundle_copy / "model.onnx", outside / "model.onnx")
    (bundle_copy / "model.onnx").symlink_to(outside / "model.onnx")
    before = snapshot(outside)
    err = refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), str(digit)), "model.onnx",
                  "leads out of the bundle folder", str(outside))
    assert "symlink" in err
    assert snapshot(outside) == before


def test_a_folder_symlinked_out_of_the_bundle_is_refused(bundle_copy, outside, digit):
    (outside / "graphs").mkdir()
    shutil.move(bundle_copy / "model.onnx", outside / "graphs" / "model.onnx")
    (bundle_copy / "graphs").symlink_to(outside / "graphs")
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["onnx-fp32"].update(file="graphs/model.onnx"))
    refused(run_cli("cvt-check", "--bundle", str(bundle_copy), "--limit", "8"), "graphs/model.onnx", "leads out")


@pytest.mark.parametrize("key,value", [("file", "../outside/model.onnx"), ("file", "/etc/hostname"),
                                       ("file", "model.onnx\0.txt"), ("sidecar", "../../x.json"),
                                       ("labels", "/etc/passwd")])
def test_names_that_climb_out_or_are_absolute_are_refused(bundle_copy, digit, key, value):
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["onnx-fp32"].update({key: value}))
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), str(digit)), repr(value), "inside the bundle folder")


@pytest.mark.parametrize("key,value", [("file", 7), ("file", None), ("sidecar", ["a"]), ("labels", "")])
def test_names_that_are_not_names_are_damage(bundle_copy, digit, key, value):
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["onnx-fp32"].update({key: value}))
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), str(digit)), "manifest.json is damaged",
            f"has {key} {value!r}, not a file name")


def test_a_symlink_inside_the_bundle_is_fine(bundle_copy, digit):
    expected = predicted(bundle_copy, digit)
    (bundle_copy / "graphs").mkdir()
    shutil.move(bundle_copy / "model.ort-cpu.onnx", bundle_copy / "graphs" / "real.onnx")
    (bundle_copy / "model.ort-cpu.onnx").symlink_to("graphs/real.onnx")
    assert predicted(bundle_copy, digit) == expected


def test_copying_moving_or_linking_a_bundle_keeps_it_working(demo_bundle, tmp_path, digit):
    expected = predicted(demo_bundle, digit)
    copied = tmp_path / "copied"
    shutil.copytree(demo_bundle, copied)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(shutil.copytree(demo_bundle, tmp_path / "to-move")), moved)
    linked = tmp_path / "linked"
    linked.symlink_to(copied)
    for bundle in (copied, moved, linked):
        assert predicted(bundle, digit) == expected, bundle


def _point_weights_at(graph: Path, location: str) -> None:
    """Make the graph's first initializer external data at ``location`` (as a hostile graph would)."""
    from onnx import TensorProto

    model = onnx.load(str(graph))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(graph))


def _value_first(graph: Path, location: str) -> None:
    """Rewrite the location entry with its value before its key: legal protobuf that a parser
    reads the same, and what a scan for the usual byte order would miss."""
    value = location.encode()
    key_first = b"\n\x08location\x12" + bytes([len(value)]) + value
    data = graph.read_bytes()
    assert data.count(key_first) == 1
    graph.write_bytes(data.replace(key_first, b"\x12" + bytes([len(value)]) + value + b"\n\x08location"))
    entries = {e.key: e.value for t in onnx.load(str(graph), load_external_data=False).graph.initializer
               for e in t.external_data}
    assert entries["location"] == location  # still the same graph to a parser


@pytest.mark.parametrize("reader", ["onnx", "without onnx"])
@pytest.mark.parametrize("where", ["absolute", "climbing", "symlink", "absolute, value first"])
def test_external_data_outside_the_bundle_is_refused_before_a_runtime_opens_it(bundle_copy, outside, where, reader,
                                                                               monkeypatch):
    secret = outside / "secret.bin"
    secret.write_bytes(os.urandom(1 << 20))
    graph = bundle_copy / "model.ort-cpu.onnx"
    if where == "symlink":
        (bundle_copy / "weights.bin").symlink_to(secret)
    location = {"climbing": "../outside/secret.bin", "symlink": "weights.bin"}.get(where, str(secret))
    _point_weights_at(graph, location)
    if where.endswith("value first"):
        _value_first(graph, location)
    # The hostile copy's manifest agrees with its files: only the sandbox rule can refuse it.
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["onnx-fp32-onnxruntime-cpu"].update(sha256=file_sha256(graph)))
    if reader == "without onnx":  # an edge runtime: ONNX Runtime installed, the onnx package not
        monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(CvtDeployError) as e:
        runtimes.load(bundle_copy, backend="onnxruntime")
    assert "external data" in e.value.message and location in e.value.message, e.value.message
    assert "inside the bundle folder" in e.value.message or "leads out" in e.value.message


@pytest.mark.parametrize("reader", ["onnx", "without onnx"])
def test_external_data_inside_the_bundle_still_loads(bundle_copy, reader, monkeypatch):
    # The rule must not refuse what large exports legitimately write (weights in <graph>.data).
    from cvt_deploy.export.onnx import save_graph

    graph = bundle_copy / "model.ort-cpu.onnx"
    save_graph(onnx.load(str(graph)), graph, external=True)
    assert (bundle_copy / "model.ort-cpu.onnx.data").is_file()
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["onnx-fp32-onnxruntime-cpu"].update(sha256=file_sha256(graph)))
    if reader == "without onnx":
        monkeypatch.setitem(sys.modules, "onnx", None)
    runtime = runtimes.load(bundle_copy, backend="onnxruntime")
    assert runtime.predict(np.zeros((1, 3, 64, 64), np.float32)).logits.shape == (1, 10)


@pytest.fixture(scope="module")
def other_models_graph(tmp_path_factory, demo_model, randomize_weights) -> Path:
    """A valid graph of another model with the demo model's shapes (other weights)."""
    import copy

    from cvt_deploy.export.onnx import export_onnx, graph_metadata

    other = copy.deepcopy(demo_model)
    randomize_weights(other, seed=3)
    path = tmp_path_factory.mktemp("other") / "model.onnx"
    return export_onnx(other.eval(), path, metadata=graph_metadata(other.cfg.to_json(), "fp32", {}))


@pytest.mark.parametrize("graph,backend", [("model.onnx", "openvino"), ("model.ort-cpu.onnx", "onnxruntime")])
def test_a_graph_swapped_for_another_models_is_caught_by_its_hash(bundle_copy, other_models_graph, digit, graph,
                                                                   backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    shutil.copyfile(other_models_graph, bundle_copy / graph)
    with pytest.raises(CvtDeployError) as e:
        runtimes.load(bundle_copy, backend=backend)
    assert "does not match the bundle's manifest" in e.value.message and graph in e.value.message
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), "--backend", backend, str(digit)),
            "does not match", graph)
    refused(run_cli("cvt-check", "--bundle", str(bundle_copy), "--backend", backend, "--limit", "8"), "does not match")


def test_a_swapped_graph_is_caught_when_writing_a_triton_repository(bundle_copy, other_models_graph, tmp_path):
    pytest.importorskip("tritonclient")
    shutil.copyfile(other_models_graph, bundle_copy / "model.onnx")
    refused(run_cli("cvt-export", "--format", "triton", "--bundle", str(bundle_copy), "--out", str(tmp_path / "repo")),
            "does not match")
    assert not (tmp_path / "repo").exists()


def test_the_bundle_object_rechecks_nothing_it_already_refused(bundle_copy, outside):
    # Bundle.open refuses a hostile manifest as a whole: no Bundle object exists to misuse.
    shutil.move(bundle_copy / "model.safetensors", outside / "model.safetensors")
    (bundle_copy / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(CvtDeployError) as e:
        Bundle.open(bundle_copy)
    assert "model.safetensors" in e.value.message and "leads out" in e.value.message
