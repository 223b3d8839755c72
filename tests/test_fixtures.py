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


def run_suite(tmp_path: Path, conftest: str, test: str, files: tuple[str, ...]) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A small suite of ``files`` (each ``test``) with ``conftest``, run by pytest in two xdist
    workers as `make test` runs; its result and the log its fixtures write their builds to."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(conftest)
    for name in files:
        (suite / name).write_text(test)
    log = tmp_path / "builds.log"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                           "--basetemp", str(tmp_path / "base"), str(suite)],
                          capture_output=True, text=True, timeout=120, cwd=suite,
                          env={**os.environ, "BUILD_LOG": str(log), "SUITE_CONFTEST": str(TESTS / "conftest.py")})
    return proc, log


def test_a_shared_session_fixture_is_built_once_across_workers(tmp_path):
    proc, log = run_suite(tmp_path, CONFTEST, TEST, ("test_a.py", "test_b.py", "test_c.py"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    workers = log.read_text().split()
    assert len(workers) == 1, f"built by {workers}: once per worker, not once per run"


FAILING_CONFTEST = CONFTEST.replace("_shared_build = suite.shared_build", "_shared_build = suite.shared_build\n"
                                    "pytest_fixture_setup = suite.pytest_fixture_setup") + textwrap.dedent('''
    def _log(what):
        with open(os.environ["BUILD_LOG"], "a") as log:
            log.write(what + "\\n")

    @pytest.fixture(scope="session")
    def shared_broken(tmp_path_factory):
        def build(folder):
            _log("shared")
            raise RuntimeError("the export missed a gate")
        return _shared_build(tmp_path_factory, "broken", build)

    @pytest.fixture(scope="module")
    def module_broken():
        _log("module")
        raise RuntimeError("the export missed a gate")
''')
FAILING_TEST = textwrap.dedent('''
    import pytest

    @pytest.mark.parametrize("i", range(3))
    def test_shared(shared_broken, i):
        pass

    @pytest.mark.parametrize("i", range(3))
    def test_module(module_broken, i):
        pass
''')


def test_a_fixture_that_fails_is_built_once_and_fails_each_of_its_tests(tmp_path):
    """An export fixture that fails (a gate missed on this CPU) fails its tests at once with the
    first error: it is not exported again for each test (pytest 9 sets a failed fixture up anew),
    nor again by another worker."""
    proc, log = run_suite(tmp_path, FAILING_CONFTEST, FAILING_TEST, ("test_a.py", "test_b.py"))
    assert proc.returncode == 1 and "12 error" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    builds = log.read_text().split()
    assert builds.count("shared") == 1, builds  # once per run, whichever worker asked first
    assert builds.count("module") == 2, builds  # once per test file
    assert proc.stdout.count("the export missed a gate") >= 12 and "failed earlier in this run" in proc.stdout
