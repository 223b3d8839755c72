"""The bundled demo model and its data: a CvT-tiny trained on real handwritten digits.

``digits.npz`` holds scikit-learn's ``load_digits`` (UCI optical recognition of handwritten
digits, 1797 8x8 images) as uint8 images with a fixed train/test split and a calibration
subset of the training split. ``cvt-tiny-digits.safetensors`` is the model that
``scripts/train_demo.py`` trains from them. Torch-free: edge runtimes use this data too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CvtDeployError

DEMO_DIR = Path(__file__).parent
DEMO_WEIGHTS = DEMO_DIR / "cvt-tiny-digits.safetensors"
DEMO_DATA = DEMO_DIR / "digits.npz"
DEMO_SAMPLES = DEMO_DIR / "samples"  # one held-out PNG per class, for the demo and docs
SPLITS = ("train", "calib", "test")


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images (N, H, W[, C]) and integer labels (N,), with the label names."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> LabelledImages:
        return LabelledImages(self.images[:n], self.labels[:n], self.names)


def demo_split(split: str = "test") -> LabelledImages:
    """A split of the demo data set: 'train', 'calib' (subset of train) or 'test' (held out)."""
    if split not in SPLITS:
        raise CvtDeployError(f"unknown demo split {split!r}", f"use one of {', '.join(SPLITS)}")
    if not DEMO_DATA.is_file():
        raise CvtDeployError(f"the demo data {DEMO_DATA} is missing from this installation",
                             "reinstall cvt-deploy, or regenerate it with scripts/train_demo.py")
    with np.load(DEMO_DATA) as z:
        idx = z[f"{split}_idx"]
        return LabelledImages(z["images"][idx], z["labels"][idx], tuple(str(n) for n in z["names"]))
