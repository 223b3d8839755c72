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
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import CvtConfig
from .errors import CvtDeployError
# Re-exported: these lived here before the ground floor (util) existed.
from .util import INPUT_FORMATS, OUTPUT_KINDS, PRECISIONS, BatchRange, atomic_output, atomic_write_text, file_sha256, current_umask, scratch_dir  # noqa: F401

MANIFEST = "manifest.json"
FORMAT = "cvt-deploy-bundle"
FORMAT_VERSION = 1
ARTIFACT_KINDS = ("onnx", "tensorrt", "torch")


@dataclass
class Artifact:
    """One file of the bundle and what it is."""

    name: str            # key in the manifest, e.g. "onnx-fp16", "tensorrt-fp16"
    file: str            # path relative to the bundle
    kind: str            # "onnx" | "tensorrt" | "torch"
    precision: str       # "fp32" | "fp16" | "int8"
    sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # opset, calibration, parity, build flags...

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "precision": self.precision, "sha256": self.sha256, **self.info}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Artifact:
        d = dict(d)
        return cls(name, d.pop("file"), d.pop("kind"), d.pop("precision"), d.pop("sha256", ""), d)


# The artifact facts that readers act on, and what each must be.
_PARITY_NUMBERS = ("accuracy_reference", "accuracy_candidate", "top1_agreement", "accuracy", "agreement")


def _inside(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside the bundle folder."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _check_info(art: Artifact) -> None:
    """Raise ValueError naming the entry when a recorded fact that code reads is malformed."""
    sidecar = art.info.get("sidecar")
    if sidecar is not None and not _inside(sidecar):
        raise ValueError(f"artifact {art.name!r} has sidecar {sidecar!r}, not a file name inside the bundle")
    for key in ("source", "input"):  # an artifact name, a graph input name
        value = art.info.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"artifact {art.name!r} has {key} {value!r}, not a name")
    for key, known in (("input_format", INPUT_FORMATS), ("output_kind", OUTPUT_KINDS)):
        value = art.info.get(key)
        if value is not None and value not in known:
            raise ValueError(f"artifact {art.name!r} has {key} {value!r}, not one of {', '.join(known)}")
    parity = art.info.get("parity")
    if parity is None:
        return
    if not isinstance(parity, dict):
        raise ValueError(f"artifact {art.name!r} has parity {parity!r}, not an object")
    for key in _PARITY_NUMBERS:
        value = parity.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ValueError(f"artifact {art.name!r} has parity {key} {value!r}, not a fraction between 0 and 1")


def artifact_name(kind: str, precision: str) -> str:
    return f"{kind}-{precision}"


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

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Bundle:
        root = Path(root)
        manifest = root / MANIFEST
        if not root.is_dir():
            raise CvtDeployError(f"bundle {str(root)!r} is not a folder",
                                 "pass the --out folder of cvt-export (it holds manifest.json)")
        if not manifest.is_file():
            raise CvtDeployError(f"{root} has no {MANIFEST}, so it is not a cvt-deploy bundle",
                                 "export one with: cvt-export --format onnx --out DIR")
        try:
            raw = json.loads(manifest.read_text())
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"it is not a {FORMAT} manifest")
            if int(raw.get("format_version", 0)) > FORMAT_VERSION:
                raise CvtDeployError(f"{manifest} has format version {raw['format_version']}, newer than this cvt-deploy reads",
                                     "upgrade cvt-deploy")
            if not isinstance(raw.get("artifacts"), dict):
                raise ValueError("'artifacts' is not a mapping")
            artifacts = {k: Artifact.from_dict(k, v) for k, v in raw["artifacts"].items()}
            for art in artifacts.values():
                if not _inside(art.file):
                    raise ValueError(f"artifact {art.name!r} has file {art.file!r}, not a file name inside the bundle")
                if art.kind not in ARTIFACT_KINDS or art.precision not in PRECISIONS:
                    raise ValueError(f"artifact {art.name!r} has kind {art.kind!r} and precision {art.precision!r}; "
                                     f"known kinds are {', '.join(ARTIFACT_KINDS)}, precisions {', '.join(PRECISIONS)}")
                if not isinstance(art.sha256, str):
                    raise ValueError(f"artifact {art.name!r} has sha256 {art.sha256!r}, not a hex string")
                _check_info(art)
            bundle = cls(root, CvtConfig.from_dict(raw["model"], "its 'model' entry"), BatchRange.from_dict(raw["batch"]), artifacts,
                         {k: v for k, v in raw.items() if k not in ("format", "format_version", "model", "batch", "artifacts")})
        except CvtDeployError as e:
            if "format version" in e.message:
                raise
            # A config or batch range that does not validate: the file is what is wrong.
            raise CvtDeployError(f"{manifest} is damaged: {e.message}", "re-export the bundle with cvt-export") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CvtDeployError(f"{manifest} is damaged ({type(e).__name__}: {e})",
                                 "re-export the bundle with cvt-export") from None
        for art in bundle.artifacts.values():
            if not (root / art.file).is_file():
                raise CvtDeployError(f"bundle {root} lists {art.file} ({art.name}) but the file is missing",
                                     f"copy the whole bundle folder, or re-export it (cvt-export --out {root})")
        return bundle

    def path(self, art: Artifact) -> Path:
        return self.root / art.file

    def verified_path(self, art: Artifact) -> Path:
        """The artifact's path after checking its sha256 against the manifest (once per bundle object).

        A flipped byte in a weights file still loads and runs, with wrong results; the hash
        is what catches a damaged copy.
        """
        path = self.path(art)
        if art.sha256 and art.name not in self._verified:
            actual = file_sha256(path)
            if actual != art.sha256:
                raise CvtDeployError(f"{path} does not match the bundle's manifest (sha256 {actual[:12]}..., "
                                     f"manifest says {art.sha256[:12]}...): the file is damaged or was replaced",
                                     "copy the bundle again from where it was exported, or re-export it")
            self._verified.add(art.name)
        return path

    def find(self, kind: str, precision: str | None = None) -> Artifact | None:
        """The artifact of this kind at ``precision`` (default: the most precise one present)."""
        for p in ([precision] if precision else PRECISIONS):
            art = self.artifacts.get(artifact_name(kind, p))
            if art is not None:
                return art
        return None

    def require(self, kind: str, precision: str | None = None) -> Artifact:
        art = self.find(kind, precision)
        if art is None:
            have = ", ".join(sorted(self.artifacts)) or "nothing"
            what = f"{kind} {precision}" if precision else kind
            raise CvtDeployError(f"bundle {self.root} has no {what} artifact (it has: {have})",
                                 f"build it with: cvt-export --format trt --bundle {self.root}"
                                 + (f" --precision {precision}" if precision else "") if kind == "tensorrt"
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
               extra: dict[str, Any], overwrite: bool = True) -> Iterator[Bundle]:
        """Assemble a new bundle in a temporary sibling folder; it replaces ``out`` on success only."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CvtDeployError(f"output {out} exists and is not a folder", "choose another --out")
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise CvtDeployError(f"output folder {out} is not empty and is not a bundle; refusing to replace it",
                                 "choose an empty or new --out folder")
        if out.is_dir() and not overwrite:
            raise CvtDeployError(f"output folder {out} already exists", "pass another --out or allow overwriting")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        except OSError as e:
            raise CvtDeployError(f"cannot write to {out.parent}: {e.strerror}", "choose an --out folder you can write to") from None
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; bundles are meant to be shared
        bundle = cls(tmp, config, batch, {}, dict(extra))
        try:
            yield bundle
            bundle.save()
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
            tmp.rename(out)
            bundle.root = out
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
