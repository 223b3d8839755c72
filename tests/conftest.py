# Foundation fixtures
#
# Checkpoints made by the tests themselves (nothing can be downloaded here): Hugging Face
# CvtForImageClassification models with random weights, saved with save_pretrained.
# Other parts of the suite may append their own fixtures below this block.
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

# Widths / heads / depths of the tiny test architecture (cvt_deploy's "cvt-tiny").
TINY_HF_KW = {"embed_dim": [16, 32, 64], "num_heads": [1, 2, 4], "depth": [1, 2, 3]}


def randomize_weights_(model: Any, seed: int = 0) -> None:
    """Give a model weights under which every part of the computation shows (in place).

    Freshly initialised norms are identities (mean 0, var 1, weight 1, bias 0), which would
    let a port that drops or misplaces them pass a parity test; and HF's Linear init
    (std 0.02) keeps MLP inputs so small that GELU and QuickGELU agree to 1e-4. So: random
    BatchNorm statistics and affine params, random LayerNorm affine params, a random class
    token, and Linear weights with std 1/sqrt(fan_in) (activations of order 1).
    """
    import math

    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g) * std + mean).to(t.dtype)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(rnd(mod.running_mean, 0.0, 0.3))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.copy_(rnd(mod.weight, 1.0, 0.2))
                mod.bias.copy_(rnd(mod.bias, 0.0, 0.2))
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(rnd(mod.weight, 0.0, 1 / math.sqrt(mod.in_features)))
                if mod.bias is not None:
                    mod.bias.copy_(rnd(mod.bias, 0.0, 0.1))
        for name, p in model.named_parameters():
            if name.endswith("cls_token"):
                p.copy_(rnd(p, 0.0, 0.5))


@pytest.fixture(scope="session")
def randomize_weights() -> Callable[..., None]:
    """:func:`randomize_weights_` as a fixture, so test modules need not import conftest."""
    return randomize_weights_


@dataclass
class HFCheckpoint:
    folder: Path  # config.json + model.safetensors (or pytorch_model.bin)
    model: Any  # the transformers CvtForImageClassification it was saved from (eval mode)
    labels: tuple[str, ...]


@pytest.fixture(scope="session")
def hf_cvt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., HFCheckpoint]:
    """Factory ``(arch="tiny"|"cvt-13", num_labels=10, bin=False) -> HFCheckpoint``, cached.

    ``arch="cvt-13"`` uses transformers.CvtConfig defaults (the CvT-13 architecture).
    ``bin=True`` stores the weights as ``pytorch_model.bin`` instead of safetensors.
    Labels are ``("class_0", ...)`` so that reading id2label is observable.
    """
    cache: dict[tuple[Any, ...], HFCheckpoint] = {}

    def make(arch: str = "tiny", num_labels: int = 10, bin: bool = False) -> HFCheckpoint:
        key = (arch, num_labels, bin)
        if key in cache:
            return cache[key]
        import torch
        import transformers

        arch_kw = TINY_HF_KW if arch == "tiny" else {}
        if arch not in ("tiny", "cvt-13"):
            raise ValueError(arch)
        labels = tuple(f"class_{i}" for i in range(num_labels))
        config = transformers.CvtConfig(
            **arch_kw,
            num_labels=num_labels,
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        torch.manual_seed(1234 + num_labels)
        model = transformers.CvtForImageClassification(config).eval()
        randomize_weights_(model, seed=num_labels)
        folder = tmp_path_factory.mktemp(f"hf-{arch}-{num_labels}{'-bin' if bin else ''}")
        model.save_pretrained(folder)
        if bin:
            # transformers 5 has no safe_serialization=False: write the legacy file by hand.
            from safetensors.torch import load_file

            st = folder / "model.safetensors"
            torch.save(load_file(str(st)), folder / "pytorch_model.bin")
            st.unlink()
        cache[key] = HFCheckpoint(folder, model, labels)
        return cache[key]

    return make
