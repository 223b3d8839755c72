"""Model and preprocessing configuration, and the variant registry.

Torch-free on purpose: an edge runtime reads these from a bundle's metadata to preprocess
images exactly as the model was trained, without PyTorch installed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from .errors import CvtDeployError
from .jsonio import parse_json
from .geometry import check_sizes, check_stages, conv_out, mlp_hidden, pool_out, stage_maps  # noqa: F401  (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("quick_gelu", "gelu")
# The official code's q/k/v projections: depthwise conv + BatchNorm; k/v average-pooled
# (q untouched); or none at all. Hugging Face's port builds only dw_bn.
PROJECTIONS = ("dw_bn", "avg", "linear")
RESIZE_MODES = ("shorter", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
CUSTOM_VARIANT = "cvt-custom"
# Upper bounds for sizes read from files: far above any real CvT, low enough that a damaged
# value is an error here instead of an attempt to allocate terabytes.
_MAX_SIZE = 1 << 16
_MAX_CLASSES = 1 << 22


def _fail(field_name: str, value: Any, must: str, fix: str) -> NoReturn:
    raise CvtDeployError(f"model config field {field_name!r} is {value!r}: {must}", fix)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input (CvT paper / official evaluation code).

    ``resize="shorter"``: resize the shorter side to ``int(size / crop_pct)`` then center
    crop ``size`` (224 models: 256 then 224). ``resize="squash"``: resize to size x size,
    no crop (384 models). ``mean``/``std`` have one entry per input channel (3 for RGB, 1
    for a grayscale model).
    """

    size: int = 224
    resize: str = "shorter"
    crop_pct: float = 224 / 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size < 1:
            _fail("preprocess.size", self.size, "must be a positive integer (pixels)", "use the model's input size, e.g. 224")
        if self.resize not in RESIZE_MODES:
            _fail("preprocess.resize", self.resize, f"must be one of {', '.join(RESIZE_MODES)}",
                  "use 'shorter' (resize + center crop, 224 models) or 'squash' (384 models)")
        if not _is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            _fail("preprocess.crop_pct", self.crop_pct, "must be a number with 0 < crop_pct <= 1",
                  "use 0.875 (resize 256, crop 224) or 1.0 (no crop)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) not in (1, 3) or not all(_is_number(v) for v in value):
                _fail(f"preprocess.{name}", value, "must be 3 numbers (RGB) or 1 (grayscale)",
                      f"use ImageNet's {list(IMAGENET_MEAN if name == 'mean' else IMAGENET_STD)}")
        if len(self.mean) != len(self.std):
            _fail("preprocess.std", self.std, f"must have as many entries as mean {self.mean}", "give one mean and one std per channel")
        if not all(s > 0 for s in self.std):
            _fail("preprocess.std", self.std, "every entry must be > 0 (it divides the pixels)", f"use ImageNet's {list(IMAGENET_STD)}")
        # Pixels are scaled to 0..1 before normalising: values on the 0..255 scale (123.675,
        # 58.395) or a near-zero std would turn every image into garbage, silently.
        if not all(0 <= m <= 1 for m in self.mean):
            _fail("preprocess.mean", self.mean, "every entry must be within 0..1: pixels are scaled to 0..1 first "
                  "(values above 1 are on the 0..255 scale)",
                  f"divide 0..255-scale values by 255, e.g. ImageNet's {list(IMAGENET_MEAN)}")
        if not all(1e-3 <= s <= 10 for s in self.std):
            _fail("preprocess.std", self.std, "every entry must be within 0.001..10: pixels are scaled to 0..1 first "
                  "(values above 10 are on the 0..255 scale)",
                  f"divide 0..255-scale values by 255, e.g. ImageNet's {list(IMAGENET_STD)}")
        if self.interpolation not in INTERPOLATIONS:
            _fail("preprocess.interpolation", self.interpolation, f"must be one of {', '.join(INTERPOLATIONS)}",
                  "use 'bicubic', what CvT was evaluated with")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def for_size(cls, size: int, like: PreprocessConfig | None = None) -> PreprocessConfig:
        """The paper's evaluation transform at ``size``; mean/std/interpolation from ``like``,
        and its crop too while the resize mode stays the same."""
        base = like or cls()
        # The official evaluation and the HF processor switch behaviour at 384.
        if size >= 384:
            return dataclasses.replace(base, size=size, resize="squash", crop_pct=1.0)
        crop = base.crop_pct if like is not None and like.resize == "shorter" else 224 / 256
        return dataclasses.replace(base, size=size, resize="shorter", crop_pct=crop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> PreprocessConfig:
        if not isinstance(d, dict):
            _fail("preprocess", d, "must be a JSON object", "re-export the model with cvt-export")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CvtDeployError(f"unknown preprocess config keys {sorted(unknown)}",
                                 "the file was written by a newer cvt-deploy; upgrade cvt-deploy")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


# Per-stage architecture fields, each with its default for n stages (the paper's values)
# and what a valid entry is. The class token sits in the last stage only by default.
_STAGE_DEFAULTS: dict[str, Callable[[int], tuple[Any, ...]]] = {
    "mlp_ratios": lambda n: (4.0,) * n,
    "patch_sizes": lambda n: (7,) + (3,) * (n - 1),
    "patch_strides": lambda n: (4,) + (2,) * (n - 1),
    "patch_paddings": lambda n: (2,) + (1,) * (n - 1),
    "qkv_kernels": lambda n: (3,) * n,
    "q_strides": lambda n: (1,) * n,
    "q_paddings": lambda n: (1,) * n,
    "kv_strides": lambda n: (2,) * n,
    "kv_paddings": lambda n: (1,) * n,
    "qkv_bias": lambda n: (True,) * n,
    "cls_token": lambda n: (False,) * (n - 1) + (True,),
    "qkv_projections": lambda n: ("dw_bn",) * n,
}
_POSITIVE = ("embed_dims", "num_heads", "depths", "patch_sizes", "patch_strides", "qkv_kernels", "q_strides", "kv_strides")
_NON_NEGATIVE = ("patch_paddings", "q_paddings", "kv_paddings")
_FLAGS = ("qkv_bias", "cls_token")
# Fields whose values change what the network computes (all but labels/preprocessing/name).
ARCH_FIELDS = ("embed_dims", "num_heads", "depths", "in_chans", *_STAGE_DEFAULTS)


@dataclass(frozen=True)
class CvtConfig:
    """Everything needed to build a CvT and feed it: architecture, classes, preprocessing.

    Describes any CvT the official microsoft/CvT code can build: any number of stages, and
    per stage its width, heads, depth, MLP ratio, token-embedding conv (kernel, stride,
    padding), q/k/v projection (method, kernel, strides, paddings), qkv bias and whether it
    has a class token. Per-stage fields left empty take the paper's values. ``variant`` is
    a name only: the registered variant's name when the architecture is one, else
    ``cvt-custom``.
    """

    variant: str
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    depths: tuple[int, ...]
    img_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    activation: str = "quick_gelu"
    labels: tuple[str, ...] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    mlp_ratios: tuple[float, ...] = ()
    patch_sizes: tuple[int, ...] = ()
    patch_strides: tuple[int, ...] = ()
    patch_paddings: tuple[int, ...] = ()
    qkv_kernels: tuple[int, ...] = ()
    q_strides: tuple[int, ...] = ()
    q_paddings: tuple[int, ...] = ()
    kv_strides: tuple[int, ...] = ()
    kv_paddings: tuple[int, ...] = ()
    qkv_bias: tuple[bool, ...] = ()
    cls_token: tuple[bool, ...] = ()
    qkv_projections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_stages()
        self._check_attention()
        self._check_classes()
        self._check_input()

    def _check_stages(self) -> None:
        """One entry per stage in every per-stage field (the paper's where none was given), each in range."""
        if not isinstance(self.variant, str) or not self.variant:
            _fail("variant", self.variant, "must be a non-empty name", f"use e.g. {CUSTOM_VARIANT!r}")
        if not isinstance(self.embed_dims, tuple) or not self.embed_dims:
            _fail("embed_dims", self.embed_dims, "must list one width per stage", "e.g. [64, 192, 384] for CvT-13")
        n = len(self.embed_dims)
        check_stages(n)
        for name, default in _STAGE_DEFAULTS.items():
            if getattr(self, name) == ():
                object.__setattr__(self, name, default(n))
        for name in ("num_heads", "depths", *_STAGE_DEFAULTS):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != n:
                _fail(name, value, f"must have one entry per stage ({n} stages, as many as the widths)",
                      "give every per-stage field the same number of entries")
        for name in _POSITIVE + _NON_NEGATIVE:
            low = 1 if name in _POSITIVE else 0
            value = getattr(self, name)
            if not all(_is_int(v) and low <= v <= _MAX_SIZE for v in value):
                _fail(name, value, f"every entry must be an integer from {low} to {_MAX_SIZE}", "fix the per-stage values")
        for name in _FLAGS:
            if not all(isinstance(v, bool) for v in getattr(self, name)):
                _fail(name, getattr(self, name), "every entry must be true or false", "fix the per-stage values")
        for dim, ratio in zip(self.embed_dims, self.mlp_ratios):
            if not _is_number(ratio) or not 1 <= dim * ratio < _MAX_SIZE + 1:
                _fail("mlp_ratios", self.mlp_ratios, f"every entry must be a number > 0 giving an MLP width from 1 to "
                      f"{_MAX_SIZE}", "e.g. 4.0 (the paper's)")
        for method in self.qkv_projections:
            if method not in PROJECTIONS:
                _fail("qkv_projections", self.qkv_projections, f"{method!r} is not a CvT projection ({', '.join(PROJECTIONS)})",
                      "use 'dw_bn' (the paper's convolutional projection)")

    def _check_attention(self) -> None:
        """Heads that divide each width; q/k/v projections that keep the shapes the blocks add up."""
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads:
                raise CvtDeployError(f"stage {i}: embedding width {dim} is not divisible by {heads} heads",
                                     f"give stage {i} a head count that divides {dim} (num_heads / --heads)")
        for i in range(self.num_stages):
            k, s, p = self.qkv_kernels[i], self.q_strides[i], self.q_paddings[i]
            if self.qkv_projections[i] == "dw_bn" and (s != 1 or 2 * p != k - 1):
                # The residual adds attention output to its input, so queries must keep the map size.
                _fail("q_paddings" if s == 1 else "q_strides", self.q_paddings if s == 1 else self.q_strides,
                      f"stage {i}: a query projection with kernel {k} must keep the token map's size "
                      f"(stride 1, padding {(k - 1) / 2:g})", "fix the query stride or padding")
            if self.qkv_projections[i] == "avg" and 2 * self.kv_paddings[i] > k:
                _fail("kv_paddings", self.kv_paddings, f"stage {i}: average pooling pads at most half its kernel {k}",
                      "fix the key/value padding")

    def _check_classes(self) -> None:
        """Input channels, classes, their labels and the activation."""
        if not _is_int(self.in_chans) or not 1 <= self.in_chans <= _MAX_SIZE:
            _fail("in_chans", self.in_chans, "must be a positive integer", "3 for RGB images")
        if not _is_int(self.num_classes) or not 1 <= self.num_classes <= _MAX_CLASSES:
            _fail("num_classes", self.num_classes, f"must be an integer from 1 to {_MAX_CLASSES}", "the classifier's output count")
        if self.activation not in ACTIVATIONS:
            raise CvtDeployError(
                f"unknown activation {self.activation!r}",
                f"use one of {', '.join(ACTIVATIONS)} (quick_gelu for official weights, gelu for Hugging Face's port)",
            )
        if self.labels is not None:
            if not isinstance(self.labels, tuple) or not all(isinstance(v, str) for v in self.labels):
                _fail("labels", self.labels, "must be a list of strings", "one label per class, in class-index order")
            if len(self.labels) != self.num_classes:
                raise CvtDeployError(
                    f"{len(self.labels)} labels given for a model with {self.num_classes} classes",
                    "pass one label per class, in class-index order",
                )

    def _check_input(self) -> None:
        """An image size every stage has tokens at, and preprocessing that produces it."""
        if not isinstance(self.preprocess, PreprocessConfig):
            _fail("preprocess", self.preprocess, "must be a PreprocessConfig", "use PreprocessConfig.for_size(img_size)")
        stride = math.prod(self.patch_strides)
        if not _is_int(self.img_size) or not stride <= self.img_size <= _MAX_SIZE or self.img_size % stride:
            raise CvtDeployError(
                f"image size {self.img_size!r} is not a multiple of CvT's total stride {stride}",
                f"use a multiple of {stride}, e.g. {stride * math.ceil(224 / stride)}",
            )
        for i, (h, hk) in enumerate(stage_maps(self)):
            if h < 1 or hk < 1:
                raise CvtDeployError(
                    f"stage {i} of this architecture has no tokens left at image size {self.img_size} "
                    f"(its {'token embedding' if h < 1 else 'key/value projection'} kernel is larger than its padded input)",
                    "use a larger image size, or check the kernel/stride/padding values")
        check_sizes(self)
        if self.preprocess.size != self.img_size:
            _fail("preprocess.size", self.preprocess.size, f"must equal img_size {self.img_size}",
                  "preprocessing must produce the model's input size")
        if self.preprocess.channels != self.in_chans:
            _fail("preprocess.mean", self.preprocess.mean, f"must have one entry per input channel ({self.in_chans})",
                  "give one mean and one std per channel")

    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    def arch_diff(self, other: CvtConfig) -> list[str]:
        """'field: ours vs theirs' for each architecture field that differs."""
        mine, theirs = self.arch(), other.arch()
        return [f"{k}: {v} vs {theirs[k]}" for k, v in mine.items() if v != theirs[k]]

    def arch(self) -> dict[str, Any]:
        """The fields that decide what the network computes (for comparing architectures)."""
        return {name: getattr(self, name) for name in ARCH_FIELDS}

    def replace(self, **changes: Any) -> CvtConfig:
        if "img_size" in changes and "preprocess" not in changes:
            changes["preprocess"] = PreprocessConfig.for_size(changes["img_size"], like=self.preprocess)
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
    def from_dict(cls, d: Any, source: str | None = None) -> CvtConfig:
        """A config from its JSON form, every value checked; ``source`` names the file in errors.

        Reads what earlier versions wrote too: a scalar ``mlp_ratio``, and no per-stage
        fields (then they are the paper's, which is all those versions could build).
        """
        try:
            if not isinstance(d, dict):
                raise CvtDeployError(f"the model config is a JSON {type(d).__name__}, not an object",
                                     "re-export the model with cvt-export")
            d = dict(d)
            if "mlp_ratio" in d and "mlp_ratios" not in d:
                ratio = d.pop("mlp_ratio")
                d["mlp_ratios"] = [ratio] * len(d["embed_dims"]) if isinstance(d.get("embed_dims"), list) else ratio
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(d) - known
            if unknown:
                raise CvtDeployError(
                    f"unknown model config keys {sorted(unknown)}",
                    "the file was written by a newer cvt-deploy; upgrade cvt-deploy",
                )
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if missing:
                raise CvtDeployError(f"the model config has no {', '.join(missing)}", "re-export the model with cvt-export")
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
            if "preprocess" in d:
                d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
            return cls(**d)
        except CvtDeployError as e:
            if source is None:
                raise
            raise CvtDeployError(f"{source}: {e.message}", e.hint) from None

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> CvtConfig:
        try:
            d = parse_json(text)
        except (ValueError, TypeError) as e:
            raise CvtDeployError(f"{source or 'the model config'} is not valid JSON ({e})",
                                 "re-export the model with cvt-export") from None
        return cls.from_dict(d, source)


# --- variant registry: one tiny function per variant (timm style) ---------------------

_VARIANTS: dict[str, Callable[..., CvtConfig]] = {}


def register_variant(fn: Callable[..., CvtConfig]) -> Callable[..., CvtConfig]:
    _VARIANTS[fn.__name__.replace("_", "-")] = fn
    return fn


def _make(variant: str, dims: tuple[int, ...], heads: tuple[int, ...],
          depths: tuple[int, ...], default_size: int, **overrides: Any) -> CvtConfig:
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


def match_variant(cfg: CvtConfig) -> str | None:
    """The registered variant with exactly this architecture (classes, size, labels aside)."""
    arch = cfg.arch()
    for name in list_variants():
        if get_config(name).arch() == arch:
            return name
    return None


def registered_heads(embed_dims: tuple[int, ...]) -> tuple[int, ...] | None:
    """Head counts of the registered variants with these widths, when they agree (heads are
    not visible in the weights: only the attention's reshape uses them)."""
    found = {get_config(name).num_heads for name in list_variants() if get_config(name).embed_dims == tuple(embed_dims)}
    return found.pop() if len(found) == 1 else None


def named(cfg: CvtConfig) -> CvtConfig:
    """``cfg`` named after the registered variant it is, else ``cvt-custom``."""
    return cfg.replace(variant=match_variant(cfg) or CUSTOM_VARIANT)
