"""The one writer of bundles: nothing else changes a bundle's folder or its manifest.

* :func:`create` assembles a new bundle in a temporary folder that becomes ``--out`` when it is
  complete (an existing bundle there is replaced under a journal, keeping a user's files).
* :func:`changing` changes an existing bundle in place (``--format openvino/trt/deepstream
  --bundle``, ``cvt-bench --record``, the parity and readiness records): under the output lock,
  the new files staged beside the bundle (:meth:`Bundle.new_file`), then moved in and the
  manifest written once, under the journal; on any failure nothing of the bundle changes.
  Changes nest: inside :func:`create` or another change, the outer one writes.

Runtimes and checks only read (:class:`~cvt_deploy.bundle.Bundle`). Torch-free.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from .bundle import FORMAT, FORMAT_VERSION, JOURNAL, MANIFEST, SIDE_FILES, Bundle, _identity
from .config import CvtConfig
from .errors import CvtDeployError
from .interrupt import signals_held
from .jsonio import read_json
from .outlock import INNER_LOCK, check_unlocked, output_lock
from .sandbox import own_files
from .util import (PARTIAL_SUFFIX, BatchRange, atomic_write_text, current_umask, make_temporary_dir, remove_path,
                   require_writable, scratch_dir, stale_partials, temp_files_in, write_errors, write_failure)


def _write_manifest(bundle: Bundle) -> None:
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": bundle.config.to_dict(),
            "batch": bundle.batch.to_dict(), **bundle.extra,
            "artifacts": {k: a.to_dict() for k, a in sorted(bundle.artifacts.items())}}
    atomic_write_text(bundle.root / MANIFEST, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def create(out: str | os.PathLike[str], config: CvtConfig, batch: BatchRange,
           extra: dict[str, Any], overwrite: bool = True, planned: Sequence[str] = ()) -> Iterator[Bundle]:
    """Assemble a new bundle in a temporary folder; it becomes ``out`` on success only.

    A new ``out`` appears with one rename. An existing ``out`` (an empty folder, a mount
    point, a symlink, ``.``, or a bundle) is never renamed or removed: the new files are
    moved into it one by one, manifest last, under a journal (see :data:`JOURNAL`), and
    the old bundle's files that the new one lacks are removed. Files that are not the old
    bundle's are kept (``bundle.kept``); a folder that is not a bundle and not empty is
    refused, as is a bundle where a user's file sits at a name the new bundle writes
    (``planned`` names are checked before any work, the rest before anything is moved).
    """
    out = Path(out)
    with output_lock(out):  # one export at a time into out: the second fails, nothing is mixed
        notes = _clean_partials(out)
        owned = check_output(out, planned, overwrite)
        existing = out.is_dir()
        parent = out if existing else out.parent
        made: list[Path] = []
        try:
            try:
                parent.mkdir(parents=True, exist_ok=True)
                tmp = make_temporary_dir(parent, "cvt-export" if existing else out.name, made)
                os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; bundles are meant to be shared
            except OSError as e:
                raise write_failure(e, out) or CvtDeployError(
                    f"cannot write to {out}: {e.strerror}", "choose an --out folder you can write to") from None
            bundle = Bundle(tmp, config, batch, {}, dict(extra))
            bundle.notes = notes
            bundle._writing = True  # files go straight into tmp: the whole folder is the staging
            # Libraries' own temporary files (ONNX Runtime's quantizer, onnxsim...) go beside
            # the bundle too, so what a SIGKILL leaves is found and removed by the next export.
            try:
                with write_errors(out), scratch_dir(parent, "cvt-export" if existing else out.name) as scratch, \
                        temp_files_in(scratch):
                    yield bundle
                    _write_manifest(bundle)
            finally:
                bundle._writing = False
            with write_errors(out, any_cause=True):
                if existing:
                    bundle.kept = _install(tmp, out, owned or set())
                else:
                    tmp.rename(out)
            bundle.root = out
            bundle._manifest_identity = _identity(out / MANIFEST)
        finally:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def changing(bundle: Bundle) -> Iterator[Bundle]:
    """Change ``bundle`` in place: files written to :meth:`Bundle.new_file` and artifacts
    :meth:`Bundle.add`-ed (or facts recorded on them, ``bundle.extra``) land together when the
    block ends, with one manifest write; an exception leaves the bundle, on disk and in memory, as
    it was. Inside :func:`create` or another change this joins it."""
    if bundle._writing:
        yield bundle
        return
    root = bundle.root
    with output_lock(root):  # no export replaces the bundle meanwhile (re-entrant in one process)
        _check_current(bundle)
        saved = (copy.deepcopy(bundle.artifacts), copy.deepcopy(bundle.extra))
        try:
            with scratch_dir(root, "cvt-change") as stage:
                bundle._writing, bundle._stage, bundle._staged = True, stage, {}
                yield bundle
                with write_errors(root, any_cause=True):
                    _commit(bundle)
        except BaseException:
            bundle.artifacts, bundle.extra = saved
            raise
        finally:
            bundle._writing, bundle._stage, bundle._staged = False, None, {}


def _check_current(bundle: Bundle) -> None:
    """Refuse to write a manifest over one another command wrote since ``bundle`` was read."""
    try:
        now = _identity(bundle.root / MANIFEST)
    except OSError:
        now = None
    if bundle._manifest_identity is not None and now != bundle._manifest_identity:
        raise CvtDeployError(f"bundle {bundle.root} was rewritten by another command since it was opened here",
                             "run the command again: it reads the bundle as it is now")


def _commit(bundle: Bundle) -> None:
    """Move the staged files in and write the manifest, under the journal: a kill half-way leaves
    the journal, so Bundle.open says the folder is incomplete instead of reading a mix."""
    root, staged = bundle.root, dict(bundle._staged)
    with signals_held():
        if staged:
            atomic_write_text(root / JOURNAL, json.dumps({"pid": os.getpid(),
                                                          "files": sorted(set(staged) | {MANIFEST})}) + "\n")
        for name, path in staged.items():
            if path.exists():
                os.replace(path, root / name)
        bundle._staged = {}  # the files are in place: paths resolve to the bundle's folder again
        _write_manifest(bundle)
        (root / JOURNAL).unlink(missing_ok=True)
    bundle._manifest_identity = _identity(root / MANIFEST)


def check_output(out: Path, planned: Sequence[str] = (), overwrite: bool = True) -> set[str] | None:
    """Refuse an ``out`` that a new bundle must not be written to; the old bundle's files (None: no bundle).

    Cheap: callers run it before any long work, and :meth:`Bundle.create` again.
    """
    if out.exists() and not out.is_dir():
        raise CvtDeployError(f"output {out} exists and is not a folder", "choose another --out")
    require_writable(out)
    check_unlocked(out)
    if not out.is_dir():
        return None
    owned = bundle_files(out)
    user = _user_files(out, owned)
    if owned is None and user:
        raise CvtDeployError(f"output folder {out} is not empty and holds no cvt-deploy bundle ({_some(user)}); "
                             "refusing to write into it", "choose an empty or new --out folder")
    if owned is not None and not overwrite:
        raise CvtDeployError(f"output folder {out} already holds a bundle", "pass another --out or allow overwriting")
    _refuse_clashes(out, [n for n in planned if n in user])
    return owned


def bundle_files(root: Path, odd: list[str] | None = None) -> set[str] | None:
    """The files of the bundle in ``root`` (by its manifest's format marker, plus an interrupted replacement's
    journal; entries :func:`own_files` refuses claim nothing, ``odd`` gets them), or None when it holds no bundle."""
    files: set[str] = set()
    found = False
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):  # a journal without "files" is no journal
        files |= own_files(root, read_json(root / JOURNAL)["files"]) | {JOURNAL}
        found = True
    with contextlib.suppress(OSError, ValueError):
        raw = read_json(root / MANIFEST)
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            found = True
            files.add(MANIFEST)
            arts = raw.get("artifacts")
            for art in (arts.values() if isinstance(arts, dict) else ()):
                if isinstance(art, dict):
                    files |= own_files(root, (art.get("file"), *(art.get(k) for k in SIDE_FILES)), odd)
    return files if found else None


def _user_files(root: Path, owned: set[str] | None) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.name not in (owned or ()) and not p.name.endswith(PARTIAL_SUFFIX) and p.name != INNER_LOCK)


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refuse_clashes(out: Path, clashes: Sequence[str]) -> None:
    if clashes:
        odd: list[str] = []
        bundle_files(out, odd)  # an entry that claims nothing may be why an old bundle's file counts as a user's
        also = f" (its {MANIFEST} names {_some(odd)} where a file name belongs: such an entry claims nothing)" if odd else ""
        raise CvtDeployError(f"{out} holds files that are not part of its bundle where the new bundle writes: "
                             f"{_some(list(clashes))}; refusing to overwrite them{also}",
                             "move those files elsewhere, or choose another --out")


def _clean_partials(out: Path) -> list[str]:
    """Remove what killed runs left in and beside ``out``; say what was removed or left."""
    notes = []
    out = Path(os.path.abspath(out))  # "." has no name or parent of its own
    for folder, name in ((out, ""), (out.parent, out.name)):
        stale, unknown = stale_partials(folder, name)
        for p in stale:
            remove_path(p)
        if stale:
            notes.append(f"removed {len(stale)} leftover(s) of an interrupted export: {_some([p.name for p in stale])}")
        if unknown:
            notes.append(f"left {_some([str(p) for p in unknown])}: a temporary file of another run "
                         "(still running, or from an older cvt-deploy); delete it if no export is running")
    old = out.with_name(f".{out.name}.old")
    if old.is_dir():
        notes.append(f"{old} holds a bundle from an older cvt-deploy's interrupted replacement; delete it when done")
    return notes


def _install(tmp: Path, out: Path, owned: set[str]) -> list[str]:
    """Move the new bundle's files from ``tmp`` into ``out`` (manifest last); returns the user's files kept."""
    new = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == MANIFEST)
    user = _user_files(out, owned)
    _refuse_clashes(out, [n for n in new if n in user])
    atomic_write_text(out / JOURNAL, json.dumps({"pid": os.getpid(), "files": sorted(set(new) | owned)}) + "\n")
    with signals_held():
        for name in new:
            os.replace(tmp / name, out / name)
        for name in sorted(own_files(out, owned - set(new) - {JOURNAL, INNER_LOCK})):  # again: a folder may be there now
            remove_path(out / name)
        (out / JOURNAL).unlink()
    return [n for n in user if n != JOURNAL]
