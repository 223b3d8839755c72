"""Checkpoint loading and saving: parity with Hugging Face, official keys, our format, bad files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvt_deploy.checkpoints import hf_to_official, load_checkpoint, save_checkpoint  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.model import create_model  # noqa: E402

TOL = 1e-4


def batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(ck, x: torch.Tensor) -> torch.Tensor:
    return ck.model(pixel_values=x).logits


@torch.no_grad()
def max_diff(model, x: torch.Tensor, ref: torch.Tensor) -> float:
    out = model(x)
    assert out.shape == ref.shape
    return (out - ref).abs().max().item()


def official_pth(ck, path: Path) -> Path:
    """The HF checkpoint's tensors under official microsoft/CvT names, as a .pth."""
    state = hf_to_official(ck.model.state_dict())
    torch.save(state, path)
    return path


# --- parity with Hugging Face ---------------------------------------------------------


def test_hf_folder_tiny_matches_transformers(hf_cvt_checkpoint):
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    model = load_checkpoint(ck.folder)  # activation defaults to gelu for HF folders
    assert model.cfg.variant == "cvt-tiny"
    assert model.cfg.activation == "gelu"
    assert model.cfg.num_classes == 10
    assert model.cfg.labels == ck.labels
    assert not model.training
    x = batch(64, n=3)
    ref = hf_logits(ck, x)
    assert ref.std() > 0.1, "reference logits too uniform for a meaningful comparison"
    assert max_diff(model, x, ref) <= TOL
    # Control: the comparison is sensitive enough to see the wrong activation.
    wrong = load_checkpoint(ck.folder, activation="quick_gelu")
    assert max_diff(wrong, x, ref) > 10 * TOL


def test_hf_folder_tiny_other_input_size(hf_cvt_checkpoint):
    """No position embedding: the same weights run at 96x96 and still match HF."""
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    model = load_checkpoint(ck.folder, img_size=96)
    assert model.cfg.img_size == 96
    x = batch(96, n=1, seed=3)
    assert max_diff(model, x, hf_logits(ck, x)) <= TOL


@pytest.mark.slow
def test_hf_folder_cvt13_matches_transformers(hf_cvt_checkpoint, tmp_path):
    ck = hf_cvt_checkpoint("cvt-13", num_labels=1000)
    model = load_checkpoint(ck.folder, activation="gelu")
    assert model.cfg.variant == "cvt-13"
    assert model.cfg.num_classes == 1000
    assert model.cfg.labels == ck.labels
    x = batch(224, n=2, seed=1)
    ref = hf_logits(ck, x)
    assert max_diff(model, x, ref) <= TOL
    # The same tensors under official names, as a .pth: must match too.
    official = load_checkpoint(official_pth(ck, tmp_path / "cvt13.pth"), activation="gelu")
    assert official.cfg.variant == "cvt-13"
    assert official.cfg.activation == "gelu"
    assert max_diff(official, x, ref) <= TOL


def test_official_pth_tiny_matches_transformers(hf_cvt_checkpoint, tmp_path):
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    path = official_pth(ck, tmp_path / "tiny.pth")
    model = load_checkpoint(path, activation="gelu")
    assert model.cfg.variant == "cvt-tiny"
    assert model.cfg.num_classes == 10
    x = batch(64, seed=2)
    assert max_diff(model, x, hf_logits(ck, x)) <= TOL
    # Official checkpoints default to QuickGELU (what the released weights were trained with).
    assert load_checkpoint(path).cfg.activation == "quick_gelu"


def test_hf_to_official_names_every_key_of_our_model(hf_cvt_checkpoint):
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    renamed = hf_to_official(ck.model.state_dict())
    ours = create_model("cvt-tiny", num_classes=10).state_dict()
    assert set(renamed) == set(ours)
    for key, value in renamed.items():
        assert tuple(value.shape) == tuple(ours[key].shape), key


def test_hf_folder_with_pytorch_model_bin(hf_cvt_checkpoint):
    ck = hf_cvt_checkpoint("tiny", num_labels=7, bin=True)
    assert (ck.folder / "pytorch_model.bin").is_file()
    assert not (ck.folder / "model.safetensors").exists()
    model = load_checkpoint(ck.folder)
    assert model.cfg.labels == tuple(f"class_{i}" for i in range(7))
    assert model.cfg.label(6) == "class_6"
    x = batch(64, seed=4)
    assert max_diff(model, x, hf_logits(ck, x)) <= TOL


def test_official_filename_sets_image_size(hf_cvt_checkpoint, tmp_path):
    """Official files are named e.g. CvT-13-384x384-IN-22k.pth: the 384 is read from the name."""
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    model = load_checkpoint(official_pth(ck, tmp_path / "CvT-tiny-384x384-IN-22k.pth"))
    assert model.cfg.img_size == 384
    assert model.cfg.preprocess.size == 384
    assert model.cfg.preprocess.resize == "squash"


def test_training_wrapper_and_module_prefix_are_unwrapped(hf_cvt_checkpoint, tmp_path):
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    state = {f"module.{k}": v for k, v in hf_to_official(ck.model.state_dict()).items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    model = load_checkpoint(tmp_path / "wrapped.pth", activation="gelu")
    x = batch(64, n=1, seed=5)
    assert max_diff(model, x, hf_logits(ck, x)) <= TOL


# --- our own format -------------------------------------------------------------------


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(0)
    labels = [f"thing {i}" for i in range(5)]
    model = create_model("cvt-tiny", num_classes=5, img_size=96, activation="gelu", labels=tuple(labels))
    path = save_checkpoint(model, tmp_path / "sub" / "x.safetensors")
    assert path == tmp_path / "sub" / "x.safetensors" and path.is_file()
    assert not list(path.parent.glob("*.tmp")), "temporary file left behind"
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    assert loaded.cfg.variant == "cvt-tiny"
    assert loaded.cfg.labels == tuple(labels)
    assert loaded.cfg.img_size == 96
    assert loaded.cfg.preprocess == model.cfg.preprocess
    assert loaded.cfg.activation == "gelu"
    x = batch(96, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_own_format_rejects_other_suffix(tmp_path):
    with pytest.raises(CvtDeployError, match=r"\.safetensors"):
        save_checkpoint(create_model("cvt-tiny"), tmp_path / "x.pth")


def test_demo_checkpoint_accuracy():
    from cvt_deploy.demo import DEMO_WEIGHTS, demo_split
    from cvt_deploy.preprocess import preprocess

    model = load_checkpoint(DEMO_WEIGHTS)
    test = demo_split("test")
    assert model.cfg.variant == "cvt-tiny"
    assert model.cfg.num_classes == len(test.names) == 10
    assert model.cfg.labels == test.names
    x = torch.from_numpy(preprocess(list(test.images), model.cfg.preprocess))
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    accuracy = float((pred == test.labels).mean())
    assert len(test) >= 100
    assert accuracy >= 0.97, accuracy


# --- wrong checkpoints ------------------------------------------------------------------


def test_wrong_variant_official_pth(tmp_path):
    torch.save(create_model("cvt-tiny").state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(tmp_path / "tiny.pth", variant="cvt-13")
    msg = str(e.value)
    assert "not a cvt-13" in msg
    assert "(16, 32, 64)" in msg  # what it has
    assert "cvt-tiny" in msg  # what it looks like


@pytest.mark.slow
def test_wrong_variant_hf_folder(hf_cvt_checkpoint):
    ck = hf_cvt_checkpoint("cvt-13", num_labels=1000)
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(ck.folder, variant="cvt-21")
    msg = str(e.value)
    assert "cvt-21" in msg
    assert "looks like cvt-13" in msg
    assert "depths: (1, 2, 10) vs (1, 4, 16)" in msg  # what it has, what cvt-21 has


@pytest.mark.slow
def test_wrong_variant_own_format_same_widths(tmp_path):
    path = save_checkpoint(create_model("cvt-13", num_classes=10), tmp_path / "c13.safetensors")
    with pytest.raises(CvtDeployError, match="cvt-13"):
        load_checkpoint(path, variant="cvt-21")


def test_wrong_variant_own_format(tmp_path):
    path = save_checkpoint(create_model("cvt-tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(CvtDeployError, match="is not a cvt-13") as e:
        load_checkpoint(path, variant="cvt-13")
    assert "looks like cvt-tiny" in str(e.value)


def test_missing_key_is_listed(tmp_path):
    state = create_model("cvt-tiny").state_dict()
    del state["stage1.blocks.1.attn.proj_k.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(tmp_path / "missing.pth")
    msg = str(e.value)
    assert "missing from the checkpoint (1)" in msg
    assert "stage1.blocks.1.attn.proj_k.weight" in msg


def test_misshaped_and_unexpected_keys_are_listed(tmp_path):
    state = create_model("cvt-tiny").state_dict()
    state["stage2.blocks.1.mlp.fc1.weight"] = torch.zeros(10, 64)
    state["stage0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "stage2.blocks.1.mlp.fc1.weight: (10, 64) vs (256, 64)" in msg
    assert "not in the model" in msg and "stage0.extra.weight" in msg


def test_not_a_cvt_state_dict(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CvtDeployError, match="does not look like a CvT checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_truncated_safetensors(tmp_path):
    full = save_checkpoint(create_model("cvt-tiny"), tmp_path / "full.safetensors").read_bytes()
    for n in (len(full) // 2, 5):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(full[:n])
        with pytest.raises(CvtDeployError, match="truncated or corrupt"):
            load_checkpoint(bad)


def test_truncated_pth(tmp_path):
    torch.save(create_model("cvt-tiny").state_dict(), tmp_path / "full.pth")
    bad = tmp_path / "cut.pth"
    bad.write_bytes((tmp_path / "full.pth").read_bytes()[:10_000])
    with pytest.raises(CvtDeployError, match="truncated or corrupt"):
        load_checkpoint(bad)


class _Evil:
    """Unpickling this runs a shell command (creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    state = create_model("cvt-tiny").state_dict()
    state["x"] = _Evil(marker)
    torch.save(state, path)
    with pytest.raises(CvtDeployError) as e:
        load_checkpoint(path)
    assert "refused" in str(e.value)
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    # Control: the file really is malicious when unpickled without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_paths(tmp_path):
    with pytest.raises(CvtDeployError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CvtDeployError, match="without config.json"):
        load_checkpoint(tmp_path)


def test_hf_folder_problems(tmp_path, hf_cvt_checkpoint):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(CvtDeployError, match="'vit' model, not a CvT"):
        load_checkpoint(tmp_path)
    ck = hf_cvt_checkpoint("tiny", num_labels=10)
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((ck.folder / "config.json").read_text())
    with pytest.raises(CvtDeployError, match="no model.safetensors or pytorch_model.bin"):
        load_checkpoint(only_config)


def test_labels_override_and_bad_label_count(tmp_path):
    path = save_checkpoint(create_model("cvt-tiny", num_classes=3), tmp_path / "t.safetensors")
    assert load_checkpoint(path, labels=["a", "b", "c"]).cfg.labels == ("a", "b", "c")
    with pytest.raises(CvtDeployError, match="2 labels given for a model with 3 classes"):
        load_checkpoint(path, labels=["a", "b"])


def test_load_report_is_readable_and_truncated():
    from cvt_deploy.checkpoints import LoadReport

    report = LoadReport(missing=[f"k{i}" for i in range(20)], unexpected=[], mismatched=[])
    text = str(report)
    assert not report
    assert "missing from the checkpoint (20):" in text
    assert "k0" in text and "... and 8 more" in text
    assert bool(LoadReport([], [], [])) and str(LoadReport([], [], [])) == "all keys match"


def test_state_is_numerically_identical_after_official_round_trip(tmp_path, randomize_weights):
    """save state_dict as .pth -> load: every tensor equal (BN buffers included)."""
    torch.manual_seed(5)
    src = create_model("cvt-tiny")
    randomize_weights(src, seed=5)
    torch.save(src.state_dict(), tmp_path / "ours.pth")
    loaded = load_checkpoint(tmp_path / "ours.pth")
    assert loaded.cfg == src.cfg
    got = loaded.state_dict()
    for key, value in src.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), key
    x = batch(64, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))
