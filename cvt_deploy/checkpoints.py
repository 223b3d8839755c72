"""Load and save CvT weights: official microsoft/CvT, Hugging Face, and our own format.

Nothing here executes pickled code: ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``; everything else is safetensors. Our own format is one
``.safetensors`` file whose header metadata carries the :class:`CvtConfig` as JSON.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .bundle import atomic_output
from .config import CvtConfig, PreprocessConfig, get_config, match_variant
from .errors import CvtDeployError, require

if TYPE_CHECKING:
    from .model import CvT

CONFIG_METADATA_KEY = "cvt_deploy.config"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hugging Face name -> official name, applied in order to each key.
_HF_TO_OFFICIAL = [
    (r"^cvt\.encoder\.stages\.(\d)\.", r"stage\1."),
    (r"\.embedding\.convolution_embeddings\.projection\.", ".patch_embed.proj."),
    (r"\.embedding\.convolution_embeddings\.normalization\.", ".patch_embed.norm."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.attention\.attention\.convolution_projection_(q|k|v)\w*\.convolution_projection\.convolution\.", r".attn.conv_proj_\1.conv."),
    (r"\.attention\.attention\.convolution_projection_(q|k|v)\w*\.convolution_projection\.normalization\.", r".attn.conv_proj_\1.bn."),
    (r"\.attention\.attention\.projection_(q|k|v)\w*\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def hf_to_official(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a Hugging Face ``CvtForImageClassification`` state dict to official keys."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _HF_TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


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


def infer_config(state: Mapping[str, Any], **overrides: Any) -> CvtConfig:
    """Read widths, depths and class count from official-key tensors; heads from the registry."""
    try:
        dims = tuple(int(state[f"stage{i}.patch_embed.proj.weight"].shape[0]) for i in range(3))
        num_classes = int(state["head.weight"].shape[0])
    except KeyError as e:
        raise CvtDeployError(
            f"this does not look like a CvT checkpoint: no tensor {e.args[0]!r}",
            "pass an official microsoft/CvT .pth, a Hugging Face CvT folder or hub id, or a cvt-deploy .safetensors",
        ) from None
    depths = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"stage{i}.blocks.")}) for i in range(3)
    )
    variant = overrides.pop("variant", None) or match_variant(dims, depths)
    if variant is None:
        raise CvtDeployError(
            f"the checkpoint's widths {dims} and depths {depths} match no registered variant",
            "register a variant for it (cvt_deploy.config.register_variant) so its head counts are known",
        )
    cfg = get_config(variant, num_classes=num_classes, **overrides)
    if cfg.embed_dims != dims or cfg.depths != depths:
        guess = match_variant(dims, depths)
        raise CvtDeployError(
            f"the checkpoint is not a {cfg.variant}: it has widths {dims} and depths {depths}, "
            f"{cfg.variant} has {cfg.embed_dims} and {cfg.depths}",
            f"use --model {guess}" if guess else "pick the variant the checkpoint was trained as",
        )
    return cfg


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


def match_variant_for(state: Mapping[str, Any]) -> str | None:
    try:
        return infer_config(state).variant
    except CvtDeployError:
        return None


def _read_torch_file(path: Path) -> dict[str, Any]:
    import pickle

    import torch  # noqa: F401

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


def _hf_config(folder: Path, **overrides: Any) -> CvtConfig:
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "cvt":
        raise CvtDeployError(f"{folder}/config.json describes a {raw.get('model_type')!r} model, not a CvT",
                             "point --weights at a Hugging Face CvT checkpoint (model_type 'cvt')")
    dims, depths = tuple(raw["embed_dim"]), tuple(raw["depth"])
    variant = overrides.pop("variant", None) or match_variant(dims, depths)
    if variant is None:
        raise CvtDeployError(f"{folder}: widths {dims} / depths {depths} match no registered variant",
                             "register a variant for it with cvt_deploy.config.register_variant")
    id2label = raw.get("id2label") or {}
    num_classes = int(raw.get("num_labels") or len(id2label) or 1000)
    labels = tuple(id2label[str(i)] for i in range(num_classes)) if len(id2label) == num_classes else None
    cfg = get_config(variant, num_classes=num_classes, labels=labels, **overrides)
    if tuple(raw.get("num_heads", cfg.num_heads)) != cfg.num_heads:
        cfg = cfg.replace(num_heads=tuple(raw["num_heads"]))
    return cfg


def _resolve_hub(source: str) -> Path:
    require("huggingface_hub", "hub", f"Fetching {source!r} from the Hugging Face Hub")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise CvtDeployError(
            f"could not fetch {source!r} from the Hugging Face Hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "check the id and the network, or download the folder elsewhere and pass its path",
        ) from None


def load_checkpoint(source: str | os.PathLike[str], variant: str | None = None, *,
                    activation: str | None = None, img_size: int | None = None,
                    labels: list[str] | None = None) -> CvT:
    """Build a CvT and load weights from any supported checkpoint, architecture read from it.

    ``source``: a cvt-deploy ``.safetensors``; an official ``.pth``/``.pt``; a Hugging Face
    folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) or hub id.
    ``variant`` checks (and, for official weights, decides) the architecture. ``activation``
    defaults to what the weights were trained with: quick_gelu for official checkpoints,
    gelu for Hugging Face ones (that port computes exact GELU), the stored value for ours.
    """
    require("torch", "torch", "Loading a checkpoint")
    from .model import CvT

    path = Path(source)
    if not path.exists():
        if HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
            path = _resolve_hub(str(source))
        else:
            raise CvtDeployError(f"checkpoint {str(source)!r} does not exist",
                                 "pass a path to a .safetensors/.pth file, a Hugging Face folder, or a hub id like microsoft/cvt-13")
    overrides: dict[str, Any] = {}
    if variant:
        overrides["variant"] = variant
    if img_size:
        overrides["img_size"] = img_size

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CvtDeployError(f"{path} is a folder without config.json", "pass a Hugging Face CvT folder or a checkpoint file")
        cfg = _hf_config(path, activation=activation or "gelu", **overrides)
        if (path / "model.safetensors").is_file():
            state, _ = _read_safetensors(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            state = _read_torch_file(path / "pytorch_model.bin")
        else:
            raise CvtDeployError(f"{path} has config.json but no model.safetensors or pytorch_model.bin",
                                 "copy the weights file into the folder")
        state = hf_to_official(state)
        source_kind = "Hugging Face checkpoint"
    elif path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if CONFIG_METADATA_KEY in meta:
            cfg = CvtConfig.from_json(meta[CONFIG_METADATA_KEY])
            changes: dict[str, Any] = {k: v for k, v in (("activation", activation), ("img_size", img_size)) if v}
            if img_size:
                changes["preprocess"] = PreprocessConfig.for_size(img_size)
            cfg = cfg.replace(**changes)
            want = get_config(variant) if variant else None
            if want is not None and (want.embed_dims, want.depths) != (cfg.embed_dims, cfg.depths):
                raise CvtDeployError(f"{path} holds a {cfg.variant}, not a {variant}", f"use --model {cfg.variant} or omit --model")
        else:
            state, default_act = _official_keys(state)
            cfg = infer_config(state, activation=activation or default_act, **overrides)
        source_kind = "safetensors checkpoint"
    else:
        state, default_act = _official_keys(_read_torch_file(path))
        m = re.search(r"(\d{3})x\1", path.name)  # official names say e.g. CvT-13-384x384-IN-22k.pth
        if m and "img_size" not in overrides:
            overrides["img_size"] = int(m.group(1))
        cfg = infer_config(state, activation=activation or default_act, **overrides)
        source_kind = "official checkpoint" if default_act == "quick_gelu" else "Hugging Face-keyed checkpoint"
    if labels is not None:
        cfg = cfg.replace(labels=tuple(labels))
    model = CvT(cfg).eval()
    load_state_into(model, state, f"{source_kind} {path}")
    return model


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
        save_file(state, str(tmp), metadata={CONFIG_METADATA_KEY: model.cfg.to_json()})
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex digest of a file (or of a folder's files in name order), for provenance records."""
    import hashlib

    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


