"""What a bundle's artifacts are, and which one a backend runs: the one owner of those decisions.

Like timm's model registry or Optimum's ``TasksManager``, every fact about a precision, a graph
target, an artifact kind or a TensorRT release is one entry here, and everyone else asks:

* :data:`PRECISION`: per precision, its parity gates, what PyTorch computes it in, nvinfer's
  network mode and Triton's ONNX Runtime-TensorRT mode, and which measured GEMM bounds it.
* :data:`TARGET`: what a graph is built for (``portable``: every backend; ``onnxruntime-cpu``:
  ONNX Runtime's CPU provider only; ``tensorrt-10``: strongly typed TensorRT's int8 source).
* :data:`KIND`: artifact kinds (an ONNX graph, an engine, an IR ...) and the backend whose
  parity report gates each.
* :data:`RUNS`: the kinds each backend runs, preferred first (alternatives of one network).
* :data:`RELEASE`: the TensorRT releases graphs are written for, with their opset limits.
* :func:`artifact_name` / :func:`parse_artifact_name` / :func:`artifact_file`: an artifact's
  key in the manifest and its file in the bundle.
* :func:`select` (which artifact backend B runs for precision P on device D),
  :func:`candidates` (every graph it could run there, for the measured CPU choice),
  :func:`runs` (may it run this one) and :func:`engine_source` (which graph an engine is built
  from).

Adding a precision or a target is one entry in a table below. Standard library only: an edge
runtime reads bundles with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from .errors import CvtDeployError


@dataclass(frozen=True)
class Gates:
    """Limits a candidate must meet; None means not gated."""

    max_abs: float | None = None          # largest |logit difference|
    min_cosine: float | None = None       # smallest per-image cosine similarity of logits
    min_top1_agreement: float | None = None  # fraction of images with the same top-1 class
    max_accuracy_drop: float | None = None   # percentage points, when labels exist


@dataclass(frozen=True)
class Precision:
    """One numeric precision a bundle's graphs and engines come in."""

    name: str
    gates: Gates
    torch_dtype: str | None           # what the torch backend computes it in; None: torch does not run it
    torch_devices: tuple[str, ...]    # where torch computes it ("cuda" covers cuda:N)
    nvinfer_mode: int                 # DeepStream nvinfer network-mode (plugin manual: 0 FP32, 1 INT8, 2 FP16)
    triton_mode: str                  # Triton's ONNX Runtime-TensorRT accelerator precision_mode
    gemm_kinds: tuple[str, ...]       # the measured GEMMs that bound a row of it (bench/limits.py)
    file_tag: str                     # in file names: model<tag>.onnx ("" for fp32)
    cpu_arithmetic: bool              # CPU backends compute in it (fp16: computed in f32, never the fast CPU path)
    integer: bool                     # integer arithmetic: its rows are measured as a speed-up over fp32
    trt_flags: tuple[str, ...]        # the builder flags a weakly typed TensorRT build sets for it (none: fp32, TF32 off)
    nvinfer_builds: bool              # nvinfer builds its engine from the ONNX graph (int8 Q/DQ: it cannot)


PRECISION = {p.name: p for p in (
    # Float rounding differences between kernels stay far below 1e-3 on CvT logits.
    Precision("fp32", Gates(max_abs=1e-3, min_cosine=0.99999, min_top1_agreement=0.999), "float32", ("cpu", "cuda"),
              0, "FP32", ("fp32",), "", True, False, (), True),
    # CPUs without fp16 arithmetic make torch's fp16 crawl or fail: the torch backend runs it on CUDA only.
    Precision("fp16", Gates(min_cosine=0.999, min_top1_agreement=0.995, max_accuracy_drop=0.5), "float16", ("cuda",),
              2, "FP16", ("fp16", "fp32"), ".fp16", False, False, ("FP16",), True),
    # nvinfer's int8 is implicit calibration (int8-calib-file), which explicit Q/DQ graphs do not use.
    Precision("int8", Gates(min_cosine=0.98, max_accuracy_drop=1.0), None, (), 1, "INT8", ("int8",), ".int8",
              True, True, ("FP16", "INT8"), False),  # INT8: the Q/DQ nodes set the scales; FP16 around them
)}
#: Most precise first: "the most precise one present" walks this order; the first is every check's reference.
PRECISIONS = tuple(PRECISION)
REFERENCE = PRECISIONS[0]


def check_precision(precision: Any, what: str = "precision") -> str:
    """``precision`` if it is one cvt-deploy knows, else an error naming it."""
    if precision not in PRECISION:
        raise CvtDeployError(f"unknown {what} {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return str(precision)


@dataclass(frozen=True)
class Target:
    """What a graph is built for: its manifest ``target`` (absent = portable)."""

    name: str
    backends: tuple[str, ...] | None   # which backends may run it (None: every one)
    devices: tuple[str, ...] | None    # on which devices (None: any)
    meant_for: tuple[str, ...] | None  # whose graph it is: a candidate when that backend picks one (None: all)
    preferred: bool                    # picked over the portable graph where it may run (it is faster there)
    precisions: tuple[str, ...]        # the precisions it is written in
    file: str                          # the ONNX file, {tag} = the precision's file_tag
    what: str                          # who it is built for, as an error names it
    label: str                         # how a results table names it, beside its backend


TARGET = {t.name: t for t in (
    # Standard ONNX ops: what TensorRT and every execution provider compile.
    Target("portable", None, None, None, False, PRECISIONS, "model{tag}.onnx", "every backend", "portable"),
    # ONNX Runtime contrib ops and dynamic int8 (export/ort_cpu.py): only its CPU provider runs it.
    Target("onnxruntime-cpu", ("onnxruntime",), ("cpu",), ("onnxruntime",), True, ("fp32", "int8"),
           "model.ort-cpu{tag}.onnx", "ONNX Runtime's CPU provider", "ort-cpu"),
    # The int8+fp16 graph (export/fp16.py): opset-19 fp16 Q/DQ scales, what strongly typed TensorRT
    # >= 10 builds int8 from. ONNX Runtime runs it to check it; it is nobody's pick to run.
    Target("tensorrt-10", ("onnxruntime",), None, ("tensorrt", "tensorrt-rtx"), False, ("int8",),
           "model{tag}-fp16.onnx", "strongly typed TensorRT >= 10 (ONNX Runtime runs it to check it)", "tensorrt-10"),
)}
TARGETS = tuple(TARGET)


@dataclass(frozen=True)
class Kind:
    """An artifact kind: what sort of file it is."""

    name: str
    gate_backend: str | None  # whose parity report its "parity" entry holds (others: "parity_on")
    file: str | None          # its file in the bundle ({tag}: the precision's file_tag, {p}: its name)
    any_precision: bool = False  # one file serves every precision (torch weights cast at load)
    weights_file: bool = False   # its weights lie in a second file, named by the manifest's weights_file
    label: str | None = ""       # how a results table names it beside its backend (None: by its target's label)
    format: str | None = None    # the cvt-export --format that adds it to an existing bundle


KIND = {k.name: k for k in (
    Kind("onnx", "onnxruntime", None, label=None),  # file per target: TARGET[...].file
    Kind("tensorrt", "tensorrt", "model.{p}.engine", format="trt"),
    Kind("tensorrt-rtx", "tensorrt-rtx", "model.{p}.rtx.engine", format="trt-rtx"),
    Kind("torch", "torch", "model.safetensors", any_precision=True),
    Kind("deepstream", "tensorrt", "nvinfer_config.txt", format="deepstream"),  # an nvinfer config: one per bundle
    Kind("openvino", "openvino", "model{tag}.openvino.xml", format="openvino", weights_file=True, label="IR"),  # an IR, its .bin as weights_file
)}
ARTIFACT_KINDS = tuple(KIND)

#: The kinds each backend runs, preferred first: alternatives of one network (OpenVINO's IR is the
#: portable ONNX graph converted), never two graphs to choose between (those are targets).
RUNS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnx",),
    "openvino": ("openvino", "onnx"),
    "tensorrt": ("tensorrt",),
    "tensorrt-rtx": ("tensorrt-rtx",),
    "hf": (),  # Hugging Face transformers' own CvT: a reference that reads no artifact
}


@dataclass(frozen=True)
class Release:
    """A TensorRT release the portable graphs can be written for (``--tensorrt``)."""

    name: str
    max_opset: int        # the newest opset its docs claim (docs/operators.md header)
    opset_is_limit: bool  # its importer mis-reads newer opsets (8.x: ReduceMean's axes input), not just unclaimed
    layernorm: str        # "node": one LayerNormalization; "decomposed": ReduceMean/Sub/Pow/... (8.5 has no importer)
    where: str            # which platforms ship it


RELEASE = {r.name: r for r in (
    Release("8.5", 17, True, "decomposed", "JetPack 5.1"),
    Release("8.6", 17, True, "node", "JetPack 6.0"),
    Release("10", 20, False, "node", "JetPack 6.1+ and x86"),
)}
#: Oldest first: a graph written for one release must parse on it and every newer one.
TENSORRT_TARGETS = tuple(RELEASE)
#: The default graphs (single LayerNormalization nodes) parse on 8.6 and 10.x.
DEFAULT_TENSORRT = "8.6"


def release_name(version: Any) -> str | None:
    """The release a TensorRT version belongs to ("8.5.2.2" -> "8.5", "10.3" -> "10"), None if unknown."""
    parts = str(version).strip().split(".")
    key = "10" if parts[0] == "10" else ".".join(parts[:2])
    return key if key in RELEASE else None


def check_tensorrt_target(value: Any, flag: str = "--tensorrt") -> str:
    """``value`` as a known TensorRT target ("8.5", "8.6", "10"); accepts "10.3" style for 10."""
    found = release_name(value)
    if found is None or (found != "10" and str(value).strip() != found):
        raise CvtDeployError(f"{flag} {value!r} is not a TensorRT release this tool writes graphs for "
                             f"(valid: {', '.join(TENSORRT_TARGETS)})",
                             f"use {flag} " + ", ".join(f"{r.name} for {r.where}" for r in RELEASE.values()))
    return found


def targets_from(oldest: str) -> list[str]:
    """The TensorRT releases a graph written for ``oldest`` must parse on (it and every newer one)."""
    return list(TENSORRT_TARGETS[TENSORRT_TARGETS.index(check_tensorrt_target(oldest)):])


# -- identity ---------------------------------------------------------------------------------
def artifact_name(kind: str, precision: str, target: str = "portable") -> str:
    """An artifact's key in the manifest: ``onnx-int8``, ``onnx-fp32-onnxruntime-cpu``."""
    return f"{kind}-{precision}" + ("" if target == "portable" else f"-{target}")


def parse_artifact_name(name: str) -> tuple[str, str, str] | None:
    """(kind, precision, target) of a manifest key :func:`artifact_name` writes, else None."""
    for kind in sorted(KIND, key=len, reverse=True):  # "tensorrt-rtx" before "tensorrt"
        if name.startswith(kind + "-"):
            precision, _, target = name[len(kind) + 1:].partition("-")
            if precision in PRECISION and (target or "portable") in TARGET:
                return kind, precision, target or "portable"
    return None


def artifact_file(kind: str, precision: str, target: str = "portable") -> str:
    """The file an artifact of this key has in a bundle (``model.int8.onnx``, ``model.fp16.engine``)."""
    tag = PRECISION[precision].file_tag
    pattern = TARGET[target].file if kind == "onnx" else KIND[kind].file
    assert pattern is not None
    return pattern.format(tag=tag, p=precision)


# -- selection --------------------------------------------------------------------------------
class ArtifactLike(Protocol):
    name: str
    kind: str
    precision: str

    @property
    def target(self) -> str: ...


class BundleLike(Protocol):
    @property
    def artifacts(self) -> Mapping[str, Any]: ...


def _device(device: str | None) -> str:
    return (device or "cpu").split(":")[0]  # cuda:1 is where cuda is


def runs(art: ArtifactLike, backend: str, device: str | None = "cpu") -> bool:
    """Whether ``backend`` can run ``art`` on ``device`` at all (asked by name, e.g. cvt-check's)."""
    target = TARGET[art.target]
    return (art.kind in RUNS.get(backend, ()) and (target.backends is None or backend in target.backends)
            and (target.devices is None or _device(device) in target.devices))


def _computes(backend: str, precision: str, device: str | None) -> bool:
    if "torch" in RUNS.get(backend, ()):
        p = PRECISION[precision]
        return p.torch_dtype is not None and _device(device) in p.torch_devices
    return True


def candidates(bundle: BundleLike, backend: str, precision: str, device: str | None = "cpu") -> list[Any]:
    """Every graph of ``precision`` that ``backend`` could be given on ``device``: one per target
    meant for it (its preferred kind there), preferred targets first. What the measured CPU choice
    times; :func:`select` takes the first."""
    if not _computes(backend, precision, device):
        return []
    out = []
    targets = sorted((t for t in TARGET.values() if t.meant_for is None or backend in t.meant_for),
                     key=lambda t: not t.preferred)
    for target in targets:
        for kind in RUNS.get(backend, ()):
            art = bundle.artifacts.get(artifact_name(kind, REFERENCE if KIND[kind].any_precision else precision,
                                                     target.name))
            if art is not None and art.target == target.name and runs(art, backend, device):
                out.append(art)
                break
    return out


def select(bundle: BundleLike, backend: str, precision: str | None = None, device: str | None = "cpu") -> Any | None:
    """The artifact ``backend`` runs for ``precision`` (None: the most precise the bundle has for
    it) on ``device``, or None when the bundle has none: the one answer every caller asks for."""
    for p in ([precision] if precision else PRECISIONS):
        found = candidates(bundle, backend, p, device)
        if found:
            return found[0]
    return None


def runnable(bundle: BundleLike, backend: str, device: str | None = "cpu") -> list[str]:
    """The names of every artifact ``backend`` can run on ``device`` (for errors that list them)."""
    return [n for n, a in bundle.artifacts.items() if runs(a, backend, device)]


def engine_source(bundle: BundleLike, precision: str, strongly_typed: bool) -> tuple[Any | None, str, bool]:
    """The ONNX graph a TensorRT engine of ``precision`` is built from: (artifact or None, the
    precision of graph wanted, whether a strongly typed int8 build fell back to the fp32 Q/DQ graph)."""
    # Weakly typed (8.6) fp16 = the fp32 graph + FP16 flag; everything else needs its own typed graph.
    want = "fp32" if precision == "fp16" and not strongly_typed else precision
    # Strongly typed int8: the int8+fp16 graph where the bundle has it (else what lies outside
    # Q/DQ would run in fp32), the fp32 Q/DQ graph otherwise.
    typed = [t.name for t in TARGET.values() if strongly_typed and want in t.precisions
             and t.meant_for is not None and "tensorrt" in t.meant_for]
    for target in typed:
        art = bundle.artifacts.get(artifact_name("onnx", want, target))
        if art is not None and art.target == target:
            return art, want, False
    art = bundle.artifacts.get(artifact_name("onnx", want))
    return art, want, bool(typed) and art is not None


def tensorrt_bound(bundle: BundleLike) -> list[Any]:
    """The ONNX graphs TensorRT builds from: those of every target meant for it (portable included)."""
    return [a for a in bundle.artifacts.values() if a.kind == "onnx" and a.target in TARGET
            and "tensorrt" in (TARGET[a.target].meant_for or ("tensorrt",))]  # None: meant for every backend


def label(name: str) -> str:
    """How a results table names the artifact ``name`` beside its backend ("IR", "ort-cpu"; "" for none)."""
    key = parse_artifact_name(name)
    if key is None:
        return ""
    kind, _, target = key
    return TARGET[target].label if KIND[kind].label is None else str(KIND[kind].label)


def gate_backend(kind: str) -> str | None:
    """The backend whose parity report an artifact's ``parity`` entry holds."""
    return KIND[kind].gate_backend


def precisions_present(bundle: BundleLike, backend: str, device: str | None = "cpu",
                       among: Sequence[str] = PRECISIONS) -> list[str]:
    """The precisions (of ``among``) for which ``backend`` has something to run in the bundle."""
    return [p for p in among if candidates(bundle, backend, p, device)]
