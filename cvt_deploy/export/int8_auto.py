"""``--int8-keep-float auto``: the fewest layers an int8 export keeps float for its gates to hold.

What NNCF's ``quantize_with_accuracy_control(max_drop)`` does, steered by the measured ranking
instead of trial and error over every layer:

1. the quantized layers of the int8 graph are ranked by what keeping each one float gives back
   (:func:`cvt_deploy.sensitivity.rank_int8_layers`, on the first images of the export's check set);
2. the ``k`` most costly are kept float together, ``k`` = 1, 2, 4, ... until the int8 gates hold
   and the accuracy drop is at most ``max_drop``; then the smallest ``k`` between the last miss and
   that hit (bisection). Each trial is the int8 graph with those layers' Q/DQ removed
   (:func:`cvt_deploy.sensitivity.keep_float`: what the quantizer writes with them excluded), run on
   every check image against the fp32 graph, judged by :func:`cvt_deploy.parity.compare`.

The plan found is quantized for real and then checked by the export's own gates, on ONNX Runtime
and (where installed) OpenVINO, like a plan a user wrote; the manifest records how it was found.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CvtDeployError

if TYPE_CHECKING:
    from ..data import EvalData
    from ..parity import Gates, ParityReport
    from .int8_plan import Int8Plan

AUTO = "auto"
DROP_FLAG = "--int8-max-drop"


def check_max_drop(value: Any, gate: float) -> float | None:
    """``value`` (percentage points of top-1 accuracy) as a float within the int8 gate, else an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CvtDeployError(f"{DROP_FLAG} {value!r} is not a number of percentage points >= 0",
                             f"e.g. {DROP_FLAG} 0.5: int8 may lose at most half a point of top-1 accuracy")
    if value > gate:
        raise CvtDeployError(f"{DROP_FLAG} {value:g} is looser than the int8 gate ({gate:g} points), which every "
                             "int8 export holds anyway", f"use {DROP_FLAG} {gate:g} or less, or omit it for the gate's")
    return float(value)


def trial_gates(max_drop: float | None, labels: bool) -> Gates:
    """The int8 gates, with ``max_drop`` where given: on the accuracy drop where the check images
    have labels, else on top-1 disagreement with fp32 (which bounds the drop from above)."""
    from ..parity import GATES

    g = GATES["int8"]  # decision: this module plans int8 graphs, and only those
    if max_drop is None:
        return g
    if labels:
        return dataclasses.replace(g, max_accuracy_drop=min(max_drop, g.max_accuracy_drop or math.inf))
    return dataclasses.replace(g, min_top1_agreement=1.0 - max_drop / 100.0)


def auto_plan(int8: Path, fp32: Path, base: Int8Plan, data: EvalData, *, max_drop: float | None = None,
              rank_images: int | None = None, cache: Path | None = None, progress: bool = True) -> Int8Plan:
    """``base`` (the layers named by the user) and the fewest top-ranked quantized layers of the
    int8 graph ``int8`` (quantized with ``base``) whose keeping float makes the int8 gates (and
    ``max_drop``) hold on ``data`` against the fp32 graph ``fp32``. Its ``auto`` says how."""
    from ..parity import compare
    from ..sensitivity import DEFAULT_IMAGES, graph_logits, keep_float, rank_int8_layers
    from .int8_plan import plan_int8

    start = time.perf_counter()
    ev = data.held(progress=progress)
    images = ev.batch
    gates = trial_gates(max_drop, ev.labels is not None)
    ref = graph_logits(fp32, images)
    order: list[str] = []
    tried: dict[int, ParityReport] = {}

    def judge(k: int) -> bool:
        if k not in tried:
            if k == 0:
                y = graph_logits(int8, images)
            else:
                with tempfile.TemporaryDirectory(prefix="cvt-auto-") as tmp:
                    keep_float(int8, fp32, order[:k], Path(tmp) / "trial.onnx")
                    y = graph_logits(Path(tmp) / "trial.onnx", images)
            tried[k] = compare(ref, y, ev.labels, precision="int8", gates=gates, data=ev.description)
            if progress:
                print(f"  {k} layer{'s' if k != 1 else ''} float: {_figures(tried[k])}: "
                      f"{'meets the gates' if tried[k] else 'misses: ' + '; '.join(tried[k].failed)}", file=sys.stderr)
        return bool(tried[k])

    low, high, ranking = 0, None, None  # low: the most layers known to miss; high: the fewest known to hold
    if not judge(0):  # only then is the ranking worth its minutes
        ranking = rank_int8_layers(int8, fp32, data=images, limit=min(rank_images or DEFAULT_IMAGES, len(images)),
                                   cache=cache, progress=progress)
        order = [r.node for r in ranking.rows]
        k = 1
        while high is None:
            if judge(min(k, len(order))):
                high = min(k, len(order))
            elif k >= len(order):
                break
            else:
                low, k = min(k, len(order)), 2 * k
        if high is None:
            raise CvtDeployError(
                f"{AUTO}: the int8 gates miss even with all {len(order)} quantized layers float "
                f"({_figures(tried[len(order)])}): what misses is not int8's rounding",
                "check the calibration images (--calib) match the check images (--data), or export fp16")
        while high - low > 1:
            mid = (low + high) // 2
            if judge(mid):
                high = mid
            else:
                low = mid
    chosen = order[:high or 0]
    plan = plan_int8(fp32, [*base.keep_float, *chosen])
    by_node = {r.node: (rank, r) for rank, r in enumerate(ranking.rows if ranking else [], 1)}
    record = {
        "max_drop": max_drop, "gates": dataclasses.asdict(gates), "images": len(images), "data": ev.description,
        "ranked": {"layers": len(order), "images": ranking.images, "seconds": round(ranking.seconds, 1),
                   "cached": ranking.cached} if ranking else None,
        "chosen": [{"node": n, "module": by_node[n][1].module, "rank": by_node[n][0], "gain": by_node[n][1].gain}
                   for n in chosen],
        "trials": [{"layers": k, "passed": bool(r), "min_cosine": r.min_cosine, "top1_agreement": r.top1_agreement,
                    "accuracy_drop": r.accuracy_drop} for k, r in sorted(tried.items())],
        "result": {"layers": high or 0, "min_cosine": tried[high or 0].min_cosine,
                   "top1_agreement": tried[high or 0].top1_agreement, "accuracy_drop": tried[high or 0].accuracy_drop},
        "seconds": round(time.perf_counter() - start, 1)}
    return dataclasses.replace(plan, keep_float=(*base.keep_float, AUTO), auto=record)


def explain(plan: Int8Plan) -> str:
    """What ``auto`` chose and why, for the terminal: the layers with their rank and gain, and the trials."""
    from ..table import format_table

    auto = plan.auto or {}
    if not auto.get("chosen"):
        return (f"{AUTO}: the int8 gates hold with every layer int8 on {auto.get('images')} check images: "
                "nothing more is kept float (and nothing was ranked)")
    rows = [[str(c["rank"]), c["module"] or "-", c["node"], f"{100 * c['gain']:.1f}%"] for c in auto["chosen"]]
    last = auto["result"]
    title = (f"{AUTO}: kept float, the fewest of the {auto['ranked']['layers']} ranked layers for the int8 gates "
             f"to hold on {auto['images']} check images ({len(auto['trials'])} trials, {auto['seconds']:.0f} s)")
    drop = "" if last["accuracy_drop"] is None else f", accuracy drop {last['accuracy_drop']:.2f} points"
    return format_table(["rank", "module", "node", "gain"], rows, title) + (
        f"\nwith them float: min cosine {last['min_cosine']:.4f}, top-1 agreement "
        f"{100 * last['top1_agreement']:.2f}%{drop} (gain: the share of int8's cosine error the layer accounts for)")


def _figures(r: ParityReport) -> str:
    drop = f", accuracy drop {r.accuracy_drop:.2f} points" if r.accuracy_drop is not None else ""
    return f"min cosine {r.min_cosine:.4f}, top-1 agreement {100 * r.top1_agreement:.2f}%{drop}"
