"""Hugging Face CvT checkpoints: key names, ``config.json`` and ``preprocessor_config.json``
read field by field (every value checked), and the hub."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..config import CUSTOM_VARIANT, CvtConfig, PreprocessConfig, get_config, match_variant, named
from ..errors import CvtDeployError, require
from ..jsonio import read_json_object
from .arch import WeightsArch

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


# The processors whose preprocessing is CvT's (ConvNeXt's: shorter side to size / crop_pct and a
# center crop below 384, a squash at 384 and up); "feature extractor" is their older name.
_PROCESSORS = ("ConvNextImageProcessor", "ConvNextImageProcessorFast", "ConvNextImageProcessorPil",
               "ConvNextFeatureExtractor")
_HF_MEAN_STD = 0.5  # ConvNextImageProcessor's own mean and std per channel, for a file that sets none
_RESCALE = 1 / 255


def _hf_preprocess(folder: Path, img_size: int) -> PreprocessConfig:
    """The image processor's settings (``preprocessor_config.json``) when the folder has them,
    read as transformers' ConvNeXt processor reads them: every field it sets is honoured (a
    rescale or no normalisation is folded into mean/std) or refused when cvt-deploy cannot."""
    path = folder / "preprocessor_config.json"
    base = PreprocessConfig.for_size(img_size)
    if not path.is_file():
        return base
    raw = read_json_object(path, _RESTORE)
    kind = raw.get("image_processor_type", raw.get("feature_extractor_type"))
    if kind is not None and kind not in _PROCESSORS:
        raise CvtDeployError(f"{path}: image_processor_type {kind!r} is not the ConvNeXt processor CvT checkpoints use",
                             f"use one of {', '.join(_PROCESSORS)}, or write preprocess fields with --config")
    for key, unsupported in (("do_resize", False), ("do_center_crop", True), ("do_pad", True)):
        if raw.get(key, not unsupported) is unsupported:
            raise CvtDeployError(f"{path}: {key} {str(unsupported).lower()} is not a preprocessing cvt-deploy can "
                                 "reproduce (every image is resized and cropped by crop_pct to the model's size)",
                                 f"remove {key} from the file, or set it {str(not unsupported).lower()}")
    channels = len(base.mean)
    mean = raw.get("image_mean", [_HF_MEAN_STD] * channels)
    std = raw.get("image_std", [_HF_MEAN_STD] * channels)
    if raw.get("do_normalize", True) is False:
        mean, std = [0.0] * channels, [1.0] * channels
    changes: dict[str, Any] = {"mean": tuple(mean) if isinstance(mean, list) else mean,
                               "std": tuple(std) if isinstance(std, list) else std}
    rescale = 1.0 if raw.get("do_rescale", True) is False else raw.get("rescale_factor", _RESCALE)
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 < rescale < float("inf"):
        raise CvtDeployError(f"{path}: rescale_factor {rescale!r} is not a positive number", "1/255 is CvT's")
    if abs(rescale - _RESCALE) > 1e-12 and all(isinstance(v, (int, float)) for v in (*changes["mean"], *changes["std"])):
        # (x * r - mean) / std  ==  (x / 255 - mean / (255 r)) / (std / (255 r)): the same input
        scale = 255.0 * rescale
        changes = {k: tuple(v / scale for v in changes[k]) for k in ("mean", "std")}
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
        if "shortest_edge" not in size and size.get("height") != size.get("width"):
            raise CvtDeployError(f"{path}: size {size} is not square; CvT's preprocessing makes square inputs",
                                 'use "size": {"shortest_edge": N}')
        size = size.get("shortest_edge", size.get("height"))
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise CvtDeployError(f"{path}: size {size!r} is not a positive number of pixels", 'use e.g. "size": 224')
    return size


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    raw = read_json_object(path, _RESTORE)
    if raw.get("model_type") != "cvt":
        raise CvtDeployError(f"{path} describes a {raw.get('model_type')!r} model, not a CvT",
                             "point --weights at a Hugging Face CvT checkpoint (model_type 'cvt')")
    return raw


def hf_config(folder: Path, raw: dict[str, Any], arch: WeightsArch, activation: str, img_size: int | None) -> CvtConfig:
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


def resolve_hub(source: str) -> Path:
    require("huggingface_hub", "hub", f"Fetching {source!r} from the Hugging Face Hub")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model.bin"]))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise CvtDeployError(
            f"could not fetch {source!r} from the Hugging Face Hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "check the id and the network, or download the folder elsewhere and pass its path",
        ) from None
