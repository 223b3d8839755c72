"""Model and preprocessing configuration, and the variant registry.

Torch-free on purpose: an edge runtime reads these from a bundle's metadata to preprocess
images exactly as the model was trained, without PyTorch installed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import CvtDeployError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input (CvT paper / official evaluation code).

    ``resize="shorter"``: resize the shorter side to ``int(size / crop_pct)`` then center
    crop ``size`` (224 models: 256 then 224). ``resize="squash"``: resize to size x size,
    no crop (384 models).
    """

    size: int = 224
    resize: str = "shorter"
    crop_pct: float = 224 / 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    @classmethod
    def for_size(cls, size: int) -> PreprocessConfig:
        # The official evaluation and the HF processor switch behaviour at 384.
        return cls(size=size, resize="squash", crop_pct=1.0) if size >= 384 else cls(size=size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class CvtConfig:
    """Everything needed to build a CvT and feed it: architecture, classes, preprocessing."""

    variant: str
    embed_dims: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    depths: tuple[int, int, int]
    img_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    labels: tuple[str, ...] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    # Fixed by the paper for every variant: (kernel, stride, padding) of each stage's
    # convolutional token embedding; the squeezed k/v projection stride.
    patch_sizes = (7, 3, 3)
    patch_strides = (4, 2, 2)
    patch_paddings = (2, 1, 1)
    kv_stride = 2

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise CvtDeployError(
                f"unknown activation {self.activation!r}",
                f"use one of {', '.join(ACTIVATIONS)} (quick_gelu for official weights, gelu for Hugging Face's port)",
            )
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise CvtDeployError(
                f"{len(self.labels)} labels given for a model with {self.num_classes} classes",
                "pass one label per class, in class-index order",
            )
        for name in ("embed_dims", "num_heads", "depths"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
                raise CvtDeployError(f"{name} must be three positive integers (one per stage), got {value!r}",
                                     "CvT has exactly three stages; fix the variant or the config file")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise CvtDeployError(f"embedding width {dim} is not divisible by {heads} heads", "fix the variant's dims/heads")
        stride = 1
        for s in self.patch_strides:
            stride *= s
        if self.img_size < stride or self.img_size % stride:
            raise CvtDeployError(
                f"image size {self.img_size} is not a multiple of CvT's total stride {stride}",
                f"use a multiple of {stride}, e.g. 224 or 384",
            )

    def replace(self, **changes: Any) -> CvtConfig:
        return dataclasses.replace(self, **changes)

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else str(index)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CvtConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CvtDeployError(
                f"unknown model config keys {sorted(unknown)}",
                "the file was written by a newer cvt-deploy; upgrade cvt-deploy",
            )
        d = dict(d)
        for key in ("embed_dims", "num_heads", "depths"):
            d[key] = tuple(d[key])
        if d.get("labels") is not None:
            d["labels"] = tuple(d["labels"])
        if "preprocess" in d:
            d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> CvtConfig:
        return cls.from_dict(json.loads(text))


# --- variant registry: one tiny function per variant (timm style) ---------------------

_VARIANTS: dict[str, Callable[..., CvtConfig]] = {}


def register_variant(fn: Callable[..., CvtConfig]) -> Callable[..., CvtConfig]:
    _VARIANTS[fn.__name__.replace("_", "-")] = fn
    return fn


def _make(variant: str, dims: tuple[int, int, int], heads: tuple[int, int, int],
          depths: tuple[int, int, int], default_size: int, **overrides: Any) -> CvtConfig:
    img_size = overrides.pop("img_size", None) or default_size
    overrides.setdefault("preprocess", PreprocessConfig.for_size(img_size))
    return CvtConfig(variant=variant, embed_dims=dims, num_heads=heads, depths=depths,
                     img_size=img_size, **overrides)


@register_variant
def cvt_13(**kw: Any) -> CvtConfig:
    return _make("cvt-13", (64, 192, 384), (1, 3, 6), (1, 2, 10), 224, **kw)


@register_variant
def cvt_21(**kw: Any) -> CvtConfig:
    return _make("cvt-21", (64, 192, 384), (1, 3, 6), (1, 4, 16), 224, **kw)


@register_variant
def cvt_w24(**kw: Any) -> CvtConfig:
    # Released only at 384, ImageNet-22k pretrained.
    return _make("cvt-w24", (192, 768, 1024), (3, 12, 16), (2, 2, 20), 384, **kw)


@register_variant
def cvt_tiny(**kw: Any) -> CvtConfig:
    # Not from the paper: the smallest CvT with every mechanism (several heads, k/v
    # squeeze, class token, several blocks per stage), for tests and the demo. Depths grow
    # (1, 2, 3) because Hugging Face's port needs depth[i] > i to build at all.
    return _make("cvt-tiny", (16, 32, 64), (1, 2, 4), (1, 2, 3), 64, **kw)


def list_variants() -> list[str]:
    return sorted(_VARIANTS)


def get_config(variant: str, **overrides: Any) -> CvtConfig:
    """The config of a registered variant; ``overrides`` replace fields (img_size, num_classes, ...)."""
    name = variant.lower().replace("_", "-")
    if name not in _VARIANTS:
        raise CvtDeployError(f"unknown CvT variant {variant!r}", f"choose one of: {', '.join(list_variants())}")
    return _VARIANTS[name](**overrides)


def match_variant(embed_dims: tuple[int, ...], depths: tuple[int, ...]) -> str | None:
    """The registered variant with these widths and depths (heads are not visible in weights)."""
    for name in list_variants():
        cfg = get_config(name)
        if cfg.embed_dims == tuple(embed_dims) and cfg.depths == tuple(depths):
            return name
    return None
