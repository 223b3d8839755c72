"""What ``cvt-check --layers`` found: per layer of a candidate graph, how far its tensor is from
the fp32 graph's on the same images, where the error first jumps, and how to show it (a table,
JSON, a plot). The measuring is cvt_deploy.layers'.

Per compared tensor and image: cosine similarity of the two tensors (flattened), relative
error ``||fp32 - candidate|| / ||fp32||`` and the largest ``|fp32 - candidate|``; per layer the
worst and mean image.

The first jump is the first layer (in graph order) where the candidate's error grows at once
rather than by accumulation: its worst-image cosine falls more than :data:`COS_DROP` below the
lowest of every layer before it, or its mean relative error exceeds :data:`REL_FACTOR` times the
highest of every layer before it and :data:`REL_FLOOR` (a layer where NaN/inf appear jumps too).
Cosine ignores scale, relative error does not: a layer that computes the right direction at the
wrong magnitude (a bad weight scale) jumps by the second rule. The mean over images, not the
worst image, for relative error: on the demo model's 360 held-out digits one image's relative
error tripled from one healthy int8 layer to the next (0.04 to 0.12) while the means stay
within 0.003 to 0.027 at every layer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import CvtDeployError, require
from .table import format_table
from .util import atomic_output

COS_DROP = 0.02   # a fall of the worst-image cosine below every earlier layer's by more than this is a jump
REL_FACTOR = 3.0  # ... or a mean relative error over this many times every earlier layer's
REL_FLOOR = 0.1   # ... that is also above this (fp16's tiny errors may triple without meaning anything)
REL_SHOWN = 1e-8  # the plot's lowest relative error (a graph equal to fp32 there: exactly 0)
JUMP_RULE = (f"the first layer whose worst-image cosine falls more than {COS_DROP:g} below every earlier layer's, "
             f"or whose mean relative error exceeds both {REL_FACTOR:g}x every earlier layer's and "
             f"{REL_FLOOR:g} (or where NaN/inf appear)")


@dataclass
class LayerRow:
    """One compared tensor: where it is and how far the candidate's is from the fp32 graph's."""

    index: int        # position in graph order (depth)
    kind: str         # Conv, MatMul, Gemm, block, logits
    module: str       # PyTorch module (state_dict name), '' for an unnamed node
    node: str         # ONNX node
    tensor: str = ""            # the fp32 graph's tensor compared
    candidate_tensor: str = ""  # the candidate's
    min_cosine: float | None = None
    mean_cosine: float | None = None
    mean_rel_error: float | None = None
    max_rel_error: float | None = None
    max_abs_diff: float | None = None
    nonfinite: int = 0         # images whose candidate tensor held NaN/inf (left out of the figures)
    skipped: str = ""          # why this point was not compared (not in the candidate graph ...)

    @property
    def name(self) -> str:
        return f"{self.module} ({self.node})" if self.module else self.node

    @property
    def compared(self) -> bool:
        return not self.skipped


@dataclass
class LayerReport:
    """Layer-by-layer parity of one candidate graph against the bundle's fp32 graph."""

    candidate: str   # describe(): "onnxruntime int8 (model.int8.onnx)"
    artifact: str
    backend: str
    reference: str
    images: int
    data: str
    mode: str        # "named" or "all"
    group: int       # tensors exposed per pass (the memory bound)
    rows: list[LayerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compared_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if r.compared]

    @property
    def skipped_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if not r.compared]

    @property
    def first_jump(self) -> LayerRow | None:
        """The row where the error first jumps (module docstring), None when it grows smoothly."""
        i = first_jump([r for r in self.rows if r.compared])
        return None if i is None else self.compared_rows[i]

    def to_dict(self) -> dict[str, Any]:
        jump = self.first_jump
        return {"candidate": self.candidate, "artifact": self.artifact, "backend": self.backend,
                "reference": self.reference, "images": self.images, "data": self.data, "mode": self.mode,
                "group": self.group, "jump_rule": JUMP_RULE,
                "first_jump": None if jump is None else {"index": jump.index, "module": jump.module, "node": jump.node,
                                                         "kind": jump.kind},
                "skipped": len(self.skipped_rows), "notes": list(self.notes),
                "layers": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        keys = ("candidate", "artifact", "backend", "reference", "images", "data", "mode", "group")
        return cls(**{k: d[k] for k in keys}, rows=[LayerRow(**r) for r in d["layers"]], notes=list(d.get("notes", [])))

    def __str__(self) -> str:
        jump = self.first_jump
        rows = []
        for r in self.compared_rows:
            rows.append([str(r.index), r.module or "-", r.node, r.kind, _num(r.min_cosine, 6), _num(r.mean_cosine, 6),
                         _sci(r.mean_rel_error), _sci(r.max_rel_error), _sci(r.max_abs_diff),
                         "<- first jump" if r is jump else ("NaN/inf" if r.nonfinite else "")])
        table = format_table(["#", "layer", "node", "kind", "min cos", "mean cos", "mean rel", "max rel", "max |diff|",
                              "note"],
                             rows, title=f"{self.candidate} vs {self.reference}, layer by layer, on {self.images} "
                                         f"images ({self.data})")
        lines = [table]
        if jump is None:
            lines.append("first jump: none (the error grows smoothly layer by layer)")
        else:
            before = [r for r in self.compared_rows if r.index < jump.index]
            was = (f"; before it: min cos {_num(min(r.min_cosine or 1.0 for r in before), 6)}, mean rel "
                   f"{_sci(max(r.mean_rel_error or 0.0 for r in before))}") if before else ""
            lines.append(f"first jump: {jump.name}: min cos {_num(jump.min_cosine, 6)}, mean rel "
                         f"{_sci(jump.mean_rel_error)}{was}")
        skipped = self.skipped_rows
        if skipped:
            shown = ", ".join(r.name for r in skipped[:6]) + (" ..." if len(skipped) > 6 else "")
            lines.append(f"skipped {len(skipped)} of {len(self.rows)} points not comparable in both graphs "
                         f"(fused or renamed in the candidate): {shown}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: a figure that is not finite (a relative error to an all-zero tensor) is null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def first_jump(rows: Sequence[LayerRow]) -> int | None:
    """Index into ``rows`` (compared rows, graph order) of the first jump, by :data:`JUMP_RULE`."""
    lowest_cos, highest_rel = 1.0, 0.0
    for i, r in enumerate(rows):
        if r.nonfinite:
            return i
        if r.min_cosine is None or r.mean_rel_error is None:
            continue
        if r.min_cosine < lowest_cos - COS_DROP or r.mean_rel_error > max(REL_FACTOR * highest_rel, REL_FLOOR):
            return i
        lowest_cos, highest_rel = min(lowest_cos, r.min_cosine), max(highest_rel, r.mean_rel_error)
    return None


class Stats:
    """Per-image figures of one compared point, gathered chunk by chunk (no tensor is kept)."""

    def __init__(self) -> None:
        self.cos: list[np.ndarray] = []
        self.rel: list[np.ndarray] = []
        self.diff: list[np.ndarray] = []
        self.bad = 0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """``ref``, ``cand``: (images, values) of the same images."""
        a = np.asarray(ref, np.float64)
        b = np.asarray(cand, np.float64)
        finite = np.isfinite(b).all(axis=1)
        self.bad += int((~finite).sum())
        a, b = a[finite], b[finite]
        d = a - b
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300))
        nd = np.linalg.norm(d, axis=1)
        self.cos.append(np.clip(cos, -1.0, 1.0))
        self.rel.append(np.where(na == 0, np.where(nd == 0, 0.0, math.inf), nd / np.maximum(na, 1e-300)))
        self.diff.append(np.abs(d).max(axis=1) if d.shape[1] else np.zeros(len(d)))

    def fill(self, row: LayerRow) -> None:
        cos, rel, diff = (np.concatenate(x) if x else np.zeros(0) for x in (self.cos, self.rel, self.diff))
        row.nonfinite = self.bad
        if len(cos):
            row.min_cosine, row.mean_cosine = float(cos.min()), float(cos.mean())
            row.mean_rel_error, row.max_rel_error = float(rel.mean()), float(rel.max())
            row.max_abs_diff = float(diff.max())


def check_plot_path(path: str | Path) -> tuple[Path, str]:
    """``path`` and the image format its name asks for, refused (before any work) where matplotlib
    is missing or does not write that format."""
    require("matplotlib", "plot", "--plot (plotting the layer table)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise CvtDeployError(f"--plot {path}: unsupported image type {path.suffix or '(none)'}",
                             "name it FILE.png (or .svg, .pdf)")
    return path, fmt


def plot(reports: Sequence[LayerReport], path: str | Path) -> Path:
    """Worst-image cosine and mean relative error against depth, one line per candidate, each first jump marked."""
    path, fmt = check_plot_path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(r.compared_rows for r in reports):
        raise CvtDeployError("no layer was compared, so there is nothing to plot", "see the table's skipped points")
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_cos, ax_rel = fig.subplots(2, 1, sharex=True)
    for rep in reports:
        rows = [r for r in rep.compared_rows if r.min_cosine is not None]
        x = [r.index for r in rows]
        (line,) = ax_cos.plot(x, [r.min_cosine for r in rows], marker=".", label=rep.candidate)
        ax_rel.plot(x, [max(r.mean_rel_error or 0.0, REL_SHOWN) for r in rows], marker=".", color=line.get_color())
        jump = rep.first_jump
        if jump is not None and jump.min_cosine is not None:
            for ax, y in ((ax_cos, jump.min_cosine), (ax_rel, max(jump.mean_rel_error or 0.0, REL_SHOWN))):
                ax.plot([jump.index], [y], marker="o", markersize=11, markerfacecolor="none", color=line.get_color())
            ax_rel.annotate(f"first jump: {jump.module or jump.node}", (jump.index, max(jump.mean_rel_error or 0.0, REL_SHOWN)),
                            textcoords="offset points", xytext=(6, 6), fontsize=8, color=line.get_color())
    ax_rel.set_yscale("log")
    ax_cos.set_ylabel("min cosine (worst image)")
    ax_rel.set_ylabel("relative error (mean)")
    ax_rel.set_xlabel("layer (graph order; see the table's # column)")
    blocks = [r for r in (reports[0].compared_rows if reports else []) if r.kind == "block"]
    ax_rel.set_xticks([r.index for r in blocks], [r.module.replace(".blocks.", ".b") for r in blocks], rotation=45,
                      fontsize=8)
    ax_cos.legend(fontsize=8)
    ax_cos.set_title(f"layer parity vs {reports[0].reference} on {reports[0].images} images" if reports else "")
    for ax in (ax_cos, ax_rel):
        ax.grid(alpha=0.3)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return path
