"""The suite's own machinery: a session fixture built with ``conftest.shared_build`` is made
once per test run, however many pytest-xdist workers ask for it (each worker has a session of
its own, so a plain session fixture would export the demo bundle once per worker)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("xdist")

TESTS = Path(__file__).resolve().parent

CONFTEST = textwrap.dedent('''
    import importlib.util, os, sys, time
    import pytest

    # The suite's own conftest, loaded under another name (this file is "conftest" here).
    spec = importlib.util.spec_from_file_location("suite_conftest", os.environ["SUITE_CONFTEST"])
    suite = importlib.util.module_from_spec(spec)
    sys.modules["suite_conftest"] = suite  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    _shared_build = suite.shared_build

    @pytest.fixture(scope="session")
    def made(tmp_path_factory):
        def build(folder):
            with open(os.environ["BUILD_LOG"], "a") as log:
                log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
            time.sleep(1)  # long enough for the other worker to ask meanwhile
            (folder / "thing.txt").write_text("made once")
        return _shared_build(tmp_path_factory, "thing", build)
''')
TEST = textwrap.dedent('''
    def test_uses_it(made):
        assert (made / "thing.txt").read_text() == "made once"
''')


def test_a_shared_session_fixture_is_built_once_across_workers(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    for name in ("test_a.py", "test_b.py", "test_c.py"):
        (suite / name).write_text(TEST)
    log = tmp_path / "builds.log"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                           "--basetemp", str(tmp_path / "base"), str(suite)],
                          capture_output=True, text=True, timeout=120, cwd=suite,
                          env={**os.environ, "BUILD_LOG": str(log), "SUITE_CONFTEST": str(TESTS / "conftest.py")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    workers = log.read_text().split()
    assert len(workers) == 1, f"built by {workers}: once per worker, not once per run"
