"""One writer per output: two exports into the same ``--out`` never interleave.

Each export holds an exclusive lock (``flock``) on ``.<out>.cvt-lock`` beside the output folder
(inside it, as ``.cvt-export.cvt-lock``, when the parent cannot be written: a mount point, ``.``
in a read-only parent) from its first check of the folder to its last rename. A second export
into the same place fails at once, naming the pid that holds it, instead of mixing its files
with the first's. The lock file is removed when the export ends; one left by a killed export is
not locked by anyone and is taken over (and removed) by the next. Torch-free.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from .errors import CvtDeployError

INNER_LOCK = ".cvt-export.cvt-lock"
_HELD: set[Path] = set()  # lock files this process holds (flock: a second open of one conflicts with the first)


def lock_path(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    beside = out.parent / f".{out.name}.cvt-lock"
    if out.is_dir() and not os.access(out.parent, os.W_OK):
        return out / INNER_LOCK
    return beside


def _busy(out: Path, fd: int) -> CvtDeployError:
    with contextlib.suppress(OSError, ValueError):
        holder = os.pread(fd, 32, 0).decode().strip()
    return CvtDeployError(f"another export is writing {out} now" + (f" (pid {holder})" if holder else ""),
                          "wait for it to finish and export again, or choose another --out")


def check_unlocked(out: Path) -> None:
    """Refuse at once (before long work) when another export holds ``out``; takes nothing."""
    try:
        import fcntl
    except ImportError:  # no flock on this system: no lock either
        return
    path = lock_path(out)
    if path in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody writes there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _busy(out, fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one export; a :class:`CvtDeployError` when another export holds it. Re-entrant."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = lock_path(out)
    if path in _HELD:  # this process holds it already (a change inside a command that took it): flock would refuse
        yield
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            # Nothing can be written there (a file in the way, a read-only folder): the export's
            # own checks say so in their words, and no other export can write there either.
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            error = _busy(out, fd) if e.errno in (errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if error is None:
                raise
            raise error from None
        # The holder before us removes the file as it finishes: a lock on a file that is no
        # longer at ``path`` excludes nobody, so take the one that is there now.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    _HELD.add(path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
