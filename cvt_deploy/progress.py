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


def enabled() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], total: int, label: str, show: bool = True) -> Iterator[T]:
    """Yield ``items`` while drawing ``label [#####.....] i/total`` (terminals only)."""
    start = time.perf_counter()
    draw = show and enabled() and total > 1
    for i, item in enumerate(items, 1):
        yield item
        raise_if_interrupted()
        if draw:
            filled = int(30 * i / total)
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {i}/{total} "
                             f"{time.perf_counter() - start:5.1f}s")
            sys.stderr.flush()
    if draw:
        sys.stderr.write("\n")


@contextlib.contextmanager
def stage(label: str, show: bool = True) -> Iterator[None]:
    """Print ``label ...`` then ``done in X s`` (or ``failed``) around a block."""
    start = time.perf_counter()
    if show:
        sys.stderr.write(f"{label} ...")
        sys.stderr.flush()
    try:
        yield
        raise_if_interrupted()  # a signal whose exception a library inside the stage swallowed
    except BaseException:
        if show:
            sys.stderr.write(" failed\n")
        raise
    if show:
        sys.stderr.write(f" done in {time.perf_counter() - start:.1f}s\n")
