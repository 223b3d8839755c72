"""Labelled evaluation data for parity checks: the demo held-out split or an image folder.

An image folder holds one sub-folder per class, named as the model's labels (or by class
index, in the digits 0-9); images directly in the folder are used unlabelled (agreement only,
no accuracy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import CvtConfig, PreprocessConfig
from .demo import demo_split
from .errors import CvtDeployError
from .preprocess import check_image_header, find_images, preprocess
from .progress import track

DEFAULT_LIMIT = 512


CHUNK = 32  # images preprocessed and run at a time: folders of any size stream in bounded memory
# Up to this many bytes of preprocessed images are held for checks that run several runtimes in
# turn (EvalData.held): the default 512 images of CvT-13 at 224 px take 308 MB.
HOLD_BYTES = 512 << 20


@dataclass(frozen=True)
class EvalData:
    """Evaluation images, their labels (None when unknown) and where they came from.

    Either an in-memory preprocessed ``images`` batch (the demo split) or image ``files``
    read ``CHUNK`` at a time by :meth:`chunks`, so a folder of any size streams.
    """

    images: np.ndarray | None
    labels: np.ndarray | None
    description: str
    files: tuple[Path, ...] = ()
    preprocess: PreprocessConfig | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    def chunks(self, size: int = CHUNK) -> Iterator[np.ndarray]:
        """Preprocessed NCHW float32 batches of at most ``size`` images, in order."""
        for i in range(0, len(self), size):
            if self.images is not None:
                yield self.images[i:i + size]
            else:
                assert self.preprocess is not None
                yield preprocess([str(f) for f in self.files[i:i + size]], self.preprocess)

    def held(self, max_bytes: int | None = None, progress: bool = False) -> EvalData:
        """These images decoded once and held in memory where they take at most ``max_bytes``,
        so that several runtimes run them one after another without reading the files again;
        beyond that, ``self`` (streamed, read again on each pass: memory stays bounded)."""
        if self.images is not None or not self.files:
            return self
        assert self.preprocess is not None
        channels, size = len(self.preprocess.mean), self.preprocess.size
        if len(self) * channels * size * size * 4 > (HOLD_BYTES if max_bytes is None else max_bytes):
            return self
        count = (len(self) + CHUNK - 1) // CHUNK
        return EvalData(np.concatenate(list(track(self.chunks(), count, "  reading images", progress))), self.labels,
                        self.description)

    @property
    def batch(self) -> np.ndarray:
        """All images as one array (memory grows with the count: prefer :meth:`chunks`)."""
        return self.images if self.images is not None else np.concatenate(list(self.chunks()))


def spread_indices(available: int, count: int) -> np.ndarray:
    """``count`` indices evenly spread over ``available`` items (all of them when fewer)."""
    if available <= count:
        return np.arange(available)
    return np.unique(np.linspace(0, available - 1, count).round().astype(np.int64))


def is_demo_model(cfg: CvtConfig) -> bool:
    return cfg.labels is not None and tuple(cfg.labels) == demo_split("test").names


def check_limit(limit: int | None) -> None:
    """Refuse an image limit that is not a whole number >= 1 (None: the default)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CvtDeployError(f"the image limit {limit!r} must be a whole number >= 1",
                             f"omit --limit for the default ({DEFAULT_LIMIT})")


def load_eval_data(source: str | os.PathLike[str] | None, cfg: CvtConfig, limit: int | None = DEFAULT_LIMIT,
                   progress: bool = True) -> EvalData:
    """``source`` None: the demo model's held-out digits (labelled only for the demo model)."""
    check_limit(limit)
    if source is None:
        split = demo_split("test")
        if limit:
            split = split.head(limit)
        labelled = is_demo_model(cfg)
        what = "demo held-out digits" + ("" if labelled else " (not this model's classes: agreement only)")
        return EvalData(preprocess(list(split.images), cfg.preprocess), split.labels if labelled else None,
                        f"{what}, {len(split)} images")

    root = Path(source)
    if not root.is_dir():
        raise CvtDeployError(f"--data {str(source)!r} is not a folder", "pass an image folder with one sub-folder per class")
    files = find_images(root)
    if limit:
        # Evenly spaced over the sorted list, so every class folder is represented.
        files = [files[i] for i in spread_indices(len(files), limit)]
    labels = _folder_labels(root, files, cfg)
    # Headers only, now: a file that is no image (or a decompression bomb) fails before any
    # long work; pixels are decoded chunk by chunk when the check runs.
    for f in track(files, len(files), "checking images", progress and len(files) > 256):
        check_image_header(f)
    return EvalData(None, labels, f"{root} ({len(files)} images, {'labelled' if labels is not None else 'unlabelled'})",
                    tuple(files), cfg.preprocess)


def _folder_labels(root: Path, files: list[Path], cfg: CvtConfig) -> np.ndarray | None:
    classes = [f.parent.relative_to(root).parts[0] if f.parent != root else None for f in files]
    if all(c is None for c in classes):
        return None
    if any(c is None for c in classes):
        raise CvtDeployError(f"{root} mixes images in the top folder with class sub-folders",
                             "put every image in a sub-folder named after its class")
    index = {name: i for i, name in enumerate(cfg.labels or ())}
    out = []
    for c in classes:
        assert c is not None
        if c in index:
            out.append(index[c])
        # An index in the digits 0-9: str.isdigit also takes '¹', which int refuses, and '٣', which int reads as 3.
        elif c.isascii() and c.isdigit() and int(c) < cfg.num_classes:
            out.append(int(c))
        else:
            known = ", ".join(list(index)[:8]) + (" ..." if len(index) > 8 else "")
            raise CvtDeployError(f"class folder {c!r} in {root} is neither one of the model's labels nor a class index "
                                 f"below {cfg.num_classes}",
                                 f"name class folders by label ({known or 'the model has no labels'}) or by class index "
                                 "in the digits 0-9")
    return np.asarray(out, dtype=np.int64)
