"""Stopping on a signal even where a library swallows the exception it raised.

The commands turn Ctrl-C, SIGTERM and SIGHUP into an exception (``KeyboardInterrupt``,
:class:`Terminated`) so that every ``finally`` removes its temporary files. A native library
that calls back into Python can catch that exception on its way through C++ and carry on (an
export then ran to its end after Ctrl-C). So the signal is also noted here, and every
progress stage raises it again at its end (:func:`raise_if_interrupted`): the command stops
at the next stage boundary at the latest. Imports nothing of cvt-deploy.
"""
from __future__ import annotations

import signal
from typing import NoReturn

_pending: list[int] = []  # signals received by the handler and not yet handled by the command


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
    _raise(signum)


def raise_if_interrupted() -> None:
    """Raise again for a signal whose exception something caught and dropped."""
    if _pending:
        _raise(_pending[-1])


def received() -> int | None:
    """The last signal received (None: none), for the exit code."""
    return _pending[-1] if _pending else None


def clear() -> None:
    _pending.clear()
