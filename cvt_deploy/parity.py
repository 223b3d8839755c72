"""Accuracy parity: how far a runtime's logits are from the PyTorch fp32 reference.

Gates per precision. fp32 must reproduce the reference to float rounding; fp16 and int8
are judged by what users see (top-1 agreement, accuracy drop) plus cosine similarity as an
early warning. The limits were set from measurements on the demo model and CvT-13; see
docs/precision.md.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .artifacts import PRECISION, REFERENCE, Gates, gate_backend, runs  # noqa: F401  (Gates: re-exported)
from .errors import CvtDeployError, NotRightHere
from .progress import stage, track
from .table import format_table

from .util import PRECISIONS

if TYPE_CHECKING:
    from .bundle import Artifact, Bundle
    from .data import EvalData
    from .model import CvT
    from .runtimes.base import Runtime


#: The gates per precision are the registry's (artifacts.PRECISION); by name here for every caller.
GATES = {p.name: p.gates for p in PRECISION.values()}


@dataclass
class ParityReport:
    """Metrics of one candidate against the reference, and which gates held. Truthy iff all held."""

    candidate: str
    reference: str
    precision: str
    images: int
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cosine: float
    top1_agreement: float
    top5_overlap: float
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    data: str = ""
    artifact: str = ""  # the bundle artifact checked, when it was one
    backend: str = ""  # the backend that ran it, when it was a bundle's artifact
    checks: list[tuple[str, float, str, float, bool]] = field(default_factory=list)  # name, value, op, limit, ok

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return 100.0 * (self.accuracy_reference - self.accuracy_candidate)

    def __bool__(self) -> bool:
        return all(ok for *_, ok in self.checks)

    @property
    def failed(self) -> list[str]:
        return [f"{name} {value:.6g} (must be {op} {limit:g})" for name, value, op, limit, ok in self.checks if not ok]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = [dict(zip(("name", "value", "op", "limit", "ok"), c)) for c in self.checks]
        d["accuracy_drop"] = self.accuracy_drop
        d["passed"] = bool(self)
        return d

    def summary_row(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.2f}%"

        return [self.candidate, self.precision, str(self.images), pct(self.accuracy_reference), pct(self.accuracy_candidate),
                pct(self.top1_agreement), f"{self.min_cosine:.6f}", f"{self.max_abs:.2e}", "PASS" if self else "FAIL"]

    def __str__(self) -> str:
        rows = [["max |diff|", f"{self.max_abs:.3e}"], ["mean |diff|", f"{self.mean_abs:.3e}"],
                ["max rel diff", f"{self.max_rel:.3e}"], ["min cosine", f"{self.min_cosine:.6f}"],
                ["top-1 agreement", f"{100 * self.top1_agreement:.2f}%"], ["top-5 overlap", f"{100 * self.top5_overlap:.2f}%"]]
        if self.accuracy_reference is not None and self.accuracy_candidate is not None:
            rows += [["accuracy (reference)", f"{100 * self.accuracy_reference:.2f}%"],
                     ["accuracy (candidate)", f"{100 * self.accuracy_candidate:.2f}%"],
                     ["accuracy drop", f"{self.accuracy_drop:.2f} points"]]
        table = format_table(["metric", "value"], rows,
                             title=f"{self.candidate} vs {self.reference} on {self.images} images ({self.data})")
        verdict = "PASS" if self else "FAIL: " + "; ".join(self.failed)
        return f"{table}\ngates ({self.precision}): {verdict}"


def summary_table(reports: list[ParityReport]) -> str:
    return format_table(["candidate", "precision", "images", "acc ref", "acc cand", "top-1 agree", "min cos", "max |diff|", "gates"],
                        [r.summary_row() for r in reports])


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None, *,
            precision: str = "fp32", candidate_name: str = "candidate", reference_name: str = "reference",
            data: str = "", gates: Gates | None = None) -> ParityReport:
    """Metrics and gate verdicts for two (N, C) logit arrays of the same images."""
    ref = np.asarray(reference, np.float64)
    cand = np.asarray(candidate, np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise CvtDeployError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}",
                             "compare the same images on models with the same classes")
    if not np.isfinite(cand).all():
        raise CvtDeployError(f"{candidate_name} produced NaN/inf logits on {int((~np.isfinite(cand)).any(1).sum())} images",
                             "the precision overflowed: keep more ops in fp32, or use another precision")
    diff = np.abs(ref - cand)
    row_scale = np.maximum(np.abs(ref).max(axis=1), 1e-12)
    cos = (ref * cand).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
    k = min(5, ref.shape[1])
    top_ref, top_cand = np.argsort(-ref, 1)[:, :k], np.argsort(-cand, 1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand)])
    report = ParityReport(
        candidate=candidate_name, reference=reference_name, precision=precision, images=len(ref),
        max_abs=float(diff.max()), mean_abs=float(diff.mean()), max_rel=float((diff.max(1) / row_scale).max()),
        min_cosine=float(cos.min()), top1_agreement=float((top_ref[:, 0] == top_cand[:, 0]).mean()),
        top5_overlap=float(overlap), data=data)
    if labels is not None:
        report.accuracy_reference = float((top_ref[:, 0] == labels).mean())
        report.accuracy_candidate = float((top_cand[:, 0] == labels).mean())
    g = gates or GATES.get(precision, GATES[REFERENCE])
    checks = [("max |diff|", report.max_abs, "<=", g.max_abs), ("min cosine", report.min_cosine, ">=", g.min_cosine),
              ("top-1 agreement", report.top1_agreement, ">=", g.min_top1_agreement)]
    if report.accuracy_drop is not None:
        checks.append(("accuracy drop (points)", report.accuracy_drop, "<=", g.max_accuracy_drop))
    report.checks = [(name, value, op, limit, value <= limit if op == "<=" else value >= limit)
                     for name, value, op, limit in checks if limit is not None]
    return report


def run_batches(runtime: Runtime, batch: np.ndarray, chunk: int = 32, progress: bool = True) -> np.ndarray:
    """Logits of ``runtime`` on a preprocessed batch, in chunks, with a progress bar."""
    parts = [batch[i:i + chunk] for i in range(0, len(batch), chunk)]
    return np.concatenate([runtime.run(p) for p in track(parts, len(parts), f"  {runtime.describe()}", progress)])


def check_runtime(candidate: Runtime, reference: Runtime | np.ndarray, batch: np.ndarray,
                  labels: np.ndarray | None = None, *, data: str = "", progress: bool = True,
                  reference_name: str | None = None) -> ParityReport:
    """Run ``candidate`` (and ``reference``, unless its logits are given) and compare them."""
    ref = reference if isinstance(reference, np.ndarray) else run_batches(reference, batch, progress=progress)
    ref_name = reference_name or (reference.describe() if not isinstance(reference, np.ndarray) else "reference")
    ref, cand = comparable(ref, run_batches(candidate, batch, progress=progress), candidate)
    return compare(ref, cand, labels, precision=candidate.precision,
                   candidate_name=candidate.describe(), reference_name=ref_name, data=data)


# --- checking a bundle: any caller (cvt-export, cvt-check, the TensorRT build) -----------

class ParityFailure(CvtDeployError):
    """An artifact missed its precision's gates; ``reports`` say by how much."""

    exit_code = 1  # the CLIs' "ran, but a check failed"

    def __init__(self, reports: list[ParityReport]) -> None:
        self.reports = reports
        failed = [r for r in reports if not r]
        super().__init__(
            "parity gates failed for " + ", ".join(f"{r.candidate} ({'; '.join(r.failed)})" for r in failed),
            "see the table above; " + ("for int8: --int8-keep-float auto keeps the fewest costly layers float "
                                       "until the gates hold (or name them: cvt-check --rank-int8 and --layers on a "
                                       "--no-check export rank and locate them); " if any(PRECISION[r.precision].integer
                                                                                         for r in failed) else "")
            + "keep more ops in higher precision, calibrate on more representative data (--calib), or pass "
            "--no-check to write the bundle anyway")


def check_bundle(bundle: Bundle, *, data: str | EvalData | None = None, limit: int | None = None,
                 backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
                 device: str | None = None, progress: bool = True, reference_model: CvT | None = None,
                 artifacts: Sequence[str] | None = None) -> list[ParityReport]:
    """Parity of the bundle's artifacts (on ``backends``; ``artifacts``: only these names) against PyTorch fp32 on real data.

    The reference is PyTorch fp32 when torch and the bundle's weights are present, else the
    fp32 ONNX graph on ONNX Runtime CPU (so an edge device without torch can check its
    fp16/int8 graphs and engines; that graph is then not checked against itself).
    """
    from .data import DEFAULT_LIMIT, EvalData, load_eval_data
    from .backends import backend_class

    reference, ref_name, ref_artifact = _reference(bundle, reference_model)
    # Decide what is to be checked before the expensive part, so a request that matches
    # nothing fails at once.
    plan = []
    for backend in backends:
        backend_class(backend)  # an unknown name is refused before any work
        # decision: the check's plan is every artifact each backend runs (artifacts.runs), most precise first
        for art in sorted(bundle.artifacts.values(), key=lambda a: PRECISIONS.index(a.precision)):
            if runs(art, backend, device) and (not precisions or art.precision in precisions) \
                    and (artifacts is None or art.name in artifacts) \
                    and not (backend == reference.backend and art is ref_artifact):  # not against itself
                plan.append((backend, art))
    if not plan:
        raise CvtDeployError(f"nothing to check in {bundle.root} on {', '.join(backends)}"
                             + (f" at {', '.join(precisions)}" if precisions else "")
                             + (f" (the reference is {ref_name})" if ref_artifact is not None else ""),
                             f"build engines with: cvt-export --format trt --bundle {bundle.root}" if "tensorrt" in backends
                             else "export the artifacts first (cvt-export --precision ...), or pick another --backend/--precision")
    ev = data if isinstance(data, EvalData) else load_eval_data(data, bundle.config, DEFAULT_LIMIT if limit is None else limit, progress)
    ev = ev.held(progress=progress)  # read once for all the runtimes below, where it fits in memory
    with stage(f"running {ref_name} (reference) on {len(ev)} images", progress):
        (ref_logits,) = run_streamed([reference], ev, progress)
    # One candidate at a time, closed before the next opens: memory is one runtime's (its weights and
    # the activations of a chunk), not all of them at once (9.2 GB for CvT-13's ten at 224 px).
    reports, refused = [], []
    for backend, art in plan:
        try:
            runtime = _runtime_for(bundle, backend, art, device)
        except NotRightHere as e:  # a path this CPU cannot run right is not checked here: said, never run
            refused.append(e)
            print(f"  note: {art.name} not checked on {backend}: {e.message}", file=sys.stderr)
            continue
        try:
            with stage(f"running {runtime.describe()} on {len(ev)} images", progress):
                (cand,) = run_streamed([runtime], ev, progress)
            report = compare(*comparable(ref_logits, cand, runtime), ev.labels, precision=runtime.precision,
                             candidate_name=runtime.describe(), reference_name=ref_name, data=ev.description)
        finally:
            runtime.close()
            del runtime
        report.artifact, report.backend = art.name, backend
        reports.append(report)
    if not reports:
        if len(refused) == 1:
            raise refused[0]
        raise CvtDeployError(f"none of {', '.join(a.name for _, a in plan)} can run right on this machine "
                             f"on {', '.join(backends)} (see the notes above)", "check them on another backend")
    return reports


def _runtime_for(bundle: Bundle, backend: str, art: Artifact, device: str | None) -> Runtime:
    """The runtime that runs exactly ``art``: a bundle can hold several graphs of one precision
    (one per target, an ONNX graph and its OpenVINO IR), and ``load`` picks one of them."""
    from .backends import load
    from .runtimes.choice import CPU_BACKENDS, open_path

    if backend in CPU_BACKENDS:  # the backends that run any one of several graphs
        return open_path(bundle, backend, art.name, device=device)
    return load(bundle, backend=backend, device=device, precision=art.precision)


def comparable(reference: np.ndarray, candidate: np.ndarray, runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """Reference logits and a candidate's output made comparable. A probabilities graph's
    runtime gives log-probabilities: the logits less a per-image constant, so both are
    compared with the row mean removed (which changes neither ranking nor softmax)."""
    if runtime.output_kind != "probs":
        return reference, candidate
    return reference - reference.mean(axis=1, keepdims=True), candidate - candidate.mean(axis=1, keepdims=True)


def run_streamed(runtimes: Sequence[Runtime], ev: EvalData, progress: bool = True) -> list[np.ndarray]:
    """Logits of every runtime on ``ev``, one pass over the data: each chunk of images is
    read once, run by all, and dropped (only the logits are kept)."""
    from .data import CHUNK

    parts: list[list[np.ndarray]] = [[] for _ in runtimes]
    chunks = (len(ev) + CHUNK - 1) // CHUNK
    for batch in track(ev.chunks(CHUNK), chunks, "  images", progress and chunks > 1):
        for out, runtime in zip(parts, runtimes):
            out.append(runtime.run(batch))
    return [np.concatenate(p) for p in parts]


def _reference(bundle: Bundle, model: CvT | None) -> tuple[Any, str, Artifact | None]:
    """The reference runtime, its name, and the bundle artifact it runs (None for PyTorch)."""
    from .runtimes.ort import OrtRuntime
    from .runtimes.pytorch import TorchRuntime

    if model is not None:
        return TorchRuntime(model, "cpu"), "torch fp32 (cpu)", None
    # decision: the reference is the PyTorch weights where torch runs, else the portable fp32 graph (edge devices)
    if TorchRuntime.unavailable_reason() is None and bundle.find("torch", REFERENCE) is not None:
        return TorchRuntime.from_bundle(bundle), "torch fp32 (cpu)", None
    graph = bundle.find("onnx", REFERENCE)  # decision: as above
    return OrtRuntime.from_bundle(bundle, REFERENCE, artifact=graph.name if graph else None), \
        "onnxruntime fp32 (cpu; torch not installed)", graph


def record_parity(bundle: Bundle, kind: str, reports: list[ParityReport], show: bool = True,
                  advisory: Sequence[str] = ()) -> None:
    """Write each report into its ``kind`` artifact's manifest entry (by the backend that ran it),
    show the table (``show``), and raise :class:`ParityFailure` when any gate failed (the results
    are recorded first). A report of an ``advisory`` backend that missed its gates is a warning:
    the graph is what the export gates, on its own backend."""
    from .bundle_write import changing

    with changing(bundle):
        for rep in reports:
            # decision: a report names its artifact; older callers' reports, by kind and precision
            art = bundle.artifacts.get(rep.artifact) if rep.artifact else bundle.find(kind, rep.precision)
            if art is not None:
                art.record_parity(rep.backend or str(gate_backend(kind)), rep.to_dict())
    if show:
        print(summary_table(reports), file=sys.stderr)
    def is_advisory(rep: ParityReport) -> bool:  # a graph is gated by its own backend (artifacts.KIND) only
        art = bundle.artifacts.get(rep.artifact or "")
        return rep.backend in advisory and (art is None or gate_backend(art.kind) != rep.backend)

    for rep in reports:
        if not rep and is_advisory(rep):
            print(f"  warning: {rep.candidate} missed its gates ({'; '.join(rep.failed)}); the bundle is written for "
                  f"the other backends, but do not deploy this graph on {rep.backend}", file=sys.stderr)
    if not all(r for r in reports if not is_advisory(r)):
        raise ParityFailure(reports)
