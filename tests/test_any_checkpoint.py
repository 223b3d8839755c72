"""Any CvT checkpoint loads as what it is: the architecture and classes come from the checkpoint.

Checkpoints are made here (nothing can be downloaded): Hugging Face models saved with
``save_pretrained`` (compared with ``CvtForImageClassification`` in fp32), official-key
``.pth`` files of architectures no variant describes, and damaged configs, each of which
must give one clean error (exit code 2 from the CLI) that names the file and the value.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import cvt_deploy  # noqa: E402
from cvt_deploy.bench import count_macs  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.checkpoints import hf_to_official, load_checkpoint, save_checkpoint  # noqa: E402
from cvt_deploy.config import CvtConfig, PreprocessConfig, get_config  # noqa: E402
from cvt_deploy.demo import DEMO_SAMPLES  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.model import Attention, create_model  # noqa: E402
from cvt_deploy.backends import load  # noqa: E402
from conftest import run_cli  # noqa: E402

TOL = 1e-4

# Architectures no registered variant describes, as transformers.CvtConfig fields.
W24_FEW_BLOCKS = {"embed_dim": [192, 768, 1024], "num_heads": [3, 12, 16], "depth": [1, 2, 3]}
PER_STAGE = {"embed_dim": [16, 32, 48], "num_heads": [2, 2, 3], "depth": [1, 2, 3], "mlp_ratio": [2.0, 3.0, 4.5],
             "stride_kv": [1, 2, 1], "kernel_qkv": [3, 5, 3], "padding_q": [1, 2, 1], "padding_kv": [1, 2, 0],
             "qkv_bias": [True, False, True], "patch_sizes": [5, 3, 3], "patch_padding": [1, 1, 1]}

# name -> (hf_cvt_checkpoint args, image size, registered variant or None, slow)
CASES = {
    "default-2-classes": (("default",), {}, 224, "cvt-13"),
    "cvt13-10-classes": (("cvt-13", 10), {}, 224, "cvt-13"),
    "w24-widths-384-7-classes": (("cvt-13", 7), W24_FEW_BLOCKS, 384, None),
    "per-stage-5-classes": (("cvt-13", 5), PER_STAGE, 64, None),
}
SLOW = {"default-2-classes", "cvt13-10-classes", "w24-widths-384-7-classes"}
PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in CASES]


def make_case(hf_cvt_checkpoint, name):
    args, kw, size, variant = CASES[name]
    return hf_cvt_checkpoint(*args, **kw), size, variant


def pixels(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(ck, x: torch.Tensor) -> np.ndarray:
    return ck.model(pixel_values=x).logits.numpy()


def run(name: str, args: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of a command run in-process (cvt-export quietly)."""
    # cvt-export quietly and without the CPU-path timing: the subject here is the checkpoint
    proc = run_cli(name, *args, *(["-q", "--no-timing", "--no-rtx-build"] if name == "cvt-export" and "--no-timing" not in args
                                  else []))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


# --- Hugging Face checkpoints of any architecture ------------------------------------


@pytest.mark.parametrize("name", PARAMS)
def test_hf_checkpoint_loads_as_what_it_is(hf_cvt_checkpoint, name):
    ck, size, variant = make_case(hf_cvt_checkpoint, name)
    if name == "default-2-classes":  # the reported case: transformers 5 leaves the class count out
        raw = json.loads((ck.folder / "config.json").read_text())
        assert "id2label" not in raw and "num_labels" not in raw
    model = load_checkpoint(ck.folder, img_size=size)
    cfg = model.cfg
    assert cfg.variant == (variant or "cvt-custom")
    assert cfg.num_classes == ck.model.config.num_labels
    assert cfg.labels == (ck.labels or None)  # no id2label in config.json: class indices
    hf = ck.model.config
    for ours, theirs in (("embed_dims", "embed_dim"), ("num_heads", "num_heads"), ("depths", "depth"),
                         ("mlp_ratios", "mlp_ratio"), ("kv_strides", "stride_kv"), ("qkv_bias", "qkv_bias"),
                         ("qkv_kernels", "kernel_qkv"), ("patch_sizes", "patch_sizes")):
        assert getattr(cfg, ours) == tuple(getattr(hf, theirs)), ours
    x = pixels(size)
    ref = hf_logits(ck, x)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - ref).max() <= TOL
        # Control: the comparison is sensitive enough to see the wrong activation.
        wrong = load_checkpoint(ck.folder, img_size=size, activation="quick_gelu")
        assert np.abs(wrong(x).numpy() - ref).max() > 10 * TOL


@pytest.mark.parametrize("name", PARAMS)
def test_hf_checkpoint_through_cvt_export_and_onnxruntime(hf_cvt_checkpoint, tmp_path, name):
    ck, size, variant = make_case(hf_cvt_checkpoint, name)
    out = tmp_path / "bundle"
    rc, err = run("cvt-export", ["--weights", str(ck.folder), "--img-size", str(size), "--out", str(out),
                                        "--batch-range", "1:2:4", "--no-check", "--no-timing"])  # the subject is the checkpoint
    assert rc == 0, err
    bundle = Bundle.open(out)
    assert bundle.config.variant == (variant or "cvt-custom")
    runtime = load(bundle, "onnxruntime")
    x = pixels(size, n=3, seed=1)
    assert np.abs(runtime.run(x.numpy()) - hf_logits(ck, x)).max() <= TOL


# --- official-key .pth of an unregistered architecture --------------------------------


def custom_official(tmp_path: Path, randomize_weights, **fields) -> tuple[Path, torch.nn.Module]:
    """A CvT of an architecture no variant has, saved as an official-key .pth (no heads recorded)."""
    cfg = CvtConfig(variant="mine", embed_dims=(24, 48, 96), num_heads=(2, 4, 6), depths=(1, 1, 2), img_size=64,
                    num_classes=6, preprocess=PreprocessConfig.for_size(64), **fields)
    model = create_model(cfg)
    randomize_weights(model, seed=7)
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_official_pth_of_unregistered_architecture_needs_heads(tmp_path, randomize_weights):
    pth, model = custom_official(tmp_path, randomize_weights)
    rc, err = run("cvt-export", ["--weights", str(pth), "--out", str(tmp_path / "b"), "--no-check"])
    assert rc == 2
    assert "(24, 48, 96)" in err and "--heads" in err and "head counts are not stored" in err
    assert not (tmp_path / "b").exists()
    rc, err = run("cvt-export", ["--weights", str(pth), "--heads", "5,4,6", "--img-size", "64",
                                        "--out", str(tmp_path / "b")])
    assert rc == 2 and "width 24 is not divisible by 5 heads" in err

    out = tmp_path / "bundle"
    rc, err = run("cvt-export", ["--weights", str(pth), "--heads", "2,4,6", "--img-size", "64",
                                        "--out", str(out), "--batch-range", "1:2:4", "--no-check"])
    assert rc == 0, err
    bundle = Bundle.open(out)
    assert bundle.config.variant == "cvt-custom"
    assert (bundle.config.num_heads, bundle.config.depths, bundle.config.num_classes) == ((2, 4, 6), (1, 1, 2), 6)
    x = pixels(64, n=3, seed=2)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(load(bundle, "onnxruntime").run(x.numpy()) - ref).max() <= TOL
    # The heads matter: the same weights read with other heads compute something else.
    other = load_checkpoint(pth, heads=(1, 2, 3), img_size=64)
    with torch.no_grad():
        assert np.abs(other(x).numpy() - ref).max() > 10 * TOL


def test_official_avg_and_linear_projections_need_saying(tmp_path, randomize_weights):
    """The official code's 'avg' (pooled k/v) and 'linear' (none) projections leave no tensors."""
    pth, model = custom_official(tmp_path, randomize_weights, qkv_projections=("avg", "linear", "dw_bn"),
                                 cls_token=(False, True, False))
    with pytest.raises(CvtDeployError, match="stage 0 has no q/k/v projection convolutions") as e:
        load_checkpoint(pth, heads=(2, 4, 6))
    assert "qkv_projections" in str(e.value)
    config = tmp_path / "arch.json"
    config.write_text(json.dumps({"num_heads": [2, 4, 6], "qkv_projections": ["avg", "linear", "dw_bn"]}))
    loaded = load_checkpoint(pth, config=config, img_size=64)
    assert loaded.cfg.arch() == model.cfg.arch() and loaded.cfg.cls_token == (False, True, False)
    x = pixels(64, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # A config that contradicts the tensors is refused, naming both.
    config.write_text(json.dumps({"num_heads": [2, 4, 6], "qkv_projections": ["avg", "linear", "dw_bn"],
                                  "depths": [1, 2, 2]}))
    rc, err = run("cvt-export", ["--weights", str(pth), "--config", str(config), "--out", str(tmp_path / "b")])
    assert rc == 2 and "depths: config [1, 2, 2], weights [1, 1, 2]" in err and str(config) in err


def test_official_pth_of_registered_widths_takes_heads_from_the_registry(tmp_path):
    # CvT-tiny widths with one more block: unregistered, but the registry knows heads for these widths.
    model = create_model(get_config("cvt-tiny", num_classes=3).replace(depths=(1, 2, 4)))
    torch.save(model.state_dict(), tmp_path / "deeper.pth")
    cfg = load_checkpoint(tmp_path / "deeper.pth").cfg
    assert (cfg.variant, cfg.num_heads, cfg.depths, cfg.img_size) == ("cvt-custom", (1, 2, 4), (1, 2, 4), 224)


# --- an unregistered architecture through the whole pipeline ---------------------------


def deeper_demo_model():
    """The demo model with one more block in its last stage that adds nothing (zero residual
    branches): an architecture no variant has, computing exactly the trained demo model."""
    from cvt_deploy.demo import DEMO_WEIGHTS

    demo = load_checkpoint(DEMO_WEIGHTS)
    cfg = demo.cfg.replace(depths=(1, 2, 4), variant="cvt-custom")
    model = create_model(cfg)
    state = demo.state_dict()
    extra = {k: v for k, v in model.state_dict().items() if k.startswith("stage2.blocks.3.")}
    for key, value in extra.items():
        zero = key.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"))
        state[key] = torch.zeros_like(value) if zero else value
    model.load_state_dict(state)
    return demo, model


def test_unregistered_architecture_exports_fp16_int8_checks_predicts_and_benchmarks(tmp_path):
    demo, model = deeper_demo_model()
    pth = tmp_path / "deeper.pth"
    torch.save(model.state_dict(), pth)  # official keys: architecture from the tensors, heads from the registry
    out = tmp_path / "bundle"
    rc, err = run("cvt-export", ["--weights", str(pth), "--img-size", "64", "--precision", "fp16,int8",
                                        "--out", str(out), "--batch-range", "1:4:8", "--limit", "128"])
    assert rc == 0, err
    bundle = Bundle.open(out)
    assert bundle.config.variant == "cvt-custom" and bundle.config.depths == (1, 2, 4)
    assert sorted(bundle.artifacts) == ["onnx-fp16", "onnx-fp32", "onnx-fp32-onnxruntime-cpu", "onnx-int8",
                                        "onnx-int8-onnxruntime-cpu", "onnx-int8-tensorrt-10", "torch-fp32"]
    for precision in ("fp32", "fp16", "int8"):
        parity = bundle.require("onnx", precision).info["parity"]
        assert parity["passed"] is True, (precision, parity)

    rc, err = run("cvt-check", ["--bundle", str(out), "--limit", "32", "-q"])
    assert rc == 0, err

    samples = sorted(DEMO_SAMPLES.glob("digit-*.png"))
    proc = run_cli("cvt-predict", "--bundle", str(out), "--precision", "int8", "--json", *map(str, samples))
    assert proc.returncode == 0, proc.stderr
    got = [item["top"][0]["class"] for item in json.loads(proc.stdout)]
    with torch.no_grad():
        want = demo(torch.from_numpy(cvt_deploy.preprocess(list(map(str, samples)), demo.cfg.preprocess))).argmax(1)
    assert got == want.tolist()  # the trained demo model's answers, through the int8 graph

    result = tmp_path / "bench.json"
    rc, err = run("cvt-bench", ["--bundle", str(out), "--quick", "--batch", "1", "--backend", "onnxruntime",
                                       "--save", str(result), "--quiet"])
    assert rc == 0, err
    rows = json.loads(result.read_text())["rows"]
    ran = {(r["backend"], r["precision"]) for r in rows if r.get("p50_ms")}
    # The Hugging Face reference builds this architecture too (depths (1, 2, 4) is one it can build).
    assert {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32"), ("hf-transformers", "fp32")} <= ran


# --- the model: every official option, checked against its definition ------------------


def test_no_class_token_pools_the_normed_tokens(randomize_weights):
    """Without a class token in the last stage the official head is mean(LayerNorm(tokens))."""
    cfg = get_config("cvt-tiny", num_classes=4).replace(cls_token=(False, False, False))
    model = create_model(cfg)
    randomize_weights(model, seed=4)
    x = pixels(64)
    with torch.no_grad():
        fmap = x
        for stage in model.stages():
            fmap, cls = stage(fmap)
            assert cls is None
        tokens = fmap.flatten(2).transpose(1, 2)
        want = model.head(model.norm(tokens).mean(1))
        assert torch.allclose(model(x), want, atol=1e-6)
    assert "stage2.cls_token" not in model.state_dict()


def test_avg_projection_pools_keys_and_values_only(randomize_weights):
    attn = Attention(32, 4, with_cls=True, kv_stride=2, method="avg").eval()
    randomize_weights(attn, seed=5)
    assert not any("conv_proj" in k for k in attn.state_dict())
    x, h, w = torch.randn(2, 1 + 7 * 7, 32), 7, 7
    cls, fmap = x[:, :1], x[:, 1:].transpose(1, 2).reshape(2, 32, h, w)
    pooled = torch.nn.functional.avg_pool2d(fmap, 3, 2, 1, ceil_mode=True).flatten(2).transpose(1, 2)
    q = torch.cat((cls, fmap.flatten(2).transpose(1, 2)), 1)
    kv = torch.cat((cls, pooled), 1)
    assert kv.shape[1] == 1 + 4 * 4

    def heads(t):
        return t.reshape(2, -1, 4, 8).transpose(1, 2)

    with torch.no_grad():
        a = (heads(attn.proj_q(q)) @ heads(attn.proj_k(kv)).transpose(-2, -1)) * 32 ** -0.5
        want = attn.proj((a.softmax(-1) @ heads(attn.proj_v(kv))).transpose(1, 2).reshape(2, -1, 32))
        assert torch.allclose(attn(x, h, w), want, atol=1e-5)


@pytest.mark.parametrize("fields", [
    {},
    {"qkv_projections": ("avg", "linear", "dw_bn"), "kv_strides": (2, 2, 1)},
    {"cls_token": (False, True, False), "mlp_ratios": (2.0, 3.0, 4.5), "qkv_kernels": (3, 5, 3),
     "q_paddings": (1, 2, 1), "kv_paddings": (1, 2, 0), "qkv_bias": (True, False, True)},
    {"embed_dims": (16, 32), "num_heads": (1, 2), "depths": (1, 2)},
    {"embed_dims": (8, 16, 32, 64), "num_heads": (1, 2, 2, 4), "depths": (1, 1, 1, 1), "img_size": 128},
], ids=["paper", "avg-linear", "per-stage", "two-stages", "four-stages"])
def test_any_architecture_builds_exports_and_counts_its_macs(tmp_path, randomize_weights, fields):
    from torch.utils.flop_counter import FlopCounterMode

    from cvt_deploy.export.onnx import export_onnx
    from cvt_deploy.runtimes.ort import OrtRuntime

    size = fields.pop("img_size", 96)
    base = {"embed_dims": (16, 32, 48), "num_heads": (2, 2, 3), "depths": (1, 2, 3)}
    cfg = CvtConfig(variant="x", img_size=size, num_classes=5, preprocess=PreprocessConfig.for_size(size),
                    **{**base, **fields})
    model = create_model(cfg)
    randomize_weights(model, seed=8)
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False  # the counter sees plain matmuls, not a fused kernel
    x = pixels(size, n=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref = model(x).numpy()
    assert counter.get_total_flops() == 2 * count_macs(cfg)  # the analytic count is exact
    if fields and len(cfg.embed_dims) != 2:  # exports take seconds: the paper's and 2 stages add nothing new there
        path = export_onnx(model, tmp_path / "m.onnx")
        runtime = OrtRuntime(path, cfg, "fp32")
        assert np.abs(runtime.run(x.numpy()) - ref).max() <= TOL
    # A saved checkpoint of it round-trips with its whole architecture.
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.cfg == cfg


# --- damaged configs: one clean error each --------------------------------------------


def damaged_folder(tmp_path: Path, ck, edit) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(ck.folder, folder)
    edit(folder)
    return folder


def edit_config(change):
    def edit(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        change(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    return edit


def write(name: str, text: str):
    def edit(folder: Path) -> None:
        (folder / name).write_text(text)
    return edit


DAMAGE = {
    "invalid JSON": (write("config.json", '{"model_type": "cvt", "embed_dim": [16, 32,'), "config.json is not valid JSON"),
    "a JSON list": (write("config.json", "[1, 2, 3]"), "config.json holds a JSON list, not an object"),
    "no model_type": (edit_config(lambda r: r.pop("model_type")), "describes a None model, not a CvT"),
    # A missing field takes transformers' default (CvT-13's widths), which the tensors contradict.
    "no embed_dim": (edit_config(lambda r: r.pop("embed_dim")),
                     "disagrees with the weights beside it: embed_dim: config [64, 192, 384], weights [16, 32, 64]"),
    "odd id2label keys": (edit_config(lambda r: r.update(id2label={"zero": "a", "1": "b"})),
                          "id2label entry 'zero': 'a' is not a class index"),
    "num_labels disagrees": (edit_config(lambda r: r.update(num_labels=12)),
                             "says num_labels 12, but the classifier tensor has 10 classes"),
    "heads not dividing": (edit_config(lambda r: r.update(num_heads=[1, 3, 4])),
                           "stage 1: embedding width 32 is not divisible by 3 heads"),
    "unknown projection": (edit_config(lambda r: r.update(qkv_projection_method=["dw_bn", "conv", "dw_bn"])),
                           "field 'qkv_projection_method' is ('dw_bn', 'conv', 'dw_bn'): 'conv' is not a CvT projection"),
    "per-stage length": (edit_config(lambda r: r.update(stride_kv=[2, 2])),
                         "field 'stride_kv' is (2, 2): must have one entry per stage (3 stages"),
    "string where a number goes": (edit_config(lambda r: r.update(mlp_ratio=["4", 4, 4])),
                                   "field 'mlp_ratio' is ('4', 4, 4)"),
    "huge mlp_ratio": (edit_config(lambda r: r.update(mlp_ratio=[1e308, 4, 4])), "field 'mlp_ratio' is (1e+308, 4, 4)"),
    "id2label key not a plain number": (edit_config(lambda r: r.update(id2label={"\u00b2": "a"})),
                                        "id2label entry '\u00b2': 'a' is not a class index"),
    "avg padding over half the kernel": (edit_config(lambda r: r.update(qkv_projection_method=["avg"] * 3,
                                                                        padding_kv=[2, 1, 1])),
                                         "average pooling pads at most half its kernel 3"),
    "resample not a number": (write("preprocessor_config.json", '{"size": 64, "resample": [3]}'),
                              "resample [3] is not a resampling filter"),
    "crop_pct 0": (write("preprocessor_config.json", '{"size": 64, "crop_pct": 0}'),
                   "preprocessor_config.json: model config field 'preprocess.crop_pct' is 0: must be a number with 0 < crop_pct <= 1"),
    "unknown interpolation": (write("preprocessor_config.json", '{"size": 64, "resample": 9}'),
                              "preprocessor_config.json: resample 9 is not a resampling filter"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_hf_config_is_a_clean_error(hf_cvt_checkpoint, tmp_path, case):
    edit, expected = DAMAGE[case]
    folder = damaged_folder(tmp_path, hf_cvt_checkpoint("tiny", num_labels=10), edit)
    rc, err = run("cvt-export", ["--weights", str(folder), "--out", str(tmp_path / "b"), "--no-check"])
    assert rc == 2, err
    assert "error: " in err and "fix: " in err
    assert expected in err
    assert str(folder) in err  # names the file
    assert not (tmp_path / "b").exists()


def test_id2label_of_another_class_count_falls_back_to_indices(hf_cvt_checkpoint, tmp_path):
    folder = damaged_folder(tmp_path, hf_cvt_checkpoint("tiny", num_labels=10),
                            edit_config(lambda r: r.update(id2label={"0": "a", "1": "b"})))
    with pytest.warns(UserWarning, match="id2label names 2 classes but the classifier has 10"):
        cfg = load_checkpoint(folder).cfg
    assert cfg.num_classes == 10 and cfg.labels is None and cfg.label(3) == "3"


def test_recorded_architecture_cannot_be_overridden(hf_cvt_checkpoint, tmp_path):
    """--heads/--config describe what official weights cannot: a checkpoint that records its
    architecture keeps it (other heads would compute something the weights were not trained for)."""
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    with pytest.raises(CvtDeployError, match="records its own architecture, and .* changes it: num_heads: recorded "
                                             "\\[1, 2, 4\\], given \\[1, 1, 1\\]"):
        load_checkpoint(ck.folder, heads=(1, 1, 1))
    ours = save_checkpoint(create_model("cvt-tiny", num_classes=3), tmp_path / "t.safetensors")
    with pytest.raises(CvtDeployError, match="kv_strides: recorded \\[2, 2, 2\\], given \\[1, 1, 1\\]"):
        load_checkpoint(ours, config={"kv_strides": [1, 1, 1]})
    # Fields that do not change the network are fine, and the same values are no change.
    assert load_checkpoint(ck.folder, heads=(1, 2, 4), labels=list("abcdefghij")).cfg.labels[0] == "a"


@pytest.mark.parametrize("config, expected", [
    ({"num_heads": 6}, "field 'num_heads' is 6: must have one entry per stage"),
    ({"num_heads": [2, 4, 6], "kv_strides": [0, 2, 2]}, "field 'kv_strides' is (0, 2, 2)"),
    ({"num_heads": [2, 4, 6], "patch_paddings": [0, 0, 0], "img_size": 16}, "stage 2 of this architecture has no tokens"),
    ({"num_heads": [2, 4, 6], "num_classes": 7}, "disagrees with the checkpoint's tensors: num_classes: config 7, weights 6"),
])
def test_bad_given_architecture_names_its_source(tmp_path, randomize_weights, config, expected):
    pth, _ = custom_official(tmp_path, randomize_weights)
    path = tmp_path / "given.json"
    path.write_text(json.dumps(config))
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(pth, config=path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_tensors_of_the_wrong_rank_are_not_a_cvt(tmp_path):
    state = create_model("cvt-tiny").state_dict()
    state["stage0.patch_embed.proj.weight"] = torch.zeros(16)
    torch.save(state, tmp_path / "flat.pth")
    with pytest.raises(CvtDeployError, match="tensor 'stage0.patch_embed.proj.weight' has shape \\(16,\\), not 4-D"):
        load_checkpoint(tmp_path / "flat.pth")
    state = create_model("cvt-tiny").state_dict()
    del state["stage1.blocks.0.mlp.fc1.weight"]
    torch.save(state, tmp_path / "nofc1.pth")
    with pytest.raises(CvtDeployError, match="no tensor 'stage1.blocks.0.mlp.fc1.weight'"):
        load_checkpoint(tmp_path / "nofc1.pth")


def test_wrong_variant_names_what_differs(hf_cvt_checkpoint):
    with pytest.raises(CvtDeployError, match="is not a cvt-13: embed_dims: \\(16, 32, 64\\) vs \\(64, 192, 384\\)"):
        load_checkpoint(hf_cvt_checkpoint("tiny", num_labels=10).folder, variant="cvt-13")


def test_preprocessor_config_is_read(hf_cvt_checkpoint, tmp_path):
    folder = damaged_folder(tmp_path, hf_cvt_checkpoint("tiny", num_labels=10), write(
        "preprocessor_config.json", json.dumps({"size": {"shortest_edge": 96}, "crop_pct": 0.9, "resample": 2,
                                                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})))
    want = PreprocessConfig(size=96, resize="shorter", crop_pct=0.9, mean=(0.5,) * 3, std=(0.25,) * 3,
                            interpolation="bilinear")
    cfg = load_checkpoint(folder).cfg
    assert cfg.img_size == 96 and cfg.preprocess == want
    assert load_checkpoint(folder, img_size=96).cfg.preprocess == want  # the same size asked for: nothing lost
    assert load_checkpoint(folder, img_size=128).cfg.preprocess == PreprocessConfig(
        size=128, resize="shorter", crop_pct=0.9, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")


# --- values from our own files: safetensors metadata, manifest, ONNX metadata -----------


@pytest.mark.parametrize("change, expected", [
    ({"preprocess": {"crop_pct": 0}}, "'preprocess.crop_pct' is 0"),
    ({"preprocess": {"interpolation": "sinc"}}, "'preprocess.interpolation' is 'sinc': must be one of bicubic"),
    ({"num_heads": [1, 3, 4]}, "width 32 is not divisible by 3 heads"),
    ({"qkv_projections": ["dw_bn", "dw_bn", "fancy"]}, "'fancy' is not a CvT projection"),
    ({"num_classes": "10"}, "'num_classes' is '10': must be an integer from 1"),
    ({"kv_strides": [2, 0, 2]}, "'kv_strides' is (2, 0, 2): every entry must be an integer from 1"),
    ({"embed_dims": None}, "'embed_dims' is None"),
])
def test_damaged_manifest_model_is_a_clean_error(bundle_copy, change, expected):
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            raw["model"][key].update(value)
        else:
            raw["model"][key] = value
    manifest.write_text(json.dumps(raw))
    rc, err = run("cvt-predict", ["--bundle", str(bundle_copy), str(DEMO_SAMPLES / "digit-1.png")])
    assert rc == 2
    assert f"{manifest} is damaged" in err and expected in err


@pytest.mark.parametrize("change, expected", [
    ({"precision": "fp8"}, "kind 'onnx' and precision 'fp8'"),
    ({"kind": "pickle"}, "kind 'pickle'"),
    ({"sha256": 12}, "sha256 12"),
    ({"parity": {"accuracy_candidate": "high"}}, "parity accuracy_candidate 'high', not a fraction"),
    ({"parity": [1]}, "parity [1], not an object"),
])
def test_damaged_manifest_artifact_is_a_clean_error(bundle_copy, change, expected):
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["artifacts"]["onnx-fp32"].update(change)
    manifest.write_text(json.dumps(raw))
    rc, err = run("cvt-bench", ["--bundle", str(bundle_copy), "--quick", "--quiet"])
    assert rc == 2
    assert f"{manifest} is damaged" in err and expected in err


@pytest.mark.parametrize("batch", [{"min": "1", "opt": 2, "max": 4}, {"min": True, "opt": 2, "max": 4}, [1, 2, 4]])
def test_damaged_manifest_batch_is_a_clean_error(bundle_copy, batch):
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["batch"] = batch
    manifest.write_text(json.dumps(raw))
    with pytest.raises(CvtDeployError, match="is damaged"):
        Bundle.open(bundle_copy)


def test_old_manifest_without_per_stage_fields_still_opens(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    raw = json.loads(manifest.read_text())
    model = raw["model"]
    for key in ("mlp_ratios", "patch_sizes", "patch_strides", "patch_paddings", "qkv_kernels", "q_strides",
                "q_paddings", "kv_strides", "kv_paddings", "qkv_bias", "cls_token", "qkv_projections"):
        model.pop(key)
    model["mlp_ratio"] = 4.0  # what older bundles wrote: one ratio for every stage
    manifest.write_text(json.dumps(raw))
    bundle = Bundle.open(bundle_copy)
    assert bundle.config == get_config("cvt-tiny", num_classes=10, labels=bundle.config.labels,
                                       preprocess=bundle.config.preprocess)


def test_damaged_safetensors_metadata(tmp_path):
    from safetensors.torch import load_file, save_file

    model = create_model("cvt-tiny", num_classes=3)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    state = load_file(str(path))
    meta = json.loads(model.cfg.to_json())
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"cvt_deploy.config": json.dumps({**meta, "activation": "swish",
                                                                           "in_chans": 0})})
    with pytest.raises(CvtDeployError, match="bad.safetensors \\(its cvt-deploy metadata\\): model config field 'in_chans'"):
        load_checkpoint(bad)
    save_file(state, str(bad), metadata={"cvt_deploy.config": "{not json"})
    with pytest.raises(CvtDeployError, match="is not valid JSON"):
        load_checkpoint(bad)
    save_file(state, str(bad), metadata={"cvt_deploy.config": json.dumps({**meta, "depths": [1, 2, 2]})})
    with pytest.raises(CvtDeployError, match="metadata disagrees with its own tensors: depths: config \\[1, 2, 2\\], "
                                             "weights \\[1, 2, 3\\]"):
        load_checkpoint(bad)


def test_damaged_onnx_metadata(demo_bundle, tmp_path):
    import onnx

    from cvt_deploy.runtimes.ort import OrtRuntime

    def damaged(key: str, change) -> Path:
        model = onnx.load(str(demo_bundle / "model.onnx"))
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = change(prop.value)
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        return path

    def zero_std(text: str) -> str:
        cfg = json.loads(text)
        cfg["preprocess"]["std"] = [0.2, 0.0, 0.2]
        return json.dumps(cfg)

    with pytest.raises(CvtDeployError, match="metadata_props cvt_deploy.config\\): model config field 'preprocess.std'"):
        OrtRuntime.from_onnx(damaged("cvt_deploy.config", zero_std))
    with pytest.raises(CvtDeployError, match="m.onnx says its precision is 'fp8'"):
        OrtRuntime.from_onnx(damaged("cvt_deploy.precision", lambda _: "fp8"))


# --- preprocessor_config.json read as transformers reads it ------------------------------------

PROCESSOR_FIELDS = [
    {"size": {"shortest_edge": 64}, "crop_pct": 0.875, "resample": 3,
     "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    {"size": {"shortest_edge": 64}, "do_normalize": False},
    {"size": {"shortest_edge": 64}, "do_rescale": False, "image_mean": [100, 110, 120], "image_std": [50, 60, 70]},
    {"size": {"shortest_edge": 64}, "rescale_factor": 0.5 / 255, "resample": 2},
    {"size": {"shortest_edge": 64}},  # mean/std unset: the processor's own 0.5 / 0.5
    {"size": {"shortest_edge": 384}, "image_processor_type": "ConvNextImageProcessor", "do_resize": True},
]


@pytest.mark.parametrize("fields", PROCESSOR_FIELDS, ids=lambda f: ",".join(sorted(f)))
def test_preprocessor_config_means_what_transformers_makes_of_it(hf_cvt_checkpoint, tmp_path, fields):
    """The inputs cvt-deploy makes from an image are the ones transformers' processor makes."""
    mod = pytest.importorskip("transformers.models.convnext.image_processing_pil_convnext")
    from PIL import Image

    from cvt_deploy.preprocess import preprocess

    folder = damaged_folder(tmp_path, hf_cvt_checkpoint("tiny", num_labels=10),
                            write("preprocessor_config.json", json.dumps(fields)))
    cfg = load_checkpoint(folder).cfg
    image = np.random.default_rng(0).integers(0, 256, (150, 110, 3), dtype=np.uint8)
    kwargs = {k: v for k, v in fields.items() if k != "image_processor_type"}
    ref = mod.ConvNextImageProcessorPil(**kwargs)(images=Image.fromarray(image), return_tensors="np")["pixel_values"]
    ours = preprocess(image, cfg.preprocess)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("fields, words", [
    ({"size": 64, "do_resize": False}, "do_resize false is not a preprocessing cvt-deploy can reproduce"),
    ({"size": 64, "do_center_crop": True, "crop_size": 48}, "do_center_crop true"),
    ({"size": 64, "do_pad": True}, "do_pad true"),
    ({"size": {"height": 64, "width": 96}}, "is not square"),
    ({"size": 64, "image_processor_type": "ViTImageProcessor"}, "image_processor_type 'ViTImageProcessor'"),
    ({"size": 64, "rescale_factor": 0}, "rescale_factor 0 is not a positive number"),
])
def test_preprocessor_fields_cvt_deploy_cannot_honour_are_refused(hf_cvt_checkpoint, tmp_path, fields, words):
    folder = damaged_folder(tmp_path, hf_cvt_checkpoint("tiny", num_labels=10),
                            write("preprocessor_config.json", json.dumps(fields)))
    rc, err = run("cvt-export", ["--weights", str(folder), "--out", str(tmp_path / "b"), "--no-check"])
    assert rc == 2 and "preprocessor_config.json" in err and words in err, err
    assert not (tmp_path / "b").exists()
