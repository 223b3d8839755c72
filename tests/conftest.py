# Foundation fixtures
#
# Checkpoints made by the tests themselves (nothing can be downloaded here): Hugging Face
# CvtForImageClassification models with random weights, saved with save_pretrained.
# Other parts of the suite may append their own fixtures below this block.
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

# Widths / heads / depths of the tiny test architecture (cvt_deploy's "cvt-tiny").
TINY_HF_KW = {"embed_dim": [16, 32, 64], "num_heads": [1, 2, 4], "depth": [1, 2, 3]}


def randomize_weights_(model: Any, seed: int = 0) -> None:
    """Give a model weights under which every part of the computation shows (in place).

    Freshly initialised norms are identities (mean 0, var 1, weight 1, bias 0), which would
    let a port that drops or misplaces them pass a parity test; and HF's Linear init
    (std 0.02) keeps MLP inputs so small that GELU and QuickGELU agree to 1e-4. So: random
    BatchNorm statistics and affine params, random LayerNorm affine params, a random class
    token, and Linear weights with std 1/sqrt(fan_in) (activations of order 1).
    """
    import math

    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g) * std + mean).to(t.dtype)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(rnd(mod.running_mean, 0.0, 0.3))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.copy_(rnd(mod.weight, 1.0, 0.2))
                mod.bias.copy_(rnd(mod.bias, 0.0, 0.2))
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(rnd(mod.weight, 0.0, 1 / math.sqrt(mod.in_features)))
                if mod.bias is not None:
                    mod.bias.copy_(rnd(mod.bias, 0.0, 0.1))
        for name, p in model.named_parameters():
            if name.endswith("cls_token"):
                p.copy_(rnd(p, 0.0, 0.5))


@pytest.fixture(scope="session")
def randomize_weights() -> Callable[..., None]:
    """:func:`randomize_weights_` as a fixture, so test modules need not import conftest."""
    return randomize_weights_


@dataclass
class HFCheckpoint:
    folder: Path  # config.json + model.safetensors (or pytorch_model.bin)
    model: Any  # the transformers CvtForImageClassification it was saved from (eval mode)
    labels: tuple[str, ...]


@pytest.fixture(scope="session")
def hf_cvt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., HFCheckpoint]:
    """Factory ``(arch="tiny"|"cvt-13"|"default", num_labels=10, bin=False, **config_kw) -> HFCheckpoint``, cached.

    ``arch="cvt-13"`` uses transformers.CvtConfig defaults (the CvT-13 architecture).
    ``arch="default"`` is ``transformers.CvtConfig()`` exactly as a user gets it: CvT-13,
    2 classes, and (transformers 5) no id2label/num_labels in config.json.
    ``config_kw`` are further ``transformers.CvtConfig`` fields (an architecture of one's own).
    ``bin=True`` stores the weights as ``pytorch_model.bin`` instead of safetensors.
    Labels are ``("class_0", ...)`` so that reading id2label is observable.
    """
    cache: dict[tuple[Any, ...], HFCheckpoint] = {}

    def make(arch: str = "tiny", num_labels: int = 10, bin: bool = False, **config_kw: Any) -> HFCheckpoint:
        key = (arch, num_labels, bin, repr(sorted(config_kw.items())))
        if key in cache:
            return cache[key]
        import torch
        import transformers

        if arch not in ("tiny", "cvt-13", "default"):
            raise ValueError(arch)
        arch_kw = {**(TINY_HF_KW if arch == "tiny" else {}), **config_kw}
        if arch == "default":
            config = transformers.CvtConfig(**arch_kw)
            num_labels = config.num_labels
            labels: tuple[str, ...] = ()
        else:
            labels = tuple(f"class_{i}" for i in range(num_labels))
            config = transformers.CvtConfig(
                **arch_kw,
                num_labels=num_labels,
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
            )
        torch.manual_seed(1234 + num_labels)
        model = transformers.CvtForImageClassification(config).eval()
        randomize_weights_(model, seed=num_labels)
        folder = tmp_path_factory.mktemp(f"hf-{arch}-{num_labels}{'-bin' if bin else ''}{'-own' if config_kw else ''}")
        model.save_pretrained(folder)
        if bin:
            # transformers 5 has no safe_serialization=False: write the legacy file by hand.
            from safetensors.torch import load_file

            st = folder / "model.safetensors"
            torch.save(load_file(str(st)), folder / "pytorch_model.bin")
            st.unlink()
        cache[key] = HFCheckpoint(folder, model, labels)
        return cache[key]

    return make


# ONNX path fixtures
#
# Exporting takes seconds, so each graph the ONNX-path tests need is exported ONCE per
# session: the demo model as a checked bundle (dynamic batch), the demo model with a static
# batch of 4, and CvT-13 with random weights (slow tests only). Tests that damage or
# re-export a bundle work on a copy (``bundle_copy``), never on the session bundle.


@dataclass
class DemoExport:
    model: Any  # the demo CvT (eval mode) the bundle was exported from
    root: Path  # the bundle folder


@pytest.fixture(scope="session")
def demo_model() -> Any:
    pytest.importorskip("torch")
    from cvt_deploy.checkpoints import load_checkpoint
    from cvt_deploy.demo import DEMO_WEIGHTS

    return load_checkpoint(DEMO_WEIGHTS)


def shared_build(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Path:
    """``<run folder>/shared-<name>``, made by ``build(folder)`` once per test run.

    Under pytest-xdist each worker has its own session, so a session fixture would export the
    same bundle once per worker; instead the first worker to ask builds it in the folder all
    workers share (under an exclusive lock), and the others wait and reuse it.
    """
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # <run>/popen-gwN -> <run>, the same for every worker of this run
    folder = base / f"shared-{name}"
    done = base / f"shared-{name}.done"
    failed = base / f"shared-{name}.failed"  # what the build raised: the other workers fail at once too
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"shared fixture {name!r} failed earlier in this run (not built again): {failed.read_text()}",
                        pytrace=False)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker killed half-way
            folder.mkdir()
            try:
                build(folder)
            except Exception as e:
                failed.write_text(_summary(e))
                raise
            done.touch()
    return folder


def _summary(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:1500]}"


# Fixtures broader than a test that fail (an export that misses a gate on this CPU) fail each of
# their tests at once with the first error: pytest 9 would set them up again for every test.
_FAILED_FIXTURES: dict[tuple[str, str, str], str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Any:
    if fixturedef.scope == "function":
        return (yield)
    key = (fixturedef.baseid, fixturedef.argname, request.node.nodeid)
    if key in _FAILED_FIXTURES:
        pytest.fail(f"fixture {fixturedef.argname!r} failed earlier in this run (not set up again): "
                    f"{_FAILED_FIXTURES[key]}", pytrace=False)
    try:
        return (yield)
    except Exception as e:  # not pytest's skip/fail outcomes (BaseException): a skip is cheap and right again
        _FAILED_FIXTURES[key] = _summary(e)
        raise


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory, demo_model: Any) -> DemoExport:
    """export_bundle of the demo model, default settings, parity check on (one export per run)."""
    pytest.importorskip("onnxruntime")
    from cvt_deploy.demo import DEMO_WEIGHTS
    from cvt_deploy.export.pipeline import export_bundle

    # time_cpu=False in the shared bundles: what load() picks must not hang on a timing taken
    # while other tests load the cores; test_choice.py times bundles of its own.
    folder = shared_build(tmp_path_factory, "demo-export", lambda f: export_bundle(
        demo_model, f / "bundle", source=str(DEMO_WEIGHTS), progress=False, time_cpu=False))
    return DemoExport(demo_model, folder / "bundle")


@pytest.fixture(scope="session")
def demo_bundle(demo_export: DemoExport) -> Path:
    return demo_export.root


def export_to(tmp_path_factory: pytest.TempPathFactory, model: Any, name: str, shared: bool = False,
              **options: Any) -> Path:
    """``export_bundle(model, <a new temporary folder named name>/bundle, **options)``, quietly; the bundle folder.
    ``shared``: one export per test run, whichever process asks first (session fixtures)."""
    from cvt_deploy.export.pipeline import export_bundle

    options.setdefault("time_cpu", False)  # as in demo_export
    if shared:
        return shared_build(tmp_path_factory, name, lambda f: export_bundle(model, f / "bundle", progress=False,
                                                                           **options)) / "bundle"
    out = tmp_path_factory.mktemp(name) / "bundle"
    export_bundle(model, out, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def demo_full_bundle(tmp_path_factory: pytest.TempPathFactory, demo_model: Any) -> Path:
    """The demo model with every precision (fp32, fp16, int8; ONNX Runtime CPU graphs beside
    them; default TensorRT target), parity gates on: one export for every module that reads
    such a bundle. Read only: copy it to change it."""
    pytest.importorskip("onnxruntime")
    return export_to(tmp_path_factory, demo_model, "demo-full", shared=True, precisions=("fp32", "fp16", "int8"), calib_count=64,
                     check_limit=128)


@pytest.fixture(scope="session")
def demo_ir_bundle(tmp_path_factory: pytest.TempPathFactory, demo_full_bundle: Path) -> Path:
    """:func:`demo_full_bundle` plus an OpenVINO IR of each of its precisions (the int8 IR's weights
    7-bit: it runs right on every x86 CPU), gated on OpenVINO as ``cvt-export --format openvino
    --bundle`` does. Read only: copy it to change it."""
    pytest.importorskip("openvino")
    import shutil

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.bundle_write import changing
    from cvt_deploy.export.openvino import write_openvino_irs
    from cvt_deploy.parity import check_bundle, record_parity

    def build(folder: Path) -> None:
        shutil.copytree(demo_full_bundle, folder / "bundle")
        bundle = Bundle.open(folder / "bundle")
        with changing(bundle):  # as cvt-export --format openvino --bundle adds them
            arts = write_openvino_irs(bundle, ("fp32", "fp16", "int8"), progress=False)
            reports = check_bundle(bundle, backends=["openvino"], limit=128, artifacts=[a.name for a in arts],
                                   progress=False)
            record_parity(bundle, "openvino", reports, show=False)

    return shared_build(tmp_path_factory, "demo-ir", build) / "bundle"


@pytest.fixture
def bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the demo bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle-copy"
    shutil.copytree(demo_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def static_bundle(tmp_path_factory: pytest.TempPathFactory, demo_model: Any) -> Path:
    """The demo model exported with a fixed batch of 4 (BatchRange(4, 4, 4)), unchecked."""
    pytest.importorskip("onnxruntime")
    from cvt_deploy.bundle import BatchRange

    return export_to(tmp_path_factory, demo_model, "static-export", shared=True, batch=BatchRange(4, 4, 4), check=False)


@pytest.fixture(scope="session")
def demo_test_split() -> Any:
    from cvt_deploy.demo import demo_split

    return demo_split("test")


@dataclass
class Cvt13Export:
    model: Any  # cvt_deploy CvT-13 with random weights (randomize_weights_), eval mode
    path: Path  # model.onnx exported with export_onnx (default opset and batch range), with metadata


@pytest.fixture(scope="session")
def cvt13_export(tmp_path_factory: pytest.TempPathFactory) -> Cvt13Export:
    """CvT-13 (random, non-trivial BatchNorm statistics) exported once with export_onnx."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from cvt_deploy.export.onnx import export_onnx, graph_metadata
    from cvt_deploy.model import create_model

    torch.manual_seed(13)  # the convolutions keep their default init: seeded, every process has the same model
    model = create_model("cvt-13")
    randomize_weights_(model, seed=13)
    folder = shared_build(tmp_path_factory, "cvt13-export", lambda f: export_onnx(
        model, f / "model.onnx", metadata=graph_metadata(model.cfg.to_json(), "fp32", {"batch": {"min": 1, "opt": 8, "max": 64}})))
    return Cvt13Export(model, folder / "model.onnx")


@pytest.fixture
def stub_export_onnx(monkeypatch: pytest.MonkeyPatch, demo_bundle: Path) -> list[dict[str, Any]]:
    """Make export_bundle's ONNX export stage instant: it copies the session's genuine demo graph.

    For tests of the pipeline around the export (atomicity, parity failures, argument
    checks), not of the export itself. Works for the demo model only. Returns the calls.
    """
    import shutil

    from cvt_deploy.bundle import atomic_output

    calls: list[dict[str, Any]] = []

    def fake_export_onnx(model: Any, path: Any, **kw: Any) -> Path:
        calls.append({"model": model, "path": Path(path), **kw})
        assert model.cfg.variant == "cvt-tiny" and model.cfg.num_classes == 10, "stub serves the demo model only"
        with atomic_output(path) as tmp:
            shutil.copyfile(demo_bundle / "model.onnx", tmp)
        return Path(path)

    monkeypatch.setattr("cvt_deploy.export.pipeline.export_onnx", fake_export_onnx)
    return calls


@pytest.fixture(scope="session")
def leftovers() -> Callable[[Path], list[str]]:
    """``leftovers(folder)``: names of temporary/partial files an aborted write could leave."""

    def find(folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if p.name.endswith(".partial") or p.name.endswith(".old") or p.name.startswith(".simplify."))

    return find


@pytest.fixture(scope="session")
def demo_reference(demo_model: Any, demo_test_split: Any) -> Any:
    """PyTorch logits of the demo model on the whole preprocessed held-out split (N, 10)."""
    import torch

    from cvt_deploy.preprocess import preprocess

    batch = preprocess(list(demo_test_split.images), demo_model.cfg.preprocess)
    with torch.no_grad():
        return torch.cat([demo_model(torch.from_numpy(batch[i:i + 120])) for i in range(0, len(batch), 120)]).numpy()


# Shared test helpers
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import ClassVar, Iterator  # noqa: E402


def rand_batch(n: int, seed: int, size: int = 64) -> Any:
    """``n`` standard-normal NCHW float32 images (an already preprocessed batch), reproducible."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def raw_pixel_copy(float_bundle: Path, dst: Path, input_format: str, output: str) -> Path:
    """A copy of a float bundle at ``dst`` through the export's raw-pixel stage (what
    --input-format runs after the precision stages), without exporting again."""
    import shutil

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.export.rawpixel import embed_bundle_io

    shutil.copytree(float_bundle, dst)
    embed_bundle_io(Bundle.open(dst), input_format, output, progress=False)
    return dst


def script(name: str) -> str:
    """The installed console script ``name`` (cvt-export ...) beside this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"console script {name} is not installed next to {sys.executable}")
    return str(path)


def run_script(name: str, *args: str, timeout: int = 120, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a cvt-deploy command as a user would: a subprocess, its output captured."""
    return subprocess.run([script(name), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})



def run_cli(name: str, *args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command ``name`` run in this process through its console-script entry point.

    What :func:`run_script` checks (exit code, stdout, stderr) without starting Python and
    importing torch again for each call (~1.3 s). An exception that escapes the command is
    written to stderr as the traceback a user would see, so ``"Traceback" in err`` still
    tells. Process-level behaviour (signals, kills, what the installed script imports) needs
    :func:`run_script`.
    """
    import contextlib
    import io
    import traceback
    import warnings
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name=name)
    main = entry.load()
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) -> sha256 of its bytes; symlinks as their target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(proc: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> str:
    """Assert a clean refusal: exit ``code``, no traceback, an error line and a fix line naming ``words``."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err
    assert "error:" in err and "fix:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# What every command does after its arguments and files are checked: a test that asserts a
# refusal "before any work" replaces these with a failure (the no_work fixture).
WORK = ("cvt_deploy.checkpoints.load_checkpoint", "cvt_deploy.model.create_model", "cvt_deploy.backends.load",
        "cvt_deploy.export.pipeline.export_bundle", "cvt_deploy.parity.check_bundle", "cvt_deploy.bench.benchmark")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that must refuse before any work: loading a model or bundle, exporting,
    checking or timing fails the test (a refusal that comes after the work is no refusal)."""
    import importlib

    for target in WORK:
        module, name = target.rsplit(".", 1)
        importlib.import_module(module)

        def never(*args: Any, _target: str = target, **kwargs: Any) -> None:
            raise AssertionError(f"{_target} ran before the refusal")

        monkeypatch.setattr(target, never)


from cvt_deploy.runtimes.base import Runtime  # noqa: E402


class InProcessRuntime(Runtime):
    """Base for tests' own small numpy runtimes: they test the Runtime base class and its
    callers (scheduling, splitting, padding), never a real backend's behaviour."""

    backend: ClassVar[str] = "test"
    install_hint: ClassVar[str] = ""

    @classmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        return None

    @classmethod
    def from_bundle(cls, bundle: Any, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> Runtime:
        raise NotImplementedError("built directly in tests")


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Calibration caches (and anything else under XDG_CACHE_HOME) go to a temporary folder,
    for in-process calls and the CLIs the tests start alike: the suite leaves ~/.cache alone."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m", readonly: bool = False) -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` (skips the test when mounting is not permitted): a full
    disk or a read-only file system that holds even for root, as chmod does not."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): needs root in a "
                    "container that allows mounts")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def cpu_load(processes: int | None = None) -> Iterator[None]:
    """Every CPU kept busy by spinning processes (a loaded machine), stopped by pid afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes or os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)


def default_signals() -> None:
    """``preexec_fn`` for a command a test signals: a shell's background job inherits SIGINT
    ignored, and Python keeps it so; a user's terminal delivers Ctrl-C to a foreground process,
    which is what this stands for."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Planted int8 outliers (tests/test_sensitivity.py)
#
# Transformers break int8 through outlier channels: a few channels of an activation hundreds of
# times larger than the rest, so one per-tensor scale leaves the others a bit or two. The demo
# model has none; this plants them, function-preserving: attention's output is linear in V, so
# scaling output channels of ``attn.proj_v`` by s and the matching input columns of ``attn.proj``
# by 1/s leaves every fp32 logit as it was (to float rounding) while ``attn.proj``'s input
# carries those channels s times larger. Measured (360 held-out digits, 64 calibration images):
# the demo's int8 graph has min cosine 0.9986; planted in stage2.blocks.1 with s = 200, 0.0249
# below zero, accuracy down 1.9 points (fp32 logits within 1e-6 of the demo's). s = 100 there
# missed the cosine gate too (0.41) but not the accuracy one; other blocks (stage2.blocks.0/2,
# stage1.blocks.1 at s = 100) missed the cosine gate only.
PLANTED_BLOCK = "stage2.blocks.1"
PLANTED_CHANNELS = (5, 17, 42)
PLANTED_SCALE = 200.0


def plant_outliers_(model: Any, block: str = PLANTED_BLOCK, channels: tuple[int, ...] = PLANTED_CHANNELS,
                    scale: float = PLANTED_SCALE) -> str:
    """Plant outlier channels in the input of ``<block>.attn.proj`` (in place); returns that module's name."""
    import torch

    attn = model.get_submodule(f"{block}.attn")
    idx = torch.tensor(channels)
    with torch.no_grad():
        attn.proj_v.weight[idx] *= scale
        attn.proj_v.bias[idx] *= scale
        attn.proj.weight[:, idx] /= scale
    return f"{block}.attn.proj"


@dataclass
class PlantedInt8:
    model: Any  # the demo CvT with outliers planted (eval mode): its fp32 logits are the demo's
    weights: Path  # the same model as a cvt-deploy checkpoint (for cvt-export --weights)
    bundle: Path  # fp32 + int8 Q/DQ bundle of it (no ONNX Runtime CPU graphs), exported unchecked, then
    #               checked as cvt-export checks (ONNX Runtime, PyTorch reference): its parity is recorded, int8's a miss
    module: str  # the layer int8 breaks: the Linear whose input carries the outliers (stage2.blocks.1.attn.proj)
    source: str  # the Linear whose output channels were scaled (stage2.blocks.1.attn.proj_v)
    channels: tuple[int, ...]
    scale: float


@pytest.fixture(scope="session")
def planted_int8(tmp_path_factory: pytest.TempPathFactory, demo_model: Any) -> PlantedInt8:
    """The demo model with int8-breaking outlier channels planted (one build per run). Read only."""
    pytest.importorskip("onnxruntime")
    import copy

    from cvt_deploy.bundle import Bundle
    from cvt_deploy.checkpoints import save_checkpoint
    from cvt_deploy.export.pipeline import export_bundle
    from cvt_deploy.parity import ParityFailure, check_bundle, record_parity

    model = copy.deepcopy(demo_model).eval()
    module = plant_outliers_(model)

    def build(folder: Path) -> None:
        save_checkpoint(model, folder / "planted.safetensors")
        export_bundle(model, folder / "bundle", source=str(folder / "planted.safetensors"), precisions=("fp32", "int8"),
                      calib_count=64, check=False, ort_cpu=False, rtx_build=False, time_cpu=False, progress=False)
        bundle = Bundle.open(folder / "bundle")
        with contextlib.suppress(ParityFailure):  # the int8 miss is the point: recorded, asserted by the tests
            record_parity(bundle, "onnx", check_bundle(bundle, reference_model=model, progress=False), show=False)

    folder = shared_build(tmp_path_factory, "planted-int8", build)
    return PlantedInt8(model, folder / "planted.safetensors", folder / "bundle", module,
                       f"{PLANTED_BLOCK}.attn.proj_v", PLANTED_CHANNELS, PLANTED_SCALE)
