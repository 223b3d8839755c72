"""Bundles written by the previous release still open, and each backend still runs the same artifact of them.

tests/data/release-f78116c/ holds bundles that the cvt-deploy of commit f78116c exported
(make_bundles.py there) and, in selections.json, what that code selected for each of them
(record.py there): ``Bundle.find`` per kind, precision and target; the ONNX graph a TensorRT
engine is built from (``source_graph``); the CPU paths (``cpu_paths``); and which artifact
``cvt_deploy.load`` runs per backend, precision and batch size, with the logits it gave for a
fixed batch, or that it raised. This test holds the current code to all of it: the same artifact
names, the same errors (as CvtDeployError; messages may change), the same logits (atol 1e-4 on
the CPU the record was made on; see ``tolerance`` elsewhere).

Nothing is exported here and nothing is written into tests/data: scenarios that need a changed
manifest (load's measured choice under another CPU's timings) run on copies in a temporary folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvt_deploy.errors import CvtDeployError, NotRightHere

DATA = Path(__file__).parent / "data" / "release-f78116c"
RECORD: dict[str, Any] = json.loads((DATA / "selections.json").read_text())
BUNDLES = sorted(RECORD["bundles"])
TIMINGS = "cpu_timings"  # the manifest key of load's per-CPU timings (a bundle format fact, not an API name)


# --- the current code's API, one helper per lookup --------------------------------------------
# The manifest refactor moves some of these functions: when it does, change the one line in the
# helper concerned (and nothing below it). Each helper says where the function lived at f78116c.

def open_bundle(path: Path) -> Any:
    from cvt_deploy.bundle import Bundle  # f78116c: cvt_deploy.bundle.Bundle.open
    return Bundle.open(path)


def find(bundle: Any, kind: str, precision: str | None, target: str) -> Any:
    return bundle.find(kind, precision, target)  # f78116c: Bundle.find(kind, precision, target)


def load(path: Path, backend: str | None, precision: str | None, device: str, batch: int | None) -> Any:
    import cvt_deploy  # f78116c: cvt_deploy.load -> cvt_deploy.backends.load
    return cvt_deploy.load(path, backend=backend, precision=precision, device=device, batch=batch)


def unavailable_reason(backend: str, device: str) -> str | None:
    from cvt_deploy.backends import backend_class  # f78116c: cvt_deploy.backends.backend_class
    return backend_class(backend).unavailable_reason(device)


def source_graph(bundle: Any, precision: str, strongly_typed: bool, version: str, toolkit: str | None) -> Any:
    from cvt_deploy.trt.loader import source_graph as _source_graph  # f78116c: cvt_deploy.trt.loader.source_graph
    from cvt_deploy.trt.util import TOOLKITS  # f78116c: cvt_deploy.trt.util.TOOLKITS (by kind)
    return _source_graph(bundle, precision, strongly_typed, version, *([TOOLKITS[toolkit]] if toolkit else []))


def cpu_paths(bundle: Any, precision: str) -> list[tuple[str, str]]:
    from cvt_deploy.runtimes.choice import cpu_paths as _cpu_paths  # f78116c: cvt_deploy.runtimes.choice.cpu_paths
    return [(str(backend), str(artifact)) for backend, artifact in _cpu_paths(bundle, precision)]


def this_cpu() -> str:
    from cvt_deploy.cpu import cpu_key  # f78116c: cvt_deploy.cpu.cpu_key (the key of a bundle's cpu_timings)
    return cpu_key()


def artifact_of(runtime: Any) -> str | None:
    return runtime.artifact  # f78116c: Runtime.artifact (None on the torch backend)


def measured(runtime: Any) -> bool:
    return runtime.choice is not None  # f78116c: Runtime.choice, load's reason when it followed cpu_timings


# --- the recorded scenarios -------------------------------------------------------------------

def reversed_timings(entry: dict[str, Any]) -> dict[str, Any]:
    """Each (batch, precision)'s times handed out in reverse order: the path timed slowest gets the
    fastest time, so load's measured choice differs from its fixed order (record.py uses this too)."""
    out = json.loads(json.dumps(entry))
    for by_precision in out["batches"].values():
        for precision, times in by_precision.items():
            ranked = sorted(times, key=lambda k: (times[k], k))
            values = sorted(times.values())
            by_precision[precision] = {k: v for k, v in zip(reversed(ranked), values)}
    return out


def fixed_input(config: Any, kind: str) -> np.ndarray:
    """record.py's batch: standard normal floats, or uint8 pixels where the graphs take pixels."""
    size, chans = config.preprocess.size, config.in_chans
    rng = np.random.default_rng(0)
    if kind == "uint8_pixels":
        return rng.integers(0, 256, (2, size, size, chans), dtype=np.uint8)
    assert kind == "standard_normal", kind
    return rng.standard_normal((2, chans, size, size)).astype(np.float32)


SAME_CPU = this_cpu() == RECORD["recorded_with"]["cpu_key"]


def tolerance(precision: str) -> float:
    """1e-4 on the CPU the record was made on, and for fp32 anywhere. fp16 and int8 elsewhere: ONNX
    Runtime and OpenVINO pick their int8 and fp16 kernels by CPU feature (VNNI, AVX512-FP16, AMX),
    so the same artifact gives other roundings there; the artifact names are the exact check."""
    return 1e-4 if SAME_CPU or precision == "fp32" else 2e-2


class Scenarios:
    """The bundle folder each recorded load scenario runs on: the one in tests/data where its manifest
    already is that scenario on this CPU, else a copy (made once) with only cpu_timings rewritten."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.made: dict[tuple[str, str], Path] = {}

    def root(self, name: str, scenario: str) -> Path:
        if scenario == "untimed":
            return DATA / name
        raw = json.loads((DATA / name / "manifest.json").read_text())
        (entry,) = raw[TIMINGS].values()
        here = this_cpu()
        key = RECORD["elsewhere_key"] if scenario == "timed_elsewhere" else here
        wanted = {key: reversed_timings(entry) if scenario == "timed_here_reversed" else entry}
        if raw[TIMINGS] == wanted or (scenario == "timed_elsewhere" and here not in raw[TIMINGS]):
            return DATA / name
        if (name, scenario) not in self.made:
            copy = self.tmp / f"{name}-{scenario}"
            shutil.copytree(DATA / name, copy)
            raw[TIMINGS] = wanted
            (copy / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
            self.made[name, scenario] = copy
        return self.made[name, scenario]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def data_untouched() -> Any:
    """Nothing this module runs writes into tests/data."""
    before = _files(DATA)
    yield
    assert _files(DATA) == before, "tests/test_manifest_compat.py wrote into tests/data/release-f78116c"


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Scenarios:
    return Scenarios(tmp_path_factory.mktemp("release-f78116c"))


# The logits of one artifact on one backend are checked once: the scenarios load it again and again
# (a measured choice, a batch size), and an OpenVINO run compiles for each batch size.
CHECKED: dict[tuple[str, str, str | None, str], list[list[float]]] = {}


def _skip_unless_available(backends: list[str]) -> None:
    for backend in backends:
        reason = unavailable_reason(backend, "cpu")
        if reason is not None:
            pytest.skip(f"backend {backend} cannot run here ({reason}); f78116c ran it when it recorded")


# --- the checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUNDLES)
def test_every_bundle_opens_with_the_artifacts_it_had(name: str) -> None:
    bundle = open_bundle(DATA / name)
    assert sorted(bundle.artifacts) == RECORD["bundles"][name]["artifacts"]


@pytest.mark.parametrize("name", BUNDLES)
def test_find_selects_what_the_release_selected(name: str) -> None:
    bundle = open_bundle(DATA / name)
    wrong = []
    for case in RECORD["bundles"][name]["find"]:
        art = find(bundle, case["kind"], case["precision"], case["target"])
        if (art and art.name) != case["artifact"]:
            wrong.append(f"find({case['kind']}, {case['precision']}, {case['target']}): {art and art.name}, "
                         f"f78116c {case['artifact']}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", BUNDLES)
def test_tensorrt_builds_from_the_graph_the_release_built_from(name: str) -> None:
    bundle = open_bundle(DATA / name)
    wrong = []
    for case in RECORD["bundles"][name]["source_graph"]:
        what = (f"source_graph({case['precision']}, strongly_typed={case['strongly_typed']}, {case['version']}"
                + (f", {case['toolkit']})" if case["toolkit"] else ")"))
        try:
            got = source_graph(bundle, case["precision"], case["strongly_typed"], case["version"], case["toolkit"]).name
        except CvtDeployError as e:
            got = f"error {e.message[:80]!r}"
            if "error" in case:
                continue
        if got != case.get("artifact"):
            wrong.append(f"{what}: {got}, f78116c {case.get('artifact') or 'error ' + repr(case['error'])}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", BUNDLES)
def test_cpu_paths_are_the_release_s(name: str) -> None:
    bundle = open_bundle(DATA / name)
    here = [b for b in RECORD["recorded_with"]["available"] if b in ("onnxruntime", "openvino")
            and unavailable_reason(b, "cpu") is None]
    for precision, pairs in RECORD["bundles"][name]["cpu_paths"].items():
        expected = {(b, a) for b, a in pairs if b in here}  # the paths of backends not installed here drop out
        assert set(cpu_paths(bundle, precision)) == expected, precision


def _load_cases() -> list[Any]:
    out = []
    for name in BUNDLES:
        for scenario, cases in RECORD["bundles"][name]["load"].items():
            for case in cases:
                batch = "" if case["batch"] is None else f"-batch{case['batch']}"
                out.append(pytest.param(name, scenario, case,
                                        id=f"{name}-{scenario}-{case['backend'] or 'auto'}-{case['precision'] or 'default'}{batch}"))
    return out


@pytest.mark.parametrize(("name", "scenario", "case"), _load_cases())
def test_load_runs_the_artifact_the_release_ran(name: str, scenario: str, case: dict[str, Any], scenarios: Scenarios) -> None:
    root = scenarios.root(name, scenario)
    args = (root, case["backend"], case["precision"], case["device"], case["batch"])
    if "error" in case:
        with pytest.raises(CvtDeployError):
            runtime = load(*args)
            runtime.run(fixed_input(runtime.config, RECORD["bundles"][name]["input"]))  # f78116c may have refused at run
        return
    if case["backend"] is not None:
        _skip_unless_available([case["backend"]])
    else:  # the automatic choice is among what is installed: the same set, or it may choose otherwise
        _skip_unless_available(RECORD["recorded_with"]["available"])
    try:
        runtime = load(*args)
    except NotRightHere as e:  # a CPU feature this machine lacks (cvt_deploy.cpu): refused here, never run wrong
        pytest.skip(f"this CPU cannot run it right: {e.message}")
    try:
        _check_run(name, case, runtime)
    finally:
        close = getattr(runtime, "close", None)
        if callable(close):
            close()


def _check_run(name: str, case: dict[str, Any], runtime: Any) -> None:
    got = artifact_of(runtime)
    if case["artifact"] is None and case["runtime_backend"] == "torch":
        assert got in (None, case["runs"])  # f78116c's torch runtime named no artifact; it ran the torch-fp32 weights
    else:
        assert got == case["artifact"]
    assert (runtime.backend, runtime.precision) == (case["runtime_backend"], case["runtime_precision"])
    assert measured(runtime) == case["measured_choice"], runtime.choice
    key = (name, runtime.backend, got, runtime.precision)
    if key in CHECKED:  # this artifact ran already: f78116c gave the same logits for it here too
        assert np.allclose(case["logits"], CHECKED[key], rtol=0, atol=1e-4), f"f78116c's logits of {got} differ by case"
        return
    logits = runtime.run(fixed_input(runtime.config, RECORD["bundles"][name]["input"]))
    expected = np.asarray(case["logits"], np.float32)
    atol = tolerance(case["runtime_precision"])
    assert logits.shape == expected.shape
    assert np.allclose(logits, expected, rtol=0, atol=atol), \
        f"{got}: max |diff| {np.abs(logits - expected).max():.3g} > {atol} (f78116c's logits)"
    if SAME_CPU:
        assert [int(i) for i in logits.argmax(1)] == case["top1"]
    CHECKED[key] = case["logits"]
