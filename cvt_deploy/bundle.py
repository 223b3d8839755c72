"""The deployable bundle: a folder of artifacts plus ``manifest.json`` describing them.

    build/cvt13/
      manifest.json          what is here: model config, batch range, one entry per artifact
      model.safetensors      the fp32 PyTorch weights (reference for parity checks)
      model.onnx             fp32 ONNX graph (metadata_props describe it too)
      model.fp16.onnx        typed graphs added by --precision
      model.int8.onnx
      model.fp16.engine      TensorRT plans, each with a .json sidecar (trt.sidecar)

Writes are atomic: artifacts are written to a temporary name and renamed, the manifest is
rewritten last, and a new bundle is assembled in a temporary folder that replaces ``out``
only when complete. Torch-free: edge runtimes open bundles.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import CvtConfig
from .errors import CvtDeployError
from .outlock import INNER_LOCK, check_unlocked, output_lock
from .sandbox import SANDBOX_RULE, check_external_data, inside_path, own_files
# Re-exported: these lived here before the ground floor (util) existed.
from .util import INPUT_FORMATS, OUTPUT_KINDS, PRECISIONS, BatchRange, atomic_output, atomic_write_text, file_sha256, current_umask, scratch_dir  # noqa: F401
from .interrupt import signals_held
from .jsonio import read_json
from .util import (PARTIAL_SUFFIX, make_temporary_dir, remove_path, require_writable, stale_partials, temp_files_in,
                   write_errors, write_failure)

MANIFEST = "manifest.json"
FORMAT = "cvt-deploy-bundle"
FORMAT_VERSION = 1
ARTIFACT_KINDS = ("onnx", "tensorrt", "tensorrt-rtx", "torch", "deepstream", "openvino")  # deepstream: an nvinfer config; openvino: an IR
# What a graph is built for (its "target" in the manifest; absent = portable): "portable"
# graphs use standard ONNX ops and are what TensorRT and every execution provider compile;
# "onnxruntime-cpu" graphs (export/ort_cpu.py) use ONNX Runtime contrib ops and dynamic
# quantization and only ever run on its CPU provider; "tensorrt-10" graphs (the int8+fp16 graph,
# export/fp16.py) use opset-19 fp16 Q/DQ scales and are what strongly typed TensorRT >= 10 builds.
TARGETS = ("portable", "onnxruntime-cpu", "tensorrt-10")
# Files an artifact's manifest entry names besides its own ``file`` (each checked by the sandbox rule).
SIDE_FILES = ("sidecar", "labels", "weights_file")
# The backend whose parity report an artifact's "parity" entry holds (what the export and the
# engine build check on); reports measured by other backends sit under "parity_on" by name.
GATE_BACKENDS = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx", "torch": "torch", "deepstream": "tensorrt",
                 "openvino": "openvino"}


@dataclass
class Artifact:
    """One file of the bundle and what it is."""

    name: str            # key in the manifest, e.g. "onnx-fp16", "tensorrt-fp16"
    file: str            # path relative to the bundle
    kind: str            # "onnx" | "tensorrt" | "torch"
    precision: str       # "fp32" | "fp16" | "int8"
    sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # opset, calibration, parity, build flags...

    @property
    def target(self) -> str:
        return str(self.info.get("target", "portable"))

    def parity_on(self, backend: str) -> dict[str, Any] | None:
        """The parity report recorded for this artifact as ``backend`` runs it; None when it was
        not checked there (a graph's figures on one runtime say nothing of another's kernels)."""
        found = self.info.get("parity") if backend == GATE_BACKENDS.get(self.kind) \
            else (self.info.get("parity_on") or {}).get(backend)
        return found if isinstance(found, dict) else None

    def record_parity(self, backend: str, report: dict[str, Any]) -> None:
        if backend == GATE_BACKENDS.get(self.kind):
            self.info["parity"] = report
        else:
            self.info.setdefault("parity_on", {})[backend] = report

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "precision": self.precision, "sha256": self.sha256, **self.info}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Artifact:
        d = dict(d)
        return cls(name, d.pop("file"), d.pop("kind"), d.pop("precision"), d.pop("sha256", ""), d)


# The artifact facts that readers act on, and what each must be.
_PARITY_NUMBERS = ("accuracy_reference", "accuracy_candidate", "top1_agreement", "accuracy", "agreement")


def _check_info(art: Artifact) -> None:
    """Raise ValueError naming the entry when a recorded fact that code reads is malformed."""
    if art.info.get("target", "portable") not in TARGETS:
        raise ValueError(f"artifact {art.name!r} has target {art.info['target']!r}; known targets are {', '.join(TARGETS)}")
    for key in ("source", "input"):  # an artifact name, a graph input name
        value = art.info.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"artifact {art.name!r} has {key} {value!r}, not a name")
    for key, known in (("input_format", INPUT_FORMATS), ("output_kind", OUTPUT_KINDS)):
        value = art.info.get(key)
        if value is not None and value not in known:
            raise ValueError(f"artifact {art.name!r} has {key} {value!r}, not one of {', '.join(known)}")
    others = art.info.get("parity_on", {})
    if not isinstance(others, dict):
        raise ValueError(f"artifact {art.name!r} has parity_on {others!r}, not an object")
    for what, parity in [("parity", art.info.get("parity"))] + [(f"parity_on {k}", v) for k, v in others.items()]:
        if parity is None:
            continue
        if not isinstance(parity, dict):
            raise ValueError(f"artifact {art.name!r} has {what} {parity!r}, not an object")
        for key in _PARITY_NUMBERS:
            value = parity.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise ValueError(f"artifact {art.name!r} has {what} {key} {value!r}, not a fraction between 0 and 1")


def artifact_name(kind: str, precision: str, target: str = "portable") -> str:
    return f"{kind}-{precision}" + ("" if target == "portable" else f"-{target}")


class Bundle:
    """An exported model folder. Open with :meth:`open`; artifacts by kind and precision."""

    def __init__(self, root: Path, config: CvtConfig, batch: BatchRange,
                 artifacts: dict[str, Artifact], extra: dict[str, Any]) -> None:
        self.root = root
        self.config = config
        self.batch = batch
        self.artifacts = artifacts
        self.extra = extra  # source checkpoint, tool versions, eval data ...
        self._verified: set[str] = set()
        self._manifest_identity: tuple[int, int] | None = None  # of the manifest open() read
        self.notes: list[str] = []  # what create() found and did (leftovers removed ...)
        self.kept: list[str] = []   # files in --out that are not the bundle's, kept by create()

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Bundle:
        root = Path(root)
        manifest = root / MANIFEST
        if not root.is_dir():
            raise CvtDeployError(f"bundle {str(root)!r} is not a folder",
                                 "pass the --out folder of cvt-export (it holds manifest.json)")
        if (root / JOURNAL).exists():
            raise CvtDeployError(f"{root} is incomplete: an export into it was interrupted while it replaced the "
                                 f"bundle there, or is running now ({JOURNAL} is left)",
                                 f"wait for a running export to finish, or export again to --out {root}")
        if not manifest.is_file():
            raise CvtDeployError(f"{root} has no {MANIFEST}, so it is not a cvt-deploy bundle",
                                 "export one with: cvt-export --format onnx --out DIR")
        try:
            identity = _identity(manifest)  # before reading: a replacement after it shows as a change
            raw = read_json(manifest)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"it is not a {FORMAT} manifest")
            if int(raw.get("format_version", 0)) > FORMAT_VERSION:
                raise CvtDeployError(f"{manifest} has format version {raw['format_version']}, newer than this cvt-deploy reads",
                                     "upgrade cvt-deploy")
            if not isinstance(raw.get("artifacts"), dict):
                raise ValueError("'artifacts' is not a mapping")
            artifacts = {k: Artifact.from_dict(k, v) for k, v in raw["artifacts"].items()}
            for art in artifacts.values():
                for key, name in (("file", art.file), *((k, art.info.get(k)) for k in SIDE_FILES)):
                    if name is None and key != "file" and not (key == "weights_file" and art.kind == "openvino"):
                        continue  # an IR without its .bin is refused here, not read as a file named "None"
                    if not isinstance(name, str) or not name:
                        raise ValueError(f"artifact {art.name!r} has {key} {name!r}, not a file name")
                    inside_path(root, name, f"{manifest}: artifact {art.name!r} has {key}")
                if art.kind not in ARTIFACT_KINDS or art.precision not in PRECISIONS:
                    raise ValueError(f"artifact {art.name!r} has kind {art.kind!r} and precision {art.precision!r}; "
                                     f"known kinds are {', '.join(ARTIFACT_KINDS)}, precisions {', '.join(PRECISIONS)}")
                if not isinstance(art.sha256, str):
                    raise ValueError(f"artifact {art.name!r} has sha256 {art.sha256!r}, not a hex string")
                _check_info(art)
            bundle = cls(root, CvtConfig.from_dict(raw["model"], "its 'model' entry"), BatchRange.from_dict(raw["batch"]), artifacts,
                         {k: v for k, v in raw.items() if k not in ("format", "format_version", "model", "batch", "artifacts")})
        except CvtDeployError as e:
            if "format version" in e.message or SANDBOX_RULE in e.message:
                raise
            # A config or batch range that does not validate: the file is what is wrong.
            raise CvtDeployError(f"{manifest} is damaged: {e.message}", "re-export the bundle with cvt-export") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CvtDeployError(f"{manifest} is damaged ({type(e).__name__}: {e})",
                                 "re-export the bundle with cvt-export") from None
        for art in bundle.artifacts.values():
            for file in (art.file, art.info.get("weights_file")):
                if file is not None and not (root / file).is_file():
                    raise CvtDeployError(f"bundle {root} lists {file} ({art.name}) but the file is missing",
                                         f"copy the whole bundle folder, or re-export it (cvt-export --out {root})")
        bundle._manifest_identity = identity
        return bundle

    def path(self, art: Artifact) -> Path:
        return self.root / art.file

    def sidecar_path(self, art: Artifact) -> Path:
        """The file that describes an engine artifact (its ``sidecar``, default ``<file>.json``)."""
        return inside_path(self.root, art.info.get("sidecar") or f"{art.file}.json", f"artifact {art.name!r} has sidecar")

    def verified_path(self, art: Artifact) -> Path:
        """The artifact's path after checking its sha256 against the manifest (once per bundle object).

        A flipped byte in a weights file still loads and runs, with wrong results; the hash
        is what catches a damaged copy.
        """
        path = inside_path(self.root, art.file, f"artifact {art.name!r} has file")
        if art.name not in self._verified and art.kind == "onnx":
            check_external_data(self.root, path)
        if art.sha256 and art.name not in self._verified:
            self._check_hash(art, path, file_sha256(path))
        return path

    def verified_bytes(self, art: Artifact) -> bytes | None:
        """An ONNX graph's bytes, checked against the manifest that :meth:`open` read; None for a
        graph whose weights lie beside it (load it by :meth:`verified_path`).

        What a runtime builds from these bytes is the graph this manifest describes even when an
        export replaces the bundle meanwhile: a reader gets the old bundle or the new one whole,
        or a clear error, never the new graph under the old config and labels.
        """
        path = inside_path(self.root, art.file, f"artifact {art.name!r} has file")
        data = path.read_bytes()
        external = check_external_data(self.root, path, data)
        if art.sha256:
            self._check_hash(art, path, hashlib.sha256(data).hexdigest())
        return None if external else data

    def verified_ir(self, art: Artifact) -> tuple[bytes, bytes]:
        """An OpenVINO IR's .xml and .bin bytes, each checked against the manifest (as :meth:`verified_bytes`)."""
        xml = inside_path(self.root, art.file, f"artifact {art.name!r} has file").read_bytes()
        if art.sha256:  # as verified_bytes: no hash recorded, none checked
            self._check_hash(art, self.root / art.file, hashlib.sha256(xml).hexdigest())
        name = str(art.info.get("weights_file"))
        weights = inside_path(self.root, name, f"artifact {art.name!r} has weights_file").read_bytes()
        shadow = Artifact(f"{art.name} weights", name, art.kind, art.precision, str(art.info.get("weights_sha256") or ""))
        if shadow.sha256:
            self._check_hash(shadow, self.root / name, hashlib.sha256(weights).hexdigest())
        return xml, weights

    def _check_hash(self, art: Artifact, path: Path, actual: str) -> None:
        if actual == art.sha256:
            self._verified.add(art.name)
            return
        try:
            replaced = (self.root / JOURNAL).exists() or _identity(self.root / MANIFEST) != self._manifest_identity
        except OSError:
            replaced = True
        if replaced and self._manifest_identity is not None:
            raise CvtDeployError(f"bundle {self.root} was replaced while it was being read ({art.file} is already "
                                 "another export's)", "run the command again: an export into that folder is running "
                                 "or has just finished")
        raise CvtDeployError(f"{path} does not match the bundle's manifest (sha256 {actual[:12]}..., "
                             f"manifest says {art.sha256[:12]}...): the file is damaged or was replaced",
                             "copy the bundle again from where it was exported, or re-export it")

    def find(self, kind: str, precision: str | None = None, target: str = "portable") -> Artifact | None:
        """The artifact of this kind at ``precision`` (default: the most precise one present),
        built for ``target`` (default the portable graph every runtime can compile)."""
        for p in ([precision] if precision else PRECISIONS):
            art = self.artifacts.get(artifact_name(kind, p, target))
            if art is not None and art.target == target:
                return art
        return None

    def require(self, kind: str, precision: str | None = None) -> Artifact:
        from .trt.util import TOOLKITS

        art = self.find(kind, precision)
        if art is None:
            have = ", ".join(sorted(self.artifacts)) or "nothing"
            what = f"{kind} {precision}" if precision else kind
            raise CvtDeployError(f"bundle {self.root} has no {what} artifact (it has: {have})",
                                 f"build it with: cvt-export --format {TOOLKITS[kind].format} --bundle {self.root}"
                                 + (f" --precision {precision}" if precision else "") if kind in TOOLKITS
                                 else "re-export the bundle with that precision: cvt-export --precision P --out "
                                      f"{self.root} (with the same --weights)")
        return art

    # -- writing -----------------------------------------------------------------------
    def add(self, art: Artifact, compute_hash: bool = True) -> Artifact:
        """Record an artifact whose file is already in place and rewrite the manifest."""
        if compute_hash:
            art.sha256 = file_sha256(self.path(art))
        self.artifacts[art.name] = art
        self.save()
        return art

    def save(self) -> None:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.config.to_dict(),
                "batch": self.batch.to_dict(), **self.extra,
                "artifacts": {k: a.to_dict() for k, a in sorted(self.artifacts.items())}}
        atomic_write_text(self.root / MANIFEST, json.dumps(data, indent=2, sort_keys=False) + "\n")

    @classmethod
    @contextlib.contextmanager
    def create(cls, out: str | os.PathLike[str], config: CvtConfig, batch: BatchRange,
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
                bundle = cls(tmp, config, batch, {}, dict(extra))
                bundle.notes = notes
                # Libraries' own temporary files (ONNX Runtime's quantizer, onnxsim...) go beside
                # the bundle too, so what a SIGKILL leaves is found and removed by the next export.
                with write_errors(out), scratch_dir(parent, "cvt-export" if existing else out.name) as scratch, \
                        temp_files_in(scratch):
                    yield bundle
                    bundle.save()
                with write_errors(out, any_cause=True):
                    if existing:
                        bundle.kept = _install(tmp, out, owned or set())
                    else:
                        tmp.rename(out)
                bundle.root = out
            finally:
                for path in made:
                    shutil.rmtree(path, ignore_errors=True)


# While files move into an existing --out, this file lists every file of the old and the new
# bundle: a run killed half-way leaves it, so the next export knows those files are its own
# (and Bundle.open says the folder is incomplete instead of reading a mix).
JOURNAL = ".cvt-deploy-replacing.json"


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


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
