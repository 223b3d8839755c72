"""The PyTorch CvT: sizes from the paper, structure facts from the reference, config errors."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cvt_deploy  # noqa: E402
from cvt_deploy.config import get_config, list_variants  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.model import Attention, CvT, QuickGELU, count_params, create_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rand(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attentions(model: CvT) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.fixture
def tiny(randomize_weights) -> CvT:
    torch.manual_seed(0)
    model = create_model("cvt-tiny")
    randomize_weights(model, seed=0)
    return model


# --- sizes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_param_counts_match_paper():
    assert round(count_params(create_model("cvt-13")) / 1e6, 1) == 20.0
    assert round(count_params(create_model("cvt-21")) / 1e6, 1) == 31.6
    with torch.device("meta"):
        w24 = create_model("cvt-w24")
    assert next(w24.parameters()).device.type == "meta"  # nothing allocated
    assert round(count_params(w24) / 1e6) == 277
    assert w24.cfg.img_size == 384 and w24.cfg.preprocess.resize == "squash"


def test_count_params_excludes_batchnorm_statistics():
    model = create_model("cvt-tiny")
    n_buffers = sum(b.numel() for b in model.buffers())
    assert n_buffers > 0
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    # head: 64 * num_classes + num_classes
    assert count_params(create_model("cvt-tiny", num_classes=11)) - count_params(
        create_model("cvt-tiny", num_classes=1)) == 10 * 65


# --- structure --------------------------------------------------------------------------


def test_attention_scale_is_full_stage_width():
    for variant in ("cvt-tiny", "cvt-13"):
        cfg = get_config(variant)
        with torch.device("meta"):
            model = create_model(variant)
        for i, stage in enumerate((model.stage0, model.stage1, model.stage2)):
            for blk in stage.blocks:
                assert blk.attn.scale == pytest.approx(cfg.embed_dims[i] ** -0.5)
                assert blk.attn.num_heads == cfg.num_heads[i]


def _reference_attention(attn: Attention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Attention written from cvt.md, independently of the package's code."""
    b, n, c = x.shape
    heads = attn.num_heads
    if attn.with_cls:
        cls, x = x[:, :1], x[:, 1:]
    fmap = x.transpose(1, 2).reshape(b, c, h, w)

    def proj(conv_proj, linear):
        t = conv_proj.bn(conv_proj.conv(fmap)).flatten(2).transpose(1, 2)
        if attn.with_cls:
            t = torch.cat([cls, t], 1)
        t = linear(t)
        return t.reshape(b, t.shape[1], heads, c // heads).permute(0, 2, 1, 3)

    q = proj(attn.conv_proj_q, attn.proj_q)
    k = proj(attn.conv_proj_k, attn.proj_k)
    v = proj(attn.conv_proj_v, attn.proj_v)
    weights = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * c ** -0.5, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, v)
    return attn.proj(out.permute(0, 2, 1, 3).reshape(b, -1, c))


@pytest.mark.parametrize("with_cls", [False, True])
def test_attention_matches_reference_formula(with_cls, randomize_weights):
    torch.manual_seed(1)
    attn = Attention(dim=32, num_heads=4, with_cls=with_cls, kv_stride=2).eval()
    randomize_weights(attn, seed=1)
    h, w = 6, 5
    x = torch.randn(2, h * w + with_cls, 32)
    with torch.no_grad():
        ref = _reference_attention(attn, x, h, w)
        for fused in (True, False):
            attn.fused_attn = fused
            assert torch.allclose(attn(x, h, w), ref, atol=1e-5)
        # Control: the head-width scale (a common mistake) gives a different answer.
        attn.scale = 8 ** -0.5
        assert not torch.allclose(attn(x, h, w), ref, atol=1e-3)


def _token_counts(model: CvT, size: int) -> dict[str, tuple[int, int, int]]:
    """Tokens entering proj_q / proj_k / proj_v (class token included) in each stage's first block."""
    counts: dict[str, dict[str, int]] = {}
    handles = []
    for s in range(3):
        attn = getattr(model, f"stage{s}").blocks[0].attn
        for name in ("q", "k", "v"):
            def hook(_m, args, _out, s=s, name=name):
                counts.setdefault(f"stage{s}", {})[name] = args[0].shape[1]
            handles.append(getattr(attn, f"proj_{name}").register_forward_hook(hook))
    with torch.no_grad():
        model(rand(1, size))
    for hd in handles:
        hd.remove()
    return {k: (v["q"], v["k"], v["v"]) for k, v in counts.items()}


def test_kv_tokens_are_squeezed_tiny():
    counts = _token_counts(create_model("cvt-tiny"), 64)
    assert counts == {"stage0": (256, 64, 64), "stage1": (64, 16, 16), "stage2": (17, 5, 5)}


@pytest.mark.slow
def test_token_counts_cvt13_at_224():
    counts = _token_counts(create_model("cvt-13"), 224)
    assert counts == {"stage0": (3136, 784, 784), "stage1": (784, 196, 196), "stage2": (197, 50, 50)}


def test_conv_projection_strides_and_embedding_convs():
    with torch.device("meta"):
        model = create_model("cvt-13")
    for s, (k, st, p) in enumerate([(7, 4, 2), (3, 2, 1), (3, 2, 1)]):
        stage = getattr(model, f"stage{s}")
        conv = stage.patch_embed.proj
        assert (conv.kernel_size, conv.stride, conv.padding) == ((k, k), (st, st), (p, p))
        assert conv.bias is not None
        for blk in stage.blocks:
            a = blk.attn
            assert a.conv_proj_q.conv.stride == (1, 1)
            assert a.conv_proj_k.conv.stride == a.conv_proj_v.conv.stride == (2, 2)
            for cp in (a.conv_proj_q, a.conv_proj_k, a.conv_proj_v):
                assert cp.conv.groups == cp.conv.in_channels  # depthwise
                assert cp.conv.bias is None
                assert isinstance(cp.bn, nn.BatchNorm2d)


def test_class_token_only_in_last_stage():
    state = create_model("cvt-tiny").state_dict()
    cls_keys = [k for k in state if "cls_token" in k]
    assert cls_keys == ["stage2.cls_token"]
    assert tuple(state["stage2.cls_token"].shape) == (1, 1, 64)
    assert not any("pos_embed" in k for k in state)


def test_layernorm_eps_everywhere():
    cfg = get_config("cvt-13")
    with torch.device("meta"):
        norms = [m for m in create_model("cvt-13").modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 3 + 2 * sum(cfg.depths) + 1  # embeddings, 2 per block, final
    assert all(m.eps == 1e-5 for m in norms)


def test_eager_attention_matches_fused_without_einsum(tiny, monkeypatch):
    x = rand(2, 64, seed=1)
    with torch.no_grad():
        fused = tiny(x)

    def forbidden(*a, **k):
        raise AssertionError("forbidden op used in the eager path")

    monkeypatch.setattr(torch, "einsum", forbidden)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    for a in attentions(tiny):
        a.fused_attn = False
    with torch.no_grad():
        eager = tiny(x)
    assert (eager - fused).abs().max().item() <= 1e-5
    assert fused.std() > 0.1  # non-trivial outputs


def test_activation_is_selectable_and_matters(tiny):
    assert tiny.cfg.activation == "quick_gelu"  # official weights were trained with it
    acts = {type(m) for m in tiny.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    assert acts == {QuickGELU}
    gelu = create_model("cvt-tiny", activation="gelu")
    gelu.load_state_dict(tiny.state_dict())
    gelu_acts = [m for m in gelu.modules() if isinstance(m, (QuickGELU, nn.GELU))]
    assert gelu_acts and all(type(m) is nn.GELU and m.approximate == "none" for m in gelu_acts)
    z = torch.linspace(-4, 4, 101)
    assert torch.allclose(QuickGELU()(z), z * torch.sigmoid(1.702 * z))
    x = rand(2, 64, seed=2)
    with torch.no_grad():
        assert (gelu(x) - tiny(x)).abs().max().item() > 1e-3


def test_unknown_variant_and_bad_activation():
    with pytest.raises(CvtDeployError) as e:
        create_model("cvt-99")
    assert "'cvt-99'" in str(e.value)
    assert "cvt-13" in str(e.value)  # lists the choices
    with pytest.raises(CvtDeployError) as e:
        create_model("cvt-tiny", activation="relu")
    assert "'relu'" in str(e.value) and "quick_gelu" in str(e.value)
    from cvt_deploy.demo import DEMO_WEIGHTS

    with pytest.raises(CvtDeployError, match="'swish'"):
        cvt_deploy.load_checkpoint(DEMO_WEIGHTS, activation="swish")


def test_variant_names():
    assert {"cvt-13", "cvt-21", "cvt-w24", "cvt-tiny"} <= set(list_variants())
    assert get_config("CvT_13") == get_config("cvt-13")
    cfg = get_config("cvt-13")
    assert (cfg.embed_dims, cfg.num_heads, cfg.depths) == ((64, 192, 384), (1, 3, 6), (1, 2, 10))
    cfg = get_config("cvt-21")
    assert (cfg.embed_dims, cfg.num_heads, cfg.depths) == ((64, 192, 384), (1, 3, 6), (1, 4, 16))
    cfg = get_config("cvt-w24")
    assert (cfg.embed_dims, cfg.num_heads, cfg.depths) == ((192, 768, 1024), (3, 12, 16), (2, 2, 20))


@pytest.mark.parametrize("size", [96, 384])
def test_other_input_sizes_build_and_run(size):
    model = cvt_deploy.create_model("cvt-tiny", img_size=size, num_classes=4)
    assert model.cfg.img_size == size and model.cfg.preprocess.size == size
    assert model.cfg.preprocess.resize == ("squash" if size >= 384 else "shorter")
    assert not model.training
    with torch.no_grad():
        out = model(rand(1, size))
    assert out.shape == (1, 4) and torch.isfinite(out).all()


def test_384_config_of_paper_variant():
    cfg = get_config("cvt-13", img_size=384)
    assert cfg.preprocess.size == 384 and cfg.preprocess.resize == "squash" and cfg.preprocess.crop_pct == 1.0
    cfg = get_config("cvt-13")
    assert cfg.preprocess.size == 224 and cfg.preprocess.resize == "shorter"
    assert int(cfg.preprocess.size / cfg.preprocess.crop_pct) == 256


@pytest.mark.parametrize("size", [100, 8, 200])
def test_image_size_must_be_multiple_of_16(size):
    with pytest.raises(CvtDeployError) as e:
        create_model("cvt-tiny", img_size=size)
    assert str(size) in str(e.value) and "16" in str(e.value)


def test_label_count_must_match_classes():
    with pytest.raises(CvtDeployError, match="3 labels given for a model with 10 classes"):
        get_config("cvt-tiny", num_classes=10, labels=("a", "b", "c"))


def test_config_json_round_trip():
    cfg = get_config("cvt-tiny", num_classes=2, labels=("cat", "dog"), img_size=384, activation="gelu")
    assert type(cfg).from_json(cfg.to_json()) == cfg
    with pytest.raises(CvtDeployError, match="unknown model config keys"):
        type(cfg).from_dict({**cfg.to_dict(), "future_field": 1})


# --- torch is optional ------------------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_import_does_not_load_torch():
    r = _run_python("""
        import sys, cvt_deploy
        assert "torch" not in sys.modules, "importing cvt_deploy imported torch"
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_import_without_torch_installed():
    r = _run_python("""
        import sys
        sys.modules["torch"] = None  # import torch -> ImportError, find_spec -> None
        import numpy as np
        import cvt_deploy
        from cvt_deploy.preprocess import preprocess
        x = preprocess(np.zeros((40, 30, 3), np.uint8), cvt_deploy.PreprocessConfig.for_size(32))
        assert x.shape == (1, 3, 32, 32), x.shape
        for call in (lambda: cvt_deploy.create_model("cvt-tiny"),
                     lambda: cvt_deploy.load_checkpoint("x.safetensors")):
            try:
                call()
            except cvt_deploy.MissingDependencyError as e:
                assert isinstance(e, ImportError) and isinstance(e, cvt_deploy.CvtDeployError)
                print("MDE:", str(e).replace("\\n", " "))
            else:
                raise SystemExit("no MissingDependencyError")
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("MDE:") and "cvt-deploy[torch]" in line for line in lines)
