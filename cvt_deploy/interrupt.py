"""Stopping on a signal even where a library swallows the exception it raised.

The commands turn Ctrl-C, SIGTERM and SIGHUP into an exception (``KeyboardInterrupt``,
:class:`Terminated`) so that every ``finally`` removes its temporary files. A native library
that calls back into Python can catch that exception on its way through C++ and carry on (an
export then ran to its end after Ctrl-C). So the signal is also noted here, and every
progress stage raises it again at its end (:func:`raise_if_interrupted`): the command stops
at the next stage boundary at the latest. :func:`signals_held` puts the exception off for
the few steps that must not be cut in two. Imports nothing of cvt-deploy.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, NoReturn

_pending: list[int] = []  # signals received by the handler and not yet handled by the command
_holding = 0  # signals_held() blocks open in the main thread


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that every ``finally`` removes its temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int) -> NoReturn:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def on_signal(signum: int, frame: object) -> None:
    """The handler the commands install for SIGINT, SIGTERM and SIGHUP."""
    _pending.append(signum)
    if not _holding:
        _raise(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM/SIGHUP for the few renames of an install or a temporary folder's
    creation and recording: they arrive after it, so a stopped command leaves the old files or
    the new ones, not a mix, and no folder its ``finally`` does not know of.

    Blocking the signals in the main thread is not enough once other threads run (ONNX
    Runtime's, torch's): the kernel hands the signal to one of them and Python still runs the
    handler in the main thread, inside the block. So the commands' handler also notes the
    signal without raising while a hold is open, and it is raised when the hold ends.
    """
    global _holding
    held = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = len(_pending)
    _holding += 1  # before the mask and after it again: a handler running in between defers too
    previous = None
    try:
        if hasattr(signal, "pthread_sigmask"):
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one blocked in this thread is handled now, deferred
        _holding -= 1
    if not _holding and len(_pending) > before:
        _raise(_pending[-1])


def raise_if_interrupted() -> None:
    """Raise again for a signal whose exception something caught and dropped."""
    if _pending:
        _raise(_pending[-1])


def received() -> int | None:
    """The last signal received (None: none), for the exit code."""
    return _pending[-1] if _pending else None


def clear() -> None:
    _pending.clear()
