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

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import ARTIFACT_KINDS, KIND, PRECISIONS, RUNS, TARGETS, artifact_name, gate_backend, select
from .config import CvtConfig
from .errors import CvtDeployError
from .jsonio import read_json
from .sandbox import SANDBOX_RULE, check_external_data, inside_path
# Re-exported: these lived here before the ground floor (util) and the registry (artifacts) existed.
from .util import INPUT_FORMATS, OUTPUT_KINDS, BatchRange, atomic_output, atomic_write_text, file_sha256, scratch_dir  # noqa: F401

__all__ = ["ARTIFACT_KINDS", "Artifact", "BatchRange", "Bundle", "JOURNAL", "MANIFEST", "PRECISIONS", "TARGETS",
           "artifact_name"]
MANIFEST = "manifest.json"
FORMAT = "cvt-deploy-bundle"
FORMAT_VERSION = 1
# Files an artifact's manifest entry names besides its own ``file`` (each checked by the sandbox rule).
SIDE_FILES = ("sidecar", "labels", "weights_file")
# While files move into an existing bundle, this file lists every file of the old and the new
# bundle (bundle_write.py): a run killed half-way leaves it, so the next export knows those files
# are its own and Bundle.open says the folder is incomplete instead of reading a mix.
JOURNAL = ".cvt-deploy-replacing.json"


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
        found = self.info.get("parity") if backend == gate_backend(self.kind) \
            else (self.info.get("parity_on") or {}).get(backend)
        return found if isinstance(found, dict) else None

    def record_parity(self, backend: str, report: dict[str, Any]) -> None:
        if backend == gate_backend(self.kind):
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
        # Set by bundle_write while a change is open: files it writes are staged until it commits.
        self._writing = False
        self._stage: Path | None = None
        self._staged: dict[str, Path] = {}

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
                    if name is None and key != "file" and not (key == "weights_file" and getattr(KIND.get(art.kind), "weights_file", False)):
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
        return self._staged.get(art.file) or self.root / art.file

    def sidecar_path(self, art: Artifact) -> Path:
        """The file that describes an engine artifact (its ``sidecar``, default ``<file>.json``)."""
        return self._where(art.info.get("sidecar") or f"{art.file}.json", f"artifact {art.name!r} has sidecar")

    def verified_path(self, art: Artifact) -> Path:
        """The artifact's path after checking its sha256 against the manifest (once per bundle object).

        A flipped byte in a weights file still loads and runs, with wrong results; the hash
        is what catches a damaged copy.
        """
        path = self._where(art.file, f"artifact {art.name!r} has file")
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
        path = self._where(art.file, f"artifact {art.name!r} has file")
        data = path.read_bytes()
        external = check_external_data(self.root, path, data)
        if art.sha256:
            self._check_hash(art, path, hashlib.sha256(data).hexdigest())
        return None if external else data

    def verified_ir(self, art: Artifact) -> tuple[bytes, bytes]:
        """An OpenVINO IR's .xml and .bin bytes, each checked against the manifest (as :meth:`verified_bytes`)."""
        xml = self._where(art.file, f"artifact {art.name!r} has file").read_bytes()
        if art.sha256:  # as verified_bytes: no hash recorded, none checked
            self._check_hash(art, self.path(art), hashlib.sha256(xml).hexdigest())
        name = str(art.info.get("weights_file"))
        weights = self._where(name, f"artifact {art.name!r} has weights_file").read_bytes()
        shadow = Artifact(f"{art.name} weights", name, art.kind, art.precision, str(art.info.get("weights_sha256") or ""))
        if shadow.sha256:
            self._check_hash(shadow, self._where(name, "weights"), hashlib.sha256(weights).hexdigest())
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
        art = self.find(kind, precision)
        made_by = KIND[kind].format if kind in KIND else None
        if art is None:
            have = ", ".join(sorted(self.artifacts)) or "nothing"
            what = f"{kind} {precision}" if precision else kind
            raise CvtDeployError(f"bundle {self.root} has no {what} artifact (it has: {have})",
                                 f"build it with: cvt-export --format {made_by} --bundle {self.root}"
                                 + (f" --precision {precision}" if precision else "") if made_by
                                 else "re-export the bundle with that precision: cvt-export --precision P --out "
                                      f"{self.root} (with the same --weights)")
        return art

    def select(self, backend: str, precision: str | None = None, device: str | None = "cpu") -> Artifact:
        """What ``backend`` runs of this bundle (:func:`cvt_deploy.artifacts.select`), or the error
        that names what is missing and how to make it."""
        art = select(self, backend, precision, device)
        if art is not None:
            return art
        kind = RUNS[backend][-1]  # the form every one of its artifacts is made from
        return self.require(kind, PRECISIONS[0] if KIND[kind].any_precision else precision)

    # -- changing (bundle_write.py owns it: every change happens inside create() or changing()) ---
    def new_file(self, name: str) -> Path:
        """Where a change writes the file ``name`` of the bundle: staged until the change commits."""
        if not self._writing:
            raise RuntimeError(f"{name} is written into {self.root} outside bundle_write.create or changing")
        if self._stage is None:
            return self.root / name
        self._staged[name] = self._stage / name
        return self._staged[name]

    def add(self, art: Artifact, compute_hash: bool = True) -> Artifact:
        """Record an artifact whose file is in place (or staged); the manifest is written when the change commits."""
        if not self._writing:
            raise RuntimeError(f"artifact {art.name} is added to {self.root} outside bundle_write.create or changing")
        if compute_hash:
            art.sha256 = file_sha256(self.path(art))
        self.artifacts[art.name] = art
        return art

    def _where(self, name: str, what: str) -> Path:
        staged = self._staged.get(name)
        return staged if staged is not None else inside_path(self.root, name, what)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns
