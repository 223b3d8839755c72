"""One writer of bundles (cvt_deploy/bundle_write.py): a change lands whole or not at all, and
nothing else in the package writes a manifest."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cvt_deploy import bundle_write
from cvt_deploy.bundle import JOURNAL, MANIFEST, Artifact, BatchRange, Bundle
from cvt_deploy.config import get_config
from cvt_deploy.errors import CvtDeployError

PACKAGE = Path(__file__).resolve().parent.parent / "cvt_deploy"


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A bundle with one file (its bytes are not a graph: nothing here runs it)."""
    with bundle_write.create(tmp_path / "b", get_config("cvt-tiny"), BatchRange(), {}) as bundle:
        bundle.new_file("model.onnx").write_bytes(b"old graph")
        bundle.add(Artifact("onnx-fp32", "model.onnx", "onnx", "fp32"))
    return tmp_path / "b"


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".partial") or p.name == JOURNAL)


def test_a_change_lands_with_one_manifest_write(small: Path) -> None:
    bundle = Bundle.open(small)
    with bundle_write.changing(bundle):
        staged = bundle.new_file("model.fp16.onnx")
        assert staged.parent != small  # staged beside the bundle until the change ends
        staged.write_bytes(b"new graph")
        art = bundle.add(Artifact("onnx-fp16", "model.fp16.onnx", "onnx", "fp16"))
        assert bundle.path(art) == staged  # readers inside the change see the staged file
        assert "onnx-fp16" not in json.loads((small / MANIFEST).read_text())["artifacts"]  # not yet
    assert (small / "model.fp16.onnx").read_bytes() == b"new graph"
    assert set(Bundle.open(small).artifacts) == {"onnx-fp32", "onnx-fp16"}
    assert bundle.path(art) == small / "model.fp16.onnx" and not _leftovers(small)


def test_a_failed_change_leaves_the_bundle_as_it_was(small: Path) -> None:
    before = {p.name: p.read_bytes() for p in small.iterdir()}
    bundle = Bundle.open(small)
    with pytest.raises(RuntimeError, match="planted"), bundle_write.changing(bundle):
        bundle.new_file("model.onnx").write_bytes(b"replacement")  # an existing file, rewritten
        bundle.add(bundle.artifacts["onnx-fp32"])
        bundle.extra["cpu_timings"] = {"x": 1}
        raise RuntimeError("planted")
    assert {p.name: p.read_bytes() for p in small.iterdir()} == before
    assert bundle.artifacts["onnx-fp32"].sha256 == Bundle.open(small).artifacts["onnx-fp32"].sha256
    assert "cpu_timings" not in bundle.extra  # in memory too


def test_changes_nest_and_the_outer_one_writes(small: Path) -> None:
    bundle = Bundle.open(small)
    with bundle_write.changing(bundle):
        with bundle_write.changing(bundle):  # as record_parity inside --format openvino's change
            bundle.extra["note"] = "inner"
        assert "note" not in json.loads((small / MANIFEST).read_text())
    assert json.loads((small / MANIFEST).read_text())["note"] == "inner"


def test_nothing_changes_a_bundle_outside_a_change(small: Path) -> None:
    bundle = Bundle.open(small)
    with pytest.raises(RuntimeError, match="outside bundle_write"):
        bundle.add(bundle.artifacts["onnx-fp32"])
    with pytest.raises(RuntimeError, match="outside bundle_write"):
        bundle.new_file("model.fp16.onnx")


def test_a_change_refuses_a_manifest_another_command_rewrote(small: Path) -> None:
    stale = Bundle.open(small)
    with bundle_write.changing(Bundle.open(small)) as other:
        other.extra["note"] = "theirs"
    with pytest.raises(CvtDeployError, match="rewritten by another command") as e:
        with bundle_write.changing(stale):
            stale.extra["note"] = "mine"
    assert "run the command again" in (e.value.hint or "")
    assert json.loads((small / MANIFEST).read_text())["note"] == "theirs"


def test_only_bundle_write_writes_a_manifest() -> None:
    """No module but bundle_write.py names the manifest in a write, and Bundle has no save()."""
    writers = {"atomic_write_text", "atomic_output", "write_text", "write_bytes", "open", "replace", "rename"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in writers and any(isinstance(n, ast.Name) and n.id == "MANIFEST" or
                                           isinstance(n, ast.Constant) and n.value == MANIFEST
                                           for a in node.args for n in ast.walk(a)):
                    found.append(f"{rel}:{node.lineno}")
    assert found and all(f.startswith("bundle_write.py:") for f in found), found
    assert not hasattr(Bundle, "save") and not hasattr(Bundle, "create")
