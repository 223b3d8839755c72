"""What a checkpoint's tensors say about its architecture, and the config built from them.

Official ``.pth`` files carry tensors only: widths, depths, MLP ratios, class count, qkv bias,
class tokens and projection kernels show in their shapes; heads, strides, paddings and the
official "avg"/"linear" projections do not, and come from the user, the variant registry or
the paper. Configs that files record are checked against the same shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import (CUSTOM_VARIANT, CvtConfig, PreprocessConfig, get_config, mlp_hidden, named,
                      registered_heads)
from ..errors import CvtDeployError

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
                    "this does not look like a CvT checkpoint: "
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
        return [f"{names.get(name, name)}: config {show(said)}, weights {show(seen)}"
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


def show(value: Any) -> str:
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


def match_variant_for(state: Mapping[str, Any]) -> str | None:
    """The registered variant these tensors are, if any (heads assumed from the registry)."""
    try:
        name = infer_config(state).variant
    except CvtDeployError:
        return None
    return None if name == CUSTOM_VARIANT else name
