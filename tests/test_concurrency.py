"""Concurrent use is safe: two exports into one ``--out`` never mix (one wins whole, the other
fails at once), and a reader while an export replaces a bundle gets the old bundle whole, the
new one whole, or a clear error. Real processes on real files."""
from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

# Whole-process scenarios (races between whole processes: eight real exports): about a minute or more on 2 cores, so `make test` leaves them
# to `make test-all` (CI), as it does the big variants.
pytestmark = pytest.mark.slow

from conftest import refused, run_cli, run_script, script  # noqa: E402
from cvt_deploy import backends as runtimes  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.outlock import lock_path  # noqa: E402

DIGIT = Path(__file__).resolve().parent.parent / "cvt_deploy" / "demo" / "samples" / "digit-1.png"


def start_export(out: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([script("cvt-export"), "--out", str(out), "--no-check", "--no-timing", "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the export never got that far"
        time.sleep(0.02)


def assert_whole(out: Path) -> Bundle:
    bundle = Bundle.open(out)
    for art in bundle.artifacts.values():
        bundle.verified_path(art)  # every file is the one its manifest describes
    assert not lock_path(out).exists() and not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    return bundle


@pytest.mark.parametrize("case", ["new folder", "replacing a bundle"])
def test_a_second_export_into_the_same_out_fails_at_once_and_the_first_wins_whole(tmp_path, case):
    out = tmp_path / "bundle"
    if case == "replacing a bundle":
        assert run_cli("cvt-export", "--out", str(out), "--no-check", "--no-timing", "-q", "--no-ort-cpu").returncode == 0
    first = start_export(out, "--precision", "fp16,int8")
    try:
        wait_for(first, lock_path(out).exists)
        second = run_script("cvt-export", "--out", str(out), "--no-check", "-q")
        assert first.poll() is None, "the second export must not wait for the first"
        refused(second, f"another export is writing {out} now (pid {first.pid})", "wait for it to finish")
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    assert {a.precision for a in assert_whole(out).artifacts.values()} == {"fp32", "fp16", "int8"}  # the first's
    # Once the first has finished, the next export takes the folder as usual.
    assert run_cli("cvt-export", "--out", str(out), "--no-check", "--no-timing", "-q", "--no-ort-cpu").returncode == 0
    assert {a.precision for a in assert_whole(out).artifacts.values()} == {"fp32"}


def test_a_lock_left_by_a_killed_export_is_taken_over(tmp_path):
    out = tmp_path / "bundle"
    first = start_export(out)
    try:
        wait_for(first, lock_path(out).exists)
    finally:
        first.kill()
        first.wait(timeout=60)
    assert lock_path(out).exists()  # SIGKILL runs no cleanup: the file stays, but nobody holds it
    assert run_cli("cvt-export", "--out", str(out), "--no-check", "--no-timing", "-q", "--no-ort-cpu").returncode == 0
    assert_whole(out)


def test_predict_while_an_export_replaces_the_bundle_reads_one_bundle_whole(tmp_path, demo_model, randomize_weights):
    from cvt_deploy.checkpoints import save_checkpoint

    other = copy.deepcopy(demo_model)
    randomize_weights(other, seed=5)
    weights = save_checkpoint(other, tmp_path / "other.safetensors")
    out = tmp_path / "bundle"
    assert run_cli("cvt-export", "--out", str(out), "--no-check", "--no-timing", "-q").returncode == 0

    def logits() -> np.ndarray:
        return runtimes.load(out, backend="onnxruntime").predict([DIGIT]).logits[0]

    old = logits()
    seen, errors = [], []
    replacing = start_export(out, "--weights", str(weights))
    try:
        while replacing.poll() is None:
            try:
                seen.append(logits())
            except CvtDeployError as e:
                errors.append(e.message)
        _, err = replacing.communicate(timeout=300)
    finally:
        replacing.kill()
    assert replacing.returncode == 0, err[-2000:]
    new = logits()
    assert not np.allclose(old, new, atol=1e-3)  # the two bundles are told apart by their answers
    assert seen, "no read happened during the export"
    for got in seen:
        assert np.allclose(got, old, atol=1e-5) or np.allclose(got, new, atol=1e-5), got
    for message in errors:
        assert "is incomplete" in message or "was replaced while it was being read" in message, message
