"""Odd environments: a missing or read-only HOME, a cache path that is a file, folders with
spaces and non-ASCII names. Each runs the installed commands as a user would, in a process
whose environment is exactly the odd one, and expects the right result or a clean error."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

# Whole-process scenarios (odd environments through the installed commands: five real exports in fresh processes): about a minute or more on 2 cores, so `make test` leaves them
# to `make test-all` (CI), as it does the big variants.
pytestmark = pytest.mark.slow

from PIL import Image  # noqa: E402

from conftest import script, tmpfs  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402

DIGIT = Path(__file__).resolve().parent.parent / "cvt_deploy" / "demo" / "samples" / "digit-1.png"


def run(name: str, *args: str, home: Path | None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command with HOME set to ``home`` (None: no HOME at all) and no XDG cache override."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME")}
    if home is not None:
        env["HOME"] = str(home)
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([script(name), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def clean(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("case", ["missing", "read-only", ".cache is a file", "the calibration cache is a file"])
def test_an_int8_export_and_a_prediction_with_an_odd_home(tmp_path, case):
    home = tmp_path / "home"
    if case == "missing":
        home = tmp_path / "no-such-home"
    elif case == ".cache is a file":
        home.mkdir()
        (home / ".cache").write_text("not a folder")
    elif case == "the calibration cache is a file":
        (home / ".cache" / "cvt-deploy").mkdir(parents=True)
        (home / ".cache" / "cvt-deploy" / "calibration").write_text("a user's file")
    out = tmp_path / "bundle"

    def export_and_predict() -> str:
        err = clean(run("cvt-export", "--precision", "int8", "--no-check", "--no-timing", "-q", "--no-ort-cpu", "--out", str(out),
                        home=home))
        assert Bundle.open(out).find("onnx", "int8") is not None
        pred = run("cvt-predict", "--bundle", str(out), "--precision", "int8", "--json", str(DIGIT), home=home)
        clean(pred)
        assert json.loads(pred.stdout)[0]["top"][0]["label"] == "1"
        return err

    if case == "read-only":
        with tmpfs(home, readonly=True):
            err = export_and_predict()
    else:
        err = export_and_predict()
    if case != "missing":  # a missing HOME is created by nobody: the cache goes where it can, or nowhere
        assert "calibration cache not written" in err, err
    if case == "the calibration cache is a file":
        assert (home / ".cache" / "cvt-deploy" / "calibration").read_text() == "a user's file"


def test_folders_and_files_with_spaces_and_non_ascii_names(tmp_path):
    root = tmp_path / "mes modèles ñandú" / "сборка 1"
    data = root / "données d'essai"
    for label in ("0", "1"):
        (data / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8)).save(
                data / label / f"image n°{i} — 画像.png")
    out = root / "bundle ü"
    clean(run("cvt-export", "--precision", "int8", "--calib", str(data), "--data", str(data), "--limit", "8", "-q", "--no-timing",
              "--no-ort-cpu", "--out", str(out), home=tmp_path))
    image = root / "chiffre un ✓.png"
    image.write_bytes(DIGIT.read_bytes())
    pred = run("cvt-predict", "--bundle", str(out), "--json", str(image), home=tmp_path)
    clean(pred)
    assert json.loads(pred.stdout)[0]["input"] == str(image)
    check = run("cvt-check", "--bundle", str(out), "--data", str(data), "--limit", "8", home=tmp_path)
    assert check.returncode in (0, 1) and "Traceback" not in check.stderr, check.stderr  # random images: gates may fail
    # relative paths from inside the odd folder work as well
    clean(run("cvt-predict", "--bundle", "bundle ü", "chiffre un ✓.png", home=tmp_path, cwd=root))
