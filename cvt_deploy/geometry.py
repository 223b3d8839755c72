"""What a CvT architecture implies before anything is built: token-map sides, widths, sizes.

Reads only the architecture fields (any object that has them, :class:`~cvt_deploy.config.CvtConfig`
in practice), so that the config can bound itself without importing what it describes.
"""
from __future__ import annotations

from typing import Protocol

from .errors import CvtDeployError

# Bounds on what a config (a file from someone else) may ask for: far above any real CvT
# (CvT-W24 at 384: 277 M parameters, largest activation 64 M values per image), low enough
# that an absurd value is refused here, before PyTorch, ONNX Runtime or the preprocessing
# allocates gigabytes for it.
MAX_STAGES = 64
MAX_BLOCKS = 4096
MAX_PARAMS = 1 << 30             # 4 GiB of fp32 weights
MAX_ACTIVATION = 1 << 30         # values of the largest tensor one image makes (4 GiB of fp32)


class Arch(Protocol):
    """The architecture fields read here (read-only, as on the frozen config)."""

    @property
    def img_size(self) -> int: ...
    @property
    def in_chans(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def embed_dims(self) -> tuple[int, ...]: ...
    @property
    def num_heads(self) -> tuple[int, ...]: ...
    @property
    def depths(self) -> tuple[int, ...]: ...
    @property
    def mlp_ratios(self) -> tuple[float, ...]: ...
    @property
    def patch_sizes(self) -> tuple[int, ...]: ...
    @property
    def patch_strides(self) -> tuple[int, ...]: ...
    @property
    def patch_paddings(self) -> tuple[int, ...]: ...
    @property
    def qkv_kernels(self) -> tuple[int, ...]: ...
    @property
    def kv_strides(self) -> tuple[int, ...]: ...
    @property
    def kv_paddings(self) -> tuple[int, ...]: ...
    @property
    def qkv_projections(self) -> tuple[str, ...]: ...
    @property
    def cls_token(self) -> tuple[bool, ...]: ...


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def pool_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output size of AvgPool2d(ceil_mode=True), as PyTorch (and ONNX's AveragePool) size it."""
    out = -(-(n + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= n + padding else out


def stage_maps(cfg: Arch) -> list[tuple[int, int]]:
    """Per stage, the side of its token map and of its key/value map (square inputs).

    Queries keep the token map's size (validated); keys/values are squeezed by a strided
    conv ("dw_bn"), pooled ("avg") or left as they are ("linear").
    """
    out, h = [], cfg.img_size
    for i in range(len(cfg.embed_dims)):
        h = conv_out(h, cfg.patch_sizes[i], cfg.patch_strides[i], cfg.patch_paddings[i])
        k, s, p = cfg.qkv_kernels[i], cfg.kv_strides[i], cfg.kv_paddings[i]
        method = cfg.qkv_projections[i]
        hk = conv_out(h, k, s, p) if method == "dw_bn" else pool_out(h, k, s, p) if method == "avg" else h
        out.append((h, hk))
        if h < 1:
            break
    return out


def mlp_hidden(dim: int, ratio: float) -> int:
    """The MLP's hidden width, rounded as the official and Hugging Face code round it."""
    return int(dim * ratio)


def param_estimate(cfg: Arch) -> int:
    """Weights the architecture has, within a fraction of a percent (norms and biases counted
    roughly): token-embedding convs, per block the q/k/v projections' convs, the four dim x dim
    Linears and the MLP, and the head."""
    total, chans = 0, cfg.in_chans
    for i, dim in enumerate(cfg.embed_dims):
        k, kq = cfg.patch_sizes[i], cfg.qkv_kernels[i]
        total += chans * dim * k * k + 3 * dim
        conv = 3 * (kq * kq + 2) * dim if cfg.qkv_projections[i] == "dw_bn" else 0
        hidden = mlp_hidden(dim, cfg.mlp_ratios[i])
        total += cfg.depths[i] * (conv + 4 * dim * dim + 2 * dim * hidden + hidden + 8 * dim)
        chans = dim
    return total + cfg.embed_dims[-1] * (cfg.num_classes + 2) + cfg.num_classes


def largest_activation(cfg: Arch) -> int:
    """Values in the largest tensor one image makes: a stage's MLP hidden activations or its
    attention map (heads x queries x keys), or the input itself."""
    largest = cfg.in_chans * cfg.img_size ** 2
    for i, (h, hk) in enumerate(stage_maps(cfg)):
        cls = int(cfg.cls_token[i])
        n_q, n_kv = h * h + cls, hk * hk + cls
        largest = max(largest, n_q * mlp_hidden(cfg.embed_dims[i], cfg.mlp_ratios[i]), cfg.num_heads[i] * n_q * n_kv)
    return largest


_FIX = "check the config's widths, depths, image size and class count (a damaged or hostile file?)"


def check_stages(n: int) -> None:
    """Refuse more stages than any CvT has, before anything is done per stage."""
    if n > MAX_STAGES:
        raise CvtDeployError(f"model config field 'embed_dims' lists {n} stages; cvt-deploy builds at most {MAX_STAGES}",
                             _FIX)


def check_sizes(cfg: Arch) -> None:
    """Refuse an architecture too big to be a real CvT, naming the field and the limit."""
    fix = _FIX
    if sum(cfg.depths) > MAX_BLOCKS:
        raise CvtDeployError(f"model config field 'depths' {cfg.depths} asks for {sum(cfg.depths)} blocks; "
                             f"cvt-deploy builds at most {MAX_BLOCKS}", fix)
    params = param_estimate(cfg)
    if params > MAX_PARAMS:
        raise CvtDeployError(f"this architecture (embed_dims {cfg.embed_dims}, depths {cfg.depths}, num_classes "
                             f"{cfg.num_classes}) has about {params:,} parameters, over the limit of {MAX_PARAMS:,}", fix)
    activation = largest_activation(cfg)
    if activation > MAX_ACTIVATION:
        raise CvtDeployError(f"at img_size {cfg.img_size} one image makes a tensor of {activation:,} values "
                             f"(embed_dims {cfg.embed_dims}, num_heads {cfg.num_heads}), over the limit of "
                             f"{MAX_ACTIVATION:,}", fix + "; a smaller img_size")
