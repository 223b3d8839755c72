"""Progress for long work, on stderr, without dependencies.

A bar when the total is known and stderr is a terminal; otherwise one line per stage, so
logs of CI and scripts stay readable.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

from .interrupt import raise_if_interrupted

T = TypeVar("T")


# In a log (stderr not a terminal), a progress line at most this often.
LOG_EVERY = 10.0
# The label of the stage whose "label ..." line is still open (progress lines break it).
_open_stage: list[str] = []


def say(line: str) -> None:
    """Print one line of progress on stderr inside a stage (the stage's open line is ended first)."""
    _break_stage_line()
    print(line, file=sys.stderr, flush=True)


def enabled() -> bool:
    return sys.stderr.isatty()


def _break_stage_line() -> None:
    if _open_stage and _open_stage[-1]:
        sys.stderr.write("\n")
        _open_stage[-1] = ""


class Progress:
    """``done`` of ``total`` units of work (``unit``: "images" ...) and the time left: a bar
    redrawn on a terminal; in a log, one line every :data:`LOG_EVERY` seconds, so a long step
    is never silent there."""

    def __init__(self, total: int, label: str, show: bool = True, unit: str = "") -> None:
        self.total, self.label, self.unit = total, label, f" {unit}" if unit else ""
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.tty = enabled()
        self.show = show and total > 1
        self.drawn = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        raise_if_interrupted()
        if not self.show:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < LOG_EVERY:
            return
        self.last = now
        _break_stage_line()
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        counts = f"{min(self.done, self.total)}/{self.total}{self.unit}"
        if self.tty:
            filled = int(30 * min(self.done, self.total) / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {counts} {elapsed:5.1f}s"
                             + (f", {left:.0f}s left " if self.done < self.total else " " * 12))
        else:
            sys.stderr.write(f"{self.label}: {counts} in {elapsed:.0f}s, about {left:.0f}s left\n")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn and self.tty:
            sys.stderr.write("\n")
            self.drawn = False


def track(items: Iterable[T], total: int, label: str, show: bool = True) -> Iterator[T]:
    """Yield ``items`` with :class:`Progress` by item."""
    bar = Progress(total, label, show)
    try:
        for item in items:
            yield item
            bar.advance()
    finally:
        bar.close()


@contextlib.contextmanager
def stage(label: str, show: bool = True) -> Iterator[None]:
    """Print ``label ...`` then ``done in X s`` (or ``failed``) around a block."""
    start = time.perf_counter()
    if show:
        sys.stderr.write(f"{label} ...")
        sys.stderr.flush()
    _open_stage.append(label if show else "")
    try:
        yield
        raise_if_interrupted()  # a signal whose exception a library inside the stage swallowed
    except BaseException:
        if show:
            sys.stderr.write(" failed\n" if _open_stage[-1] else f"{label}: failed\n")
        raise
    finally:
        still_open = _open_stage.pop()
    if show:
        done = f"done in {time.perf_counter() - start:.1f}s"
        sys.stderr.write(f" {done}\n" if still_open else f"{label}: {done}\n")
