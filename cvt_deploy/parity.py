"""Accuracy parity: how far a runtime's logits are from the PyTorch fp32 reference.

Gates per precision. fp32 must reproduce the reference to float rounding; fp16 and int8
are judged by what users see (top-1 agreement, accuracy drop) plus cosine similarity as an
early warning. The limits were set from measurements on the demo model and CvT-13; see
README "Precision".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CvtDeployError
from .progress import track
from .report import format_table

if TYPE_CHECKING:
    from .runtimes.base import Runtime


@dataclass(frozen=True)
class Gates:
    """Limits a candidate must meet; None means not gated."""

    max_abs: float | None = None          # largest |logit difference|
    min_cosine: float | None = None       # smallest per-image cosine similarity of logits
    min_top1_agreement: float | None = None  # fraction of images with the same top-1 class
    max_accuracy_drop: float | None = None   # percentage points, when labels exist


GATES = {
    # Float rounding differences between kernels stay far below 1e-3 on CvT logits.
    "fp32": Gates(max_abs=1e-3, min_cosine=0.99999, min_top1_agreement=0.999),
    "fp16": Gates(min_cosine=0.999, min_top1_agreement=0.995, max_accuracy_drop=0.5),
    "int8": Gates(min_cosine=0.98, max_accuracy_drop=1.0),
}


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
    g = gates or GATES.get(precision, GATES["fp32"])
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
    return compare(ref, run_batches(candidate, batch, progress=progress), labels, precision=candidate.precision,
                   candidate_name=candidate.describe(), reference_name=ref_name, data=data)
