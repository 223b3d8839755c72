"""What one image costs: multiply-accumulates by kind of layer, from the architecture alone."""
from __future__ import annotations

from ..config import CvtConfig
from ..geometry import mlp_hidden, stage_maps


def mac_breakdown(cfg: CvtConfig) -> dict[str, int]:
    """Multiply-accumulates of one image through the model, by kind of layer.

    Counted as the paper counts: convolutions and Linear layers (weights x output positions)
    and the two attention matmuls; norms, softmax, pooling, activations and additions are
    left out (they are well under 1%). k/v are squeezed by each stage's ``kv_strides``; a
    class token is one extra query and one extra key/value that skip the projections' convs.
    """
    out = dict.fromkeys(("conv_embed", "dw_conv", "qkv_proj", "attention", "out_proj", "mlp", "head"), 0)
    chans = cfg.in_chans
    for i, (h, hk) in enumerate(stage_maps(cfg)):
        dim, depth, k = cfg.embed_dims[i], cfg.depths[i], cfg.patch_sizes[i]
        out["conv_embed"] += h * h * dim * chans * k * k
        chans = dim
        if cfg.qkv_projections[i] == "dw_bn":
            kq = cfg.qkv_kernels[i]
            out["dw_conv"] += depth * kq * kq * dim * (h * h + 2 * hk * hk)  # q keeps the map size
        cls = int(cfg.cls_token[i])
        n_q, n_kv = h * h + cls, hk * hk + cls
        hidden = mlp_hidden(dim, cfg.mlp_ratios[i])
        out["qkv_proj"] += depth * dim * dim * (n_q + 2 * n_kv)
        out["attention"] += depth * 2 * n_q * n_kv * dim  # q @ k^T and attn @ v, summed over heads
        out["out_proj"] += depth * n_q * dim * dim
        out["mlp"] += depth * 2 * n_q * dim * hidden
    out["head"] = cfg.embed_dims[-1] * cfg.num_classes
    return out


def count_macs(cfg: CvtConfig) -> int:
    """MACs per image (CvT-13 at 224: 4.57 G; the paper rounds to 4.5 G). GFLOPs = 2 x GMACs."""
    return sum(mac_breakdown(cfg).values())


def linear_gemms(cfg: CvtConfig) -> list[tuple[int, int, int, int]]:
    """The model's Linear layers as GEMMs, ``(rows per image, K, N, how many)``: the q/k/v and
    output projections and the MLP of every block (what each int8 graph here runs in int8; the
    convolutions and the two attention matmuls stay float in the ONNX Runtime CPU int8 graph)."""
    shapes: dict[tuple[int, int, int], int] = {}
    for i, (h, hk) in enumerate(stage_maps(cfg)):
        dim, depth, cls = cfg.embed_dims[i], cfg.depths[i], int(cfg.cls_token[i])
        n_q, n_kv, hidden = h * h + cls, hk * hk + cls, mlp_hidden(dim, cfg.mlp_ratios[i])
        for shape, count in (((n_q, dim, dim), 2), ((n_kv, dim, dim), 2), ((n_q, dim, hidden), 1), ((n_q, hidden, dim), 1)):
            shapes[shape] = shapes.get(shape, 0) + count * depth
    return [(m, k, n, count) for (m, k, n), count in shapes.items()]
