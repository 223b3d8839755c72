"""Load and save CvT weights: official microsoft/CvT, Hugging Face, and our own format.

Nothing here executes pickled code: ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``; everything else is safetensors. Our own format is one
``.safetensors`` file whose header metadata carries the :class:`CvtConfig` as JSON.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..config import ARCH_FIELDS, CUSTOM_VARIANT, CvtConfig, get_config, list_variants, named
from ..errors import CvtDeployError, require
from ..jsonio import read_json_object
from ..util import CONFIG_KEY, atomic_output, file_sha256
from .arch import WeightsArch, apply_overrides, infer_config, match_variant_for, show, wrong_variant
from .hf import HUB_ID, hf_config, hf_to_official, read_hf_config, resolve_hub

if TYPE_CHECKING:
    from ..model import CvT

__all__ = ["CONFIG_METADATA_KEY", "LoadReport", "WeightsArch", "file_sha256", "hf_to_official", "infer_config",
           "load_checkpoint", "load_state_into", "save_checkpoint"]

CONFIG_METADATA_KEY = CONFIG_KEY  # the old name


@dataclass
class LoadReport:
    """What did not line up between a checkpoint and the model it is loaded into."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint, model

    def __bool__(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = []

        def show(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items[:12])
                if len(items) > 12:
                    lines.append(f"    ... and {len(items) - 12} more")

        show("missing from the checkpoint", self.missing)
        show("in the checkpoint but not in the model", self.unexpected)
        show("shape differs (checkpoint vs model)", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched])
        return "\n".join(lines) or "all keys match"


def load_state_into(model: CvT, state: Mapping[str, Any], source: str) -> None:
    """Strict load: any missing, unexpected or mis-shaped key is an error listing all of them."""
    # BatchNorm's step counter is training bookkeeping: neither required nor refused.
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    report = LoadReport(
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched=[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(own)
                    if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
    )
    if not report:
        guess = match_variant_for(state)
        raise CvtDeployError(
            f"{source} does not fit {model.cfg.variant}:\n{report}",
            f"this checkpoint looks like {guess}; pass --model {guess}" if guess and guess != model.cfg.variant
            else "check that the checkpoint is a CvT classifier of this variant and class count",
        )
    model.load_state_dict(state, strict=False)  # strictness was checked above, counters aside


# First bytes of files people pass as --weights by mistake, and what they are.
_NOT_CHECKPOINTS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                    (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                    (b"RIFF", "a RIFF file (WebP image?)"), (b"{", "a JSON/text file"), (b"\x1f\x8b", "a gzip archive"),
                    (b"\x93NUMPY", "a numpy .npy array"))


def _check_torch_file(path: Path) -> None:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle): say what else a file is."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass a readable checkpoint file") from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    what = next((name for magic, name in _NOT_CHECKPOINTS if head.startswith(magic)),
                "empty" if not head else f"a file starting with {head[:4]!r}")
    raise CvtDeployError(f"{path} is not a PyTorch checkpoint: it is {what}",
                         "pass the weights: an official .pth, a Hugging Face folder, or a .safetensors file")


def _read_torch_file(path: Path) -> dict[str, Any]:
    import pickle

    import torch  # noqa: F401

    _check_torch_file(path)

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CvtDeployError(
            f"refused to load {path}: it contains pickled objects other than tensors, and "
            f"unpickling them could run arbitrary code ({str(e).splitlines()[0][:160]})",
            "re-save the weights as plain tensors (a state dict) or as .safetensors from a trusted environment",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CvtDeployError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {str(e).splitlines()[0][:200]}",
            "download or copy the file again",
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):  # training-script wrappers
            if isinstance(obj.get(key), dict):
                obj = obj[key]
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CvtDeployError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors",
                             "save model.state_dict(), not the model object")
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CvtDeployError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}",
            "download or copy the file again",
        ) from None


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")


def load_checkpoint(source: str | os.PathLike[str], variant: str | None = None, *,
                    activation: str | None = None, img_size: int | None = None,
                    labels: Sequence[str] | None = None, heads: Sequence[int] | None = None,
                    config: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> CvT:
    """Build a CvT and load weights from any supported checkpoint, architecture read from it.

    ``source``: a cvt-deploy ``.safetensors``; an official ``.pth``/``.pt``; a Hugging Face
    folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) or hub id.
    The checkpoint decides the architecture and the class count; ``variant`` only checks
    it. Official weights do not record head counts: they come from ``heads``, ``config``
    or, when the widths are a registered variant's, the registry. ``config``: CvtConfig
    fields (a mapping or a JSON file) for what the weights cannot show (heads, strides,
    paddings, projection method); fields that contradict the tensors are refused.
    ``activation`` defaults to what the weights were trained with: quick_gelu for official
    checkpoints, gelu for Hugging Face ones (that port computes exact GELU), the stored
    value for ours.
    """
    require("torch", "torch", "Loading a checkpoint")
    from ..model import CvT

    path = _resolve(source)
    overrides, config_source = _overrides(config, heads, img_size, activation, labels)
    read = _read_hf_folder(path, img_size) if path.is_dir() else _read_file(path, variant, overrides, config_source)
    cfg = read.cfg
    # Files that record their architecture (config.json, our metadata) take the given fields over
    # it; an official checkpoint's config was inferred with them, checked against the tensors.
    if overrides and read.arch is not None:
        cfg = _override_recorded(cfg, overrides, read.arch, path, config_source)
    if variant and get_config(variant).arch() != cfg.arch():
        want = get_config(variant)
        raise wrong_variant(str(path), cfg.variant if cfg.variant in list_variants() else None, want, cfg.arch_diff(want))
    model = CvT(cfg).eval()
    load_state_into(model, read.state, f"{read.kind} {path}")
    return model


def _resolve(source: str | os.PathLike[str]) -> Path:
    """The local file or folder ``source`` names, or the hub id's download."""
    path = Path(source)
    if not path.exists():
        # A path whose folder exists here, or with a checkpoint's suffix, is a missing local
        # file, not a hub id to fetch (which would report a network error instead).
        local = path.suffix.lower() in _CHECKPOINT_SUFFIXES or path.parent.is_dir() and str(path.parent) != "."
        if HUB_ID.match(str(source)) and not str(source).startswith((".", "/")) and not local:
            path = resolve_hub(str(source))
        else:
            raise CvtDeployError(f"checkpoint {str(source)!r} does not exist",
                                 "pass a path to a .safetensors/.pth file, a Hugging Face folder, or a hub id like microsoft/cvt-13")
    return path


def _overrides(config: Mapping[str, Any] | str | os.PathLike[str] | None, heads: Sequence[int] | None,
               img_size: int | None, activation: str | None,
               labels: Sequence[str] | None) -> tuple[dict[str, Any], str]:
    """The CvtConfig fields the caller gives (``config`` and the single arguments over it), and
    how errors name where they came from."""
    is_file = isinstance(config, (str, os.PathLike))
    if isinstance(config, (str, os.PathLike)):
        overrides = read_json_object(config, 'write an object of CvtConfig fields, e.g. {"num_heads": [1, 3, 6]}')
    else:
        overrides = dict(config or {})
    if heads is not None:
        overrides["num_heads"] = list(heads)
    if img_size:
        overrides["img_size"] = img_size
    if activation:
        overrides["activation"] = activation
    if labels is not None:
        overrides["labels"] = list(labels)
    return overrides, str(config) if is_file else "the architecture given (heads/config)"


@dataclass
class _Read:
    """A checkpoint read: its tensors (official keys), the config they are loaded into, and what it was."""

    state: dict[str, Any]
    cfg: CvtConfig
    arch: WeightsArch | None  # where the file records its config; None: inferred from the tensors
    kind: str


def _read_hf_folder(path: Path, img_size: int | None) -> _Read:
    if not (path / "config.json").is_file():
        raise CvtDeployError(f"{path} is a folder without config.json", "pass a Hugging Face CvT folder or a checkpoint file")
    raw = read_hf_config(path)
    if (path / "model.safetensors").is_file():
        state, _ = _read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = _read_torch_file(path / "pytorch_model.bin")
    else:
        raise CvtDeployError(f"{path} has config.json but no model.safetensors or pytorch_model.bin",
                             "copy the weights file into the folder")
    state = hf_to_official(state)
    arch = WeightsArch.read(state)
    return _Read(state, hf_config(path, raw, arch, "gelu", img_size), arch, "Hugging Face checkpoint")


def _read_file(path: Path, variant: str | None, overrides: dict[str, Any], config_source: str) -> _Read:
    """Our .safetensors (its config recorded, checked against its tensors) or an official or
    Hugging Face-keyed .pth/.safetensors (the config inferred from the tensors and ``overrides``)."""
    state, meta = _read_safetensors(path) if path.suffix == ".safetensors" else (_read_torch_file(path), {})
    if CONFIG_KEY in meta:
        cfg = CvtConfig.from_json(meta[CONFIG_KEY], f"{path} (its cvt-deploy metadata)")
        arch = WeightsArch.read(state)
        problems = arch.disagreements(cfg)
        if problems:
            raise CvtDeployError(f"{path}: its metadata disagrees with its own tensors: " + "; ".join(problems),
                                 "the file is damaged: save the model again with save_checkpoint or re-export it")
        return _Read(state, cfg, arch, "safetensors checkpoint")
    state, default_act = _official_keys(state)
    overrides = dict(overrides)
    m = re.search(r"(\d{3})x\1", path.name)  # official names say e.g. CvT-13-384x384-IN-22k.pth
    if m and "img_size" not in overrides:
        overrides["img_size"] = int(m.group(1))
    cfg = infer_config(state, variant, None, overrides, config_source, activation=default_act)
    kind = "official checkpoint" if default_act == "quick_gelu" else "Hugging Face-keyed checkpoint"
    return _Read(state, cfg, None, kind)


def _override_recorded(cfg: CvtConfig, overrides: dict[str, Any], arch: WeightsArch, path: Path,
                       config_source: str) -> CvtConfig:
    """The recorded config with the caller's fields: those that change the architecture refused."""
    changed = [f"{k}: recorded {show(getattr(cfg, k))}, given {show(tuple(v) if isinstance(v, list) else v)}"
               for k, v in overrides.items() if k in ARCH_FIELDS and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k)]
    if changed:
        raise CvtDeployError(f"{path} records its own architecture, and {config_source} changes it: " + "; ".join(changed),
                             "drop those fields: the checkpoint's recorded values are what its weights were trained with")
    cfg = apply_overrides(cfg, overrides, arch, config_source)
    if cfg.variant in list_variants() or cfg.variant == CUSTOM_VARIANT:
        cfg = named(cfg)
    return cfg


def _official_keys(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Official-key state and the activation its weights were trained with (HF's port: gelu)."""
    if any(k.startswith("cvt.") for k in state):
        return hf_to_official(state), "gelu"
    return state, "quick_gelu"


def save_checkpoint(model: CvT, path: str | os.PathLike[str]) -> Path:
    """Write our format: one .safetensors with the config in its metadata, atomically."""
    require("safetensors", "torch", "Saving a checkpoint")
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CvtDeployError(f"checkpoint path {path} should end in .safetensors", "rename it to *.safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_KEY: model.cfg.to_json()})
    return path
