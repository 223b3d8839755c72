"""CvT (Wu et al. 2021) in PyTorch: blocks, then the model, then ``create_model``.

Module names follow the official microsoft/CvT code so its checkpoints load without
renaming. Attention is written with plain MatMul/Softmax (no Einsum) so that the exported
ONNX graph parses on every TensorRT version; in eager mode it may use PyTorch's fused
``scaled_dot_product_attention``, which computes the same function.
"""
from __future__ import annotations

from typing import Any

from .errors import require

require("torch", "torch", "The PyTorch CvT model")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .config import CvtConfig, get_config, mlp_hidden  # noqa: E402

LN_EPS = 1e-5  # official code; HF's config value (1e-12) is never used by its modules


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the official CvT weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ConvEmbed(nn.Module):
    """Convolutional token embedding: strided Conv2d, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class ConvProjection(nn.Module):
    """Depthwise conv + BatchNorm on the token map ("dw_bn"), back to tokens."""

    def __init__(self, dim: int, stride: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, fmap: Tensor) -> Tensor:
        return self.bn(self.conv(fmap)).flatten(2).transpose(1, 2)


class PoolProjection(nn.Module):
    """Average pooling on the token map (the official code's "avg" k/v projection)."""

    def __init__(self, stride: int, kernel: int, padding: int) -> None:
        super().__init__()
        self.avg = nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)

    def forward(self, fmap: Tensor) -> Tensor:
        return self.avg(fmap).flatten(2).transpose(1, 2)


class TokenProjection(nn.Module):
    """No spatial projection: the map back to tokens (official "linear"; q under "avg")."""

    def forward(self, fmap: Tensor) -> Tensor:
        return fmap.flatten(2).transpose(1, 2)


def make_projection(method: str, dim: int, stride: int, kernel: int, padding: int) -> nn.Module:
    if method == "dw_bn":
        return ConvProjection(dim, stride, kernel, padding)
    if method == "avg":
        return PoolProjection(stride, kernel, padding)
    return TokenProjection()


class Attention(nn.Module):
    """Multi-head attention with convolutional q/k/v projections.

    k and v are squeezed by a strided projection (stride 2: 4x fewer tokens). The class
    token skips the convolution but not the Linear projections. The scale is the stage
    width ``dim ** -0.5``, not the head width: that is what the official and HF code compute.
    Under the "avg" method only k and v are pooled, as in the official code.
    """

    def __init__(self, dim: int, num_heads: int, with_cls: bool, kv_stride: int = 2, *, kernel: int = 3,
                 q_stride: int = 1, q_padding: int = 1, kv_padding: int = 1, qkv_bias: bool = True,
                 method: str = "dw_bn") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.with_cls = with_cls
        self.scale = dim ** -0.5
        self.fused_attn = True  # switched off automatically while exporting
        self.conv_proj_q = make_projection("linear" if method == "avg" else method, dim, q_stride, kernel, q_padding)
        self.conv_proj_k = make_projection(method, dim, kv_stride, kernel, kv_padding)
        self.conv_proj_v = make_projection(method, dim, kv_stride, kernel, kv_padding)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        cls = None
        if self.with_cls:
            cls, x = x[:, :1], x[:, 1:]
        fmap = x.transpose(1, 2).reshape(b, c, h, w)
        q, k, v = self.conv_proj_q(fmap), self.conv_proj_k(fmap), self.conv_proj_v(fmap)
        if cls is not None:
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        if self.fused_attn and not _exporting():
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, -1, c))


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting())


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. Drop path is training-only and left out."""

    def __init__(self, cfg: CvtConfig, i: int) -> None:
        super().__init__()
        dim = cfg.embed_dims[i]
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, cfg.num_heads[i], cfg.cls_token[i], cfg.kv_strides[i], kernel=cfg.qkv_kernels[i],
                              q_stride=cfg.q_strides[i], q_padding=cfg.q_paddings[i], kv_padding=cfg.kv_paddings[i],
                              qkv_bias=cfg.qkv_bias[i], method=cfg.qkv_projections[i])
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden(dim, cfg.mlp_ratios[i]), cfg.activation)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, cfg: CvtConfig, i: int, in_chans: int) -> None:
        super().__init__()
        dim = cfg.embed_dims[i]
        self.with_cls = cfg.cls_token[i]  # the paper's variants: last stage only
        self.patch_embed = ConvEmbed(in_chans, dim, cfg.patch_sizes[i], cfg.patch_strides[i], cfg.patch_paddings[i])
        if self.with_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, i) for _ in range(cfg.depths[i]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """NCHW map in; NCHW map and (with a class token) the class token out."""
        b = x.shape[0]
        tokens, h, w = self.patch_embed(x)
        if self.with_cls:
            tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens, h, w)
        cls = None
        if self.with_cls:
            cls, tokens = tokens[:, :1], tokens[:, 1:]
        return tokens.transpose(1, 2).reshape(b, -1, h, w), cls


class CvT(nn.Module):
    """CvT classifier: its stages, then LayerNorm and a Linear head on the final class token
    (or, without one, on the mean of the LayerNormed final tokens, as the official code does).

    Stages are attributes ``stage0``, ``stage1``, ... so that official checkpoint keys load as they are.
    """

    def __init__(self, cfg: CvtConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = (cfg.in_chans,) + cfg.embed_dims[:-1]
        for i in range(cfg.num_stages):
            self.add_module(f"stage{i}", Stage(cfg, i, chans[i]))
        self.norm = nn.LayerNorm(cfg.embed_dims[-1], eps=LN_EPS)
        self.head = nn.Linear(cfg.embed_dims[-1], cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def stages(self) -> list[Stage]:
        return [getattr(self, f"stage{i}") for i in range(self.cfg.num_stages)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Pixels (N, C, H, W) -> final tokens (N, T, C) before the last LayerNorm: the class
        token alone (T = 1) when the last stage has one, else every token of the last map."""
        cls = None
        for stage in self.stages():
            x, cls = stage(x)
        if self.cfg.cls_token[-1]:
            assert cls is not None
            return cls
        return x.flatten(2).transpose(1, 2)

    def forward_head(self, feats: Tensor) -> Tensor:
        x = self.norm(feats)
        return self.head(x[:, 0] if self.cfg.cls_token[-1] else x.mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(variant: str | CvtConfig = "cvt-13", **overrides: Any) -> CvT:
    """A CvT in eval mode with random weights; ``overrides`` as in :func:`get_config`.

    >>> model = create_model("cvt-13", img_size=384, activation="gelu")
    """
    cfg = variant.replace(**overrides) if isinstance(variant, CvtConfig) else get_config(variant, **overrides)
    return CvT(cfg).eval()


def count_params(model: nn.Module) -> int:
    """Parameters as the paper counts them (BatchNorm running statistics are buffers)."""
    return sum(p.numel() for p in model.parameters())
