"""Load and save CvT weights: official microsoft/CvT, Hugging Face, and our own format.

Nothing here executes pickled code: ``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``; everything else is safetensors. Our own format is one
``.safetensors`` file whose header metadata carries the :class:`CvtConfig` as JSON.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .config import (ARCH_FIELDS, CUSTOM_VARIANT, CvtConfig, PreprocessConfig, get_config, list_variants, match_variant,
                     mlp_hidden, named, registered_heads)
from .errors import CvtDeployError, require
from .util import CONFIG_KEY, atomic_output, file_sha256  # noqa: F401 (file_sha256: re-exported)

if TYPE_CHECKING:
    from .model import CvT

CONFIG_METADATA_KEY = CONFIG_KEY  # the old name
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hugging Face name -> official name, applied in order to each key.
_HF_TO_OFFICIAL = [
    (r"^cvt\.encoder\.stages\.(\d+)\.", r"stage\1."),
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


# Our CvtConfig field -> Hugging Face CvtConfig field, for every field that changes what the
# network computes (dropout and drop-path rates are training-only; layer_norm_eps is unused
# by HF's modules). Missing fields take HF's defaults, as transformers itself does.
HF_FIELDS = {
    "embed_dims": "embed_dim", "num_heads": "num_heads", "depths": "depth", "mlp_ratios": "mlp_ratio",
    "patch_sizes": "patch_sizes", "patch_strides": "patch_stride", "patch_paddings": "patch_padding",
    "qkv_kernels": "kernel_qkv", "q_strides": "stride_q", "q_paddings": "padding_q",
    "kv_strides": "stride_kv", "kv_paddings": "padding_kv", "qkv_bias": "qkv_bias", "cls_token": "cls_token",
    "qkv_projections": "qkv_projection_method", "in_chans": "num_channels",
}
_HF_DEFAULT = get_config("cvt-13")  # transformers.CvtConfig() is CvT-13


def hf_config_kwargs(cfg: CvtConfig) -> dict[str, Any]:
    """``transformers.CvtConfig`` keyword arguments for our config's architecture and classes."""
    kw: dict[str, Any] = {hf: (list(v) if isinstance(v := getattr(cfg, ours), tuple) else v) for ours, hf in HF_FIELDS.items()}
    kw["id2label"] = {i: cfg.label(i) for i in range(cfg.num_classes)}  # sets num_labels
    return kw


def hf_unsupported(cfg: CvtConfig) -> str | None:
    """Why transformers' ``CvtForImageClassification`` cannot build this architecture, or None."""
    if any(m != "dw_bn" for m in cfg.qkv_projections):
        return f"its port builds only the dw_bn projection, this model uses {'/'.join(cfg.qkv_projections)}"
    if cfg.cls_token != (False,) * (cfg.num_stages - 1) + (True,):
        return "its port needs a class token in the last stage and in no other"
    if any(d <= i for i, d in enumerate(cfg.depths)):
        return f"its port needs stage i to have more than i blocks (depths {list(cfg.depths)})"
    return None


@dataclass(frozen=True)
class WeightsArch:
    """What a state dict's tensor shapes say about the architecture (official key names).

    Heads, strides and paddings leave no trace in the tensors; ``conv_kernels`` is None for
    stages without a projection convolution (the official "avg"/"linear" projections).
    """

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    in_chans: int
    patch_sizes: tuple[int, ...]
    mlp_hidden: tuple[int, ...]
    qkv_bias: tuple[bool, ...]
    cls_token: tuple[bool, ...]
    conv_kernels: tuple[int | None, ...]
    num_classes: int

    @classmethod
    def read(cls, state: Mapping[str, Any]) -> WeightsArch:
        def shape(key: str, ndim: int, required: bool = True) -> tuple[int, ...] | None:
            t = state.get(key)
            if t is None and not required:
                return None
            if t is None or len(t.shape) != ndim:
                raise CvtDeployError(
                    f"this does not look like a CvT checkpoint: "
                    + (f"no tensor {key!r}" if t is None else f"tensor {key!r} has shape {tuple(t.shape)}, not {ndim}-D"),
                    "pass an official microsoft/CvT .pth, a Hugging Face CvT folder or hub id, or a cvt-deploy .safetensors",
                )
            return tuple(int(d) for d in t.shape)

        head = shape("head.weight", 2)
        dims: list[int] = []
        depths: list[int] = []
        kernels: list[int] = []
        hidden: list[int] = []
        bias: list[bool] = []
        cls_tok: list[bool] = []
        conv: list[int | None] = []
        in_chans = 0
        while f"stage{len(dims)}.patch_embed.proj.weight" in state or not dims:
            i = len(dims)
            w = shape(f"stage{i}.patch_embed.proj.weight", 4)
            assert w is not None
            dims.append(w[0])
            kernels.append(w[-1])
            in_chans = in_chans or w[1]
            blocks = {int(k.split(".")[2]) for k in state
                      if k.startswith(f"stage{i}.blocks.") and re.fullmatch(r"[0-9]+", k.split(".")[2])}
            if not blocks or blocks != set(range(len(blocks))):
                raise CvtDeployError(f"the checkpoint's stage {i} has blocks {sorted(blocks)}, not 0..N-1",
                                     "the file is incomplete or not a CvT classifier")
            depths.append(len(blocks))
            block = f"stage{i}.blocks.0."
            fc1 = shape(block + "mlp.fc1.weight", 2)
            assert fc1 is not None
            hidden.append(fc1[0])
            bias.append(block + "attn.proj_q.bias" in state)
            cls_tok.append(f"stage{i}.cls_token" in state)
            q_conv = shape(block + "attn.conv_proj_q.conv.weight", 4, required=False)
            conv.append(q_conv[-1] if q_conv else None)
        assert head is not None
        return cls(tuple(dims), tuple(depths), in_chans, tuple(kernels), tuple(hidden), tuple(bias), tuple(cls_tok),
                   tuple(conv), head[0])

    def disagreements(self, cfg: CvtConfig, names: Mapping[str, str] | None = None) -> list[str]:
        """Where ``cfg`` says something else than the tensors ('field: config X, weights Y')."""
        names = names or {}
        methods = tuple("dw_bn" if k is not None else "avg or linear" for k in self.conv_kernels)
        pairs = [
            ("embed_dims", cfg.embed_dims, self.embed_dims), ("depths", cfg.depths, self.depths),
            ("in_chans", cfg.in_chans, self.in_chans), ("patch_sizes", cfg.patch_sizes, self.patch_sizes),
            ("qkv_bias", cfg.qkv_bias, self.qkv_bias), ("cls_token", cfg.cls_token, self.cls_token),
            ("qkv_projections", tuple("dw_bn" if m == "dw_bn" else "avg or linear" for m in cfg.qkv_projections), methods),
            ("qkv_kernels", tuple(k if m == "dw_bn" else None for k, m in zip(cfg.qkv_kernels, cfg.qkv_projections)),
             self.conv_kernels),
            ("num_classes", cfg.num_classes, self.num_classes),
        ]
        if cfg.embed_dims == self.embed_dims:
            # Compared by the widths they give: 4 and 4.0000001 build the same layer.
            mlp = tuple(mlp_hidden(d, r) for d, r in zip(cfg.embed_dims, cfg.mlp_ratios))
            if mlp != self.mlp_hidden:
                pairs.append(("mlp_ratios", cfg.mlp_ratios, tuple(h / d for h, d in zip(self.mlp_hidden, self.embed_dims))))
        return [f"{names.get(name, name)}: config {_show(said)}, weights {_show(seen)}"
                for name, said, seen in pairs if said != seen]

    def config(self, base: CvtConfig | None, num_heads: Any, given: Mapping[str, Any], source: str | None,
               **fields: Any) -> CvtConfig:
        """A config with everything the tensors show; the rest from ``given`` (fields the user
        gave; ``source`` names them in errors), else ``base`` (a variant), else the paper's."""
        n = len(self.embed_dims)
        d: dict[str, Any] = {k: getattr(base, k) for k in HIDDEN_FIELDS} if base is not None and base.num_stages == n else {}
        d.update({k: v for k, v in given.items() if k in HIDDEN_FIELDS})
        d.update(variant=CUSTOM_VARIANT, embed_dims=self.embed_dims, depths=self.depths, in_chans=self.in_chans,
                 patch_sizes=self.patch_sizes, mlp_ratios=tuple(_ratio(dim, h) for dim, h in zip(self.embed_dims, self.mlp_hidden)),
                 qkv_bias=self.qkv_bias, cls_token=self.cls_token, num_classes=self.num_classes, num_heads=num_heads,
                 **fields)
        methods = d.get("qkv_projections")
        methods = list(methods) if isinstance(methods, (list, tuple)) and len(methods) == n else ["dw_bn"] * n
        kernels = d.get("qkv_kernels")
        kernels = list(kernels) if isinstance(kernels, (list, tuple)) and len(kernels) == n else [3] * n
        for i, k in enumerate(self.conv_kernels):
            if k is not None:
                methods[i], kernels[i] = "dw_bn", k
            elif methods[i] == "dw_bn":
                raise CvtDeployError(
                    f"the checkpoint's stage {i} has no q/k/v projection convolutions, so it was built with the official "
                    "'avg' or 'linear' projection, and the weights cannot tell which",
                    "say which with a config file: {\"qkv_projections\": [...]} (one of dw_bn, avg, linear per stage) "
                    "via --config FILE.json (cvt-export) or config= (load_checkpoint)",
                )
        d.update(qkv_projections=methods, qkv_kernels=kernels)
        if num_heads is None:
            raise CvtDeployError(
                f"the checkpoint's widths {self.embed_dims} match no registered variant, and head counts are not "
                "stored in the weights",
                f"pass them, one per stage dividing its width: --heads {','.join(str(_some_heads(w)) for w in self.embed_dims)} "
                "(cvt-export), heads=(...) (load_checkpoint), or \"num_heads\" in a --config JSON file",
            )
        return CvtConfig.from_dict(d, source)


# Architecture fields no tensor shows: they come from the user, the variant or the paper.
HIDDEN_FIELDS = ("patch_strides", "patch_paddings", "q_strides", "q_paddings", "kv_strides", "kv_paddings",
                 "qkv_projections", "qkv_kernels")


def _ratio(dim: int, hidden: int) -> float:
    """The MLP ratio that gives ``hidden`` under the official rounding (``int(dim * ratio)``)."""
    ratio = hidden / dim
    while mlp_hidden(dim, ratio) < hidden:  # hidden / dim * dim can land just below hidden
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _some_heads(dim: int) -> int:
    """A head count that divides ``dim``, for the example in an error message (width 64 per head)."""
    return max(h for h in range(1, max(1, dim // 64) + 1) if dim % h == 0)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def infer_config(state: Mapping[str, Any], variant: str | None = None, heads: Sequence[int] | None = None,
                 overrides: Mapping[str, Any] | None = None, source: str = "--config", **fields: Any) -> CvtConfig:
    """The config of official-key tensors: widths, depths, MLP ratios, classes, qkv bias, class
    tokens and projection kernels from their shapes; heads from ``heads``, ``overrides``,
    ``variant`` or the registry.

    ``overrides`` holds CvtConfig fields (``source`` names them in errors), most usefully for
    what the tensors cannot show (num_heads, strides, paddings, projection method); one that
    contradicts the tensors is an error naming both.
    """
    arch = WeightsArch.read(state)
    overrides = dict(overrides or {})
    base = get_config(variant) if variant else None
    if base is not None and (base.embed_dims, base.depths) != (arch.embed_dims, arch.depths):
        # Checked before heads are taken from the variant: they may not even divide these widths.
        raise wrong_variant("the checkpoint", match_variant_for(state), base,
                            [f"embed_dims: {arch.embed_dims} vs {base.embed_dims}", f"depths: {arch.depths} vs {base.depths}"])
    said = heads if heads is not None else overrides.pop("num_heads", None)
    num_heads = said if said is not None else (base.num_heads if base else registered_heads(arch.embed_dims))
    cfg = named(arch.config(base, num_heads, overrides, source if (said is not None or overrides) else None, **fields))
    if cfg.variant != CUSTOM_VARIANT and "img_size" not in fields:
        cfg = cfg.replace(img_size=get_config(cfg.variant).img_size)  # e.g. W24 was released at 384 only
    if overrides:
        cfg = named(apply_overrides(cfg, overrides, arch, source))
    return cfg


def wrong_variant(what: str, guess: str | None, want: CvtConfig, differences: list[str]) -> CvtDeployError:
    """The error for a checkpoint that is not the ``--model`` given; ``differences``: 'field: ours vs its'."""
    return CvtDeployError(
        f"{what} is not a {want.variant}: " + "; ".join(differences) + f" (checkpoint vs {want.variant})",
        f"it looks like {guess}: use --model {guess} or omit --model" if guess
        else "omit --model: the architecture is read from the checkpoint",
    )


def apply_overrides(cfg: CvtConfig, overrides: Mapping[str, Any], arch: WeightsArch, source: str = "--config") -> CvtConfig:
    """``cfg`` with user-given fields replaced, checked against the tensors."""
    merged = cfg.to_dict()
    merged.update(overrides)
    merged["variant"] = cfg.variant
    size = overrides.get("img_size")
    if size != cfg.img_size and "preprocess" not in overrides and isinstance(size, int):
        merged["preprocess"] = PreprocessConfig.for_size(size, like=cfg.preprocess).to_dict()
    out = CvtConfig.from_dict(merged, source)
    problems = arch.disagreements(out)
    if problems:
        raise CvtDeployError(f"{source} disagrees with the checkpoint's tensors: " + "; ".join(problems),
                             f"remove or correct those fields in {source}")
    return out


def read_json_object(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is an error naming the file and ``fix``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise CvtDeployError(f"cannot read {path}: {e.strerror}", "pass an existing, readable JSON file") from None
    except ValueError as e:
        raise CvtDeployError(f"{path} is not valid JSON ({e})", fix) from None
    if not isinstance(raw, dict):
        raise CvtDeployError(f"{path} holds a JSON {type(raw).__name__}, not an object", fix)
    return raw


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
    """The registered variant these tensors are, if any (heads assumed from the registry)."""
    try:
        name = infer_config(state).variant
    except CvtDeployError:
        return None
    return None if name == CUSTOM_VARIANT else name


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


# PIL's resampling codes, as Hugging Face image processors store them ("resample": 3).
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_RESTORE = "restore the file from the checkpoint's origin"


def _hf_labels(raw: dict[str, Any], num_classes: int, path: Path) -> tuple[str, ...] | None:
    """Labels from ``id2label`` when it names exactly the classifier's classes, else None (indices)."""
    num_labels = raw.get("num_labels")
    if num_labels is not None and num_labels != num_classes:
        raise CvtDeployError(f"{path} says num_labels {num_labels!r}, but the classifier tensor has {num_classes} classes",
                             "fix num_labels in config.json (or drop it: the weights decide)")
    id2label = raw.get("id2label")
    if id2label is None:
        return None
    if not isinstance(id2label, dict):
        raise CvtDeployError(f"{path}: id2label is a JSON {type(id2label).__name__}, not an object",
                             'write it as {"0": "cat", "1": "dog", ...}')
    labels: dict[int, str] = {}
    for key, value in id2label.items():
        if not re.fullmatch(r"[0-9]+", key) or not isinstance(value, str):
            raise CvtDeployError(f"{path}: id2label entry {key!r}: {value!r} is not a class index and its name",
                                 'write id2label as {"0": "cat", "1": "dog", ...}')
        labels[int(key)] = value
    if sorted(labels) != list(range(num_classes)):
        warnings.warn(f"{path}: id2label names {len(labels)} classes but the classifier has {num_classes}; "
                      "labels are the class indices", stacklevel=3)
        return None
    return tuple(labels[i] for i in range(num_classes))


def _hf_preprocess(folder: Path, img_size: int) -> PreprocessConfig:
    """The image processor's settings (``preprocessor_config.json``) when the folder has them."""
    path = folder / "preprocessor_config.json"
    base = PreprocessConfig.for_size(img_size)
    if not path.is_file():
        return base
    raw = read_json_object(path, _RESTORE)
    changes: dict[str, Any] = {}
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if theirs in raw:
            changes[ours] = tuple(raw[theirs]) if isinstance(raw[theirs], list) else raw[theirs]
    if "crop_pct" in raw and base.resize == "shorter":
        changes["crop_pct"] = raw["crop_pct"]
    if "resample" in raw:
        if not isinstance(raw["resample"], int) or isinstance(raw["resample"], bool) or raw["resample"] not in _PIL_RESAMPLE:
            raise CvtDeployError(f"{path}: resample {raw['resample']!r} is not a resampling filter cvt-deploy knows",
                                 f"use one of {_PIL_RESAMPLE} (3, bicubic, is CvT's)")
        changes["interpolation"] = _PIL_RESAMPLE[raw["resample"]]
    try:
        return PreprocessConfig.from_dict({**base.to_dict(), **changes})
    except CvtDeployError as e:
        raise CvtDeployError(f"{path}: {e.message}", e.hint) from None


def _hf_image_size(folder: Path) -> int | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    size = read_json_object(path, _RESTORE).get("size")
    if isinstance(size, dict):  # {"shortest_edge": 224} or {"height": 384, "width": 384}
        size = size.get("shortest_edge", size.get("height"))
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise CvtDeployError(f"{path}: size {size!r} is not a positive number of pixels", 'use e.g. "size": 224')
    return size


def _read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    raw = read_json_object(path, _RESTORE)
    if raw.get("model_type") != "cvt":
        raise CvtDeployError(f"{path} describes a {raw.get('model_type')!r} model, not a CvT",
                             "point --weights at a Hugging Face CvT checkpoint (model_type 'cvt')")
    return raw


def _hf_config(folder: Path, raw: dict[str, Any], arch: WeightsArch, activation: str, img_size: int | None) -> CvtConfig:
    """The architecture from ``config.json`` (``raw``), every field checked, classes from the tensors."""
    path = folder / "config.json"
    fields = {ours: raw.get(hf, getattr(_HF_DEFAULT, ours)) for ours, hf in HF_FIELDS.items()}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    size = img_size or _hf_image_size(folder)
    labels = _hf_labels(raw, arch.num_classes, path)
    try:
        cfg = CvtConfig(variant=CUSTOM_VARIANT, num_classes=arch.num_classes, labels=labels, activation=activation, **fields)
    except CvtDeployError as e:
        message = e.message
        for ours, hf in HF_FIELDS.items():  # name the field as config.json spells it
            message = message.replace(f"field {ours!r}", f"field {hf!r}")
        raise CvtDeployError(f"{path}: {message}", e.hint) from None
    problems = arch.disagreements(cfg, HF_FIELDS)
    if problems:
        raise CvtDeployError(f"{path} disagrees with the weights beside it: " + "; ".join(problems),
                             "config.json and the weights are from different models: put the matching pair in the folder")
    registered = match_variant(cfg)
    size = size or (get_config(registered).img_size if registered else 224)
    return named(cfg.replace(img_size=size, preprocess=_hf_preprocess(folder, size)))


def _resolve_hub(source: str) -> Path:
    require("huggingface_hub", "hub", f"Fetching {source!r} from the Hugging Face Hub")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model.bin"]))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise CvtDeployError(
            f"could not fetch {source!r} from the Hugging Face Hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "check the id and the network, or download the folder elsewhere and pass its path",
        ) from None


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
    from .model import CvT

    path = Path(source)
    if not path.exists():
        if HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
            path = _resolve_hub(str(source))
        else:
            raise CvtDeployError(f"checkpoint {str(source)!r} does not exist",
                                 "pass a path to a .safetensors/.pth file, a Hugging Face folder, or a hub id like microsoft/cvt-13")
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
    config_source = str(config) if is_file else "the architecture given (heads/config)"

    recorded = True  # the file records its architecture (config.json, our metadata)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CvtDeployError(f"{path} is a folder without config.json", "pass a Hugging Face CvT folder or a checkpoint file")
        raw = _read_hf_config(path)
        if (path / "model.safetensors").is_file():
            state, _ = _read_safetensors(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            state = _read_torch_file(path / "pytorch_model.bin")
        else:
            raise CvtDeployError(f"{path} has config.json but no model.safetensors or pytorch_model.bin",
                                 "copy the weights file into the folder")
        state = hf_to_official(state)
        arch = WeightsArch.read(state)
        cfg = _hf_config(path, raw, arch, "gelu", img_size)
        source_kind = "Hugging Face checkpoint"
    else:
        state, meta = _read_safetensors(path) if path.suffix == ".safetensors" else (_read_torch_file(path), {})
        if CONFIG_KEY in meta:
            cfg = CvtConfig.from_json(meta[CONFIG_KEY], f"{path} (its cvt-deploy metadata)")
            arch = WeightsArch.read(state)
            problems = arch.disagreements(cfg)
            if problems:
                raise CvtDeployError(f"{path}: its metadata disagrees with its own tensors: " + "; ".join(problems),
                                     "the file is damaged: save the model again with save_checkpoint or re-export it")
            source_kind = "safetensors checkpoint"
        else:
            state, default_act = _official_keys(state)
            m = re.search(r"(\d{3})x\1", path.name)  # official names say e.g. CvT-13-384x384-IN-22k.pth
            if m and "img_size" not in overrides:
                overrides["img_size"] = int(m.group(1))
            cfg = infer_config(state, variant, None, overrides, config_source, activation=default_act)
            arch, overrides, recorded = WeightsArch.read(state), {}, False  # infer_config applied them
            source_kind = "official checkpoint" if default_act == "quick_gelu" else "Hugging Face-keyed checkpoint"
    if overrides:
        changed = [f"{k}: recorded {_show(getattr(cfg, k))}, given {_show(tuple(v) if isinstance(v, list) else v)}"
                   for k, v in overrides.items() if k in ARCH_FIELDS and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k)]
        if recorded and changed:
            raise CvtDeployError(f"{path} records its own architecture, and {config_source} changes it: " + "; ".join(changed),
                                 "drop those fields: the checkpoint's recorded values are what its weights were trained with")
        cfg = apply_overrides(cfg, overrides, arch, config_source)
        if cfg.variant in list_variants() or cfg.variant == CUSTOM_VARIANT:
            cfg = named(cfg)
    if variant and get_config(variant).arch() != cfg.arch():
        want = get_config(variant)
        raise wrong_variant(str(path), cfg.variant if cfg.variant in list_variants() else None, want, cfg.arch_diff(want))
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
        save_file(state, str(tmp), metadata={CONFIG_KEY: model.cfg.to_json()})
    return path
