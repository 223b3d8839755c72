"""Timing: latency statistics and the interleaved scheduler that measures several cases fairly."""
from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import CvtDeployError
from ..progress import track

if TYPE_CHECKING:
    from ..runtimes.base import Runtime


@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds. Percentiles interpolate linearly between ranks
    (numpy's default), so the p50 of 1..100 is 50.5."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    n: int


def check_settings(lows: Sequence[tuple[str, float | None, int]], min_time: float | None = None) -> None:
    """The timing flags of any benchmark, checked before anything runs: each ``(flag, value,
    lowest allowed)`` (None: the default) and ``--min-time`` (None: not this caller's)."""
    for flag, value, low in lows:
        if value is not None and value < low:
            raise CvtDeployError(f"{flag} {value:g} is below {low}", f"pass {flag} {low} or more")
    if min_time is not None and not min_time > 0:
        raise CvtDeployError(f"--min-time {min_time:g} must be positive", "use e.g. --min-time 2")


@dataclass(frozen=True)
class TimingOptions:
    """How long and how fairly to time: what the in-process benchmark (``BenchOptions``) and the
    load test of a server (``LoadOptions``) share, validated here once for both (named as
    ``cvt-bench`` spells the flags, which map onto it).

    ``min_time``: seconds of timed calls per row (spread over the rounds). ``warmup``: untimed
    calls per row first. ``rounds``: interleaved rounds. ``settle``: untimed calls at the start
    of each block (the first call after a switch pays for the previous row). ``threads``: CPU
    threads of the runtimes timed in this process (None: their default).
    """

    min_time: float = 2.0
    warmup: int = 3
    rounds: int = 5
    settle: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        check_settings([("--threads", self.threads, 1), ("--rounds", self.rounds, 1), ("--warmup", self.warmup, 0),
                        ("--settle", self.settle, 0)], self.min_time)

    def fields(self) -> dict[str, Any]:
        """The fields as keywords, for the options objects that take them flat (``BenchOptions(**t.fields())``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def summarize(seconds: Sequence[float]) -> Stats:
    """Statistics of per-iteration timings given in seconds."""
    if len(seconds) == 0:
        raise ValueError("no timings to summarize")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Stats(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()), float(ms.max()), len(ms))


@dataclass(eq=False)
class Case:
    """One thing to time: ``call()`` then ``sync()`` (if any) per iteration; timings in ``times`` (s)."""

    name: str
    call: Callable[[], object]
    sync: Callable[[], object] | None = None
    iterations: int = 0  # timed calls: fixed if set beforehand, else measure_interleaved decides
    times: list[float] = field(default_factory=list)
    error: str | None = None  # set when a call raised; the case is then dropped from later rounds
    first: float | None = None  # the first (cold) call, seconds; never among ``times``

    @classmethod
    def for_runtime(cls, name: str, runtime: Runtime, batch: np.ndarray) -> Case:
        return cls(name, lambda: runtime.run(batch), runtime.synchronize)

    def _once(self) -> float:
        t0 = time.perf_counter()
        self.call()
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - t0


def measure_interleaved(cases: Sequence[Case], *, iterations: int | None = None, min_time: float = 2.0,
                        warmup: int = 3, rounds: int = 5, settle: int = 1, min_iterations: int = 10,
                        max_iterations: int = 10_000, progress: bool = True,
                        after_warmup: Callable[[Case], None] | None = None) -> None:
    """Warm up every case, then time them interleaved: each round runs a block of each case in turn.

    ``iterations``: timed calls per case (a case's own ``iterations``, when set, wins), spread
    evenly over ``rounds``. None: each block runs for ``min_time / rounds`` seconds (and at
    least ``min_iterations / rounds`` calls), so a case gets about ``min_time`` seconds however
    slow its calls turn out under load; a count fixed from warm-up speed would not be.
    At least one warm-up call is made. Each block starts with ``settle`` untimed calls: the
    first call after switching cases pays for the previous one (ONNX Runtime's worker threads
    spin on the cores for a while after a run; caches are cold). Measured here on CvT-13:
    +25 ms on a 65 ms call. A case whose call raises gets ``error`` set and is not run again;
    the others go on. ``after_warmup(case)`` is called once each case is warm (e.g. to read memory use).
    """
    if rounds < 1 or warmup < 0 or settle < 0 or min_time <= 0 or (iterations is not None and iterations < 1):
        raise CvtDeployError(f"rounds={rounds}, warmup={warmup}, settle={settle}, iterations={iterations}, "
                             f"min_time={min_time}: need rounds >= 1, warmup >= 0, settle >= 0, iterations >= 1 "
                             "and min_time > 0", "pass positive counts")
    for case in track(cases, len(cases), "warming up", show=progress):
        try:
            for i in range(max(1, warmup)):
                elapsed = case._once()
                if i == 0 and case.first is None:
                    case.first = elapsed
        except Exception as e:  # any backend error: report it in the row, keep measuring the rest
            case.error = _one_line(e)
            continue
        if after_warmup is not None:
            after_warmup(case)
        case.iterations = case.iterations or iterations or 0  # 0: timed blocks
    live = [c for c in cases if c.error is None]
    block_time = min_time / rounds
    block_min = math.ceil(min_iterations / rounds)
    block_max = math.ceil(max_iterations / rounds)
    schedule = [(r, c) for r in range(rounds) for c in live]
    for _, case in track(schedule, len(schedule), "measuring", show=progress):
        if case.error is not None:
            continue
        fixed = math.ceil(case.iterations / rounds) if case.iterations else 0
        todo = min(fixed, case.iterations - len(case.times)) if fixed else block_max
        gc_was_on = gc.isenabled()
        gc.disable()  # a collection inside one call would be charged to whichever case ran then
        try:
            for _ in range(settle):
                case._once()
            start, done = time.perf_counter(), 0
            while done < todo and (fixed or done < block_min or time.perf_counter() - start < block_time):
                case.times.append(case._once())
                done += 1
        except Exception as e:
            case.error = _one_line(e)
        finally:
            if gc_was_on:
                gc.enable()
    for case in live:
        case.iterations = len(case.times)


def _one_line(e: BaseException) -> str:
    if isinstance(e, CvtDeployError):
        return e.message
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
