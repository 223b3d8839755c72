"""Calibration data for int8 quantization: images in, a preprocessed NCHW float32 batch out.

Calibration must see what inference sees, so every source goes through the same
``preprocess`` with the model's own :class:`PreprocessConfig`. Sources:

* an image folder (searched recursively; a deterministic, evenly spread subset when it
  holds more than ``count`` images, so every class sub-folder is represented);
* a ``.npy`` file holding either a preprocessed float batch (N, 3, S, S) or uint8 images
  (N, H, W, C) / (N, H, W) to preprocess;
* ``None``: the demo's calibration split (256 real handwritten digits, a subset of the demo
  model's training split, disjoint from its held-out test split). For a model that is not
  the demo model these are still real images, but from another domain; the description
  says so, and a model meant for real use should be calibrated with ``--calib``.

Torch-free: numpy and PIL only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import CvtConfig
from .data import is_demo_model, spread_indices
from .errors import CvtDeployError
from .preprocess import find_images, preprocess, validate_batch

# 256 images: the size of the demo calibration split, and enough for the int8 ranges to
# settle. Measured on the demo model (minmax and percentile calibration, 1541 images
# compared with fp32): 32, 64, 128 and 256 calibration images all give 99.9-100% top-1
# agreement and mean logit cosine within 3e-5 of each other; the percentile method's tail
# estimate needs many values per tensor, which 256 images give with margin. Calibration
# time grows linearly with the count (one forward pass per 8 images), so much larger sets
# only cost time. TensorRT's guidance for ImageNet classifiers is of the same order (~500).
DEFAULT_CALIB_COUNT = 256
NPY_SUFFIX = ".npy"


def load_calibration(source: str | os.PathLike[str] | None, cfg: CvtConfig, count: int = DEFAULT_CALIB_COUNT,
                     *, progress: bool = True) -> tuple[np.ndarray, str]:
    """Up to ``count`` calibration images for a model with config ``cfg``.

    Returns ``(batch, description)``: an (N, 3, S, S) float32 batch preprocessed as for
    inference, and one line saying where it came from (recorded in the bundle manifest).
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise CvtDeployError(f"calibration count {count!r} is not a positive whole number",
                             f"pass a count of at least 1 (default {DEFAULT_CALIB_COUNT})")
    count = int(count)
    if source is None or str(source) == "":
        return _from_demo(cfg, count, progress)
    path = Path(source)
    if not path.exists():
        raise CvtDeployError(f"calibration source {str(path)!r} does not exist",
                             "pass a folder of images or a .npy file (or nothing, for the demo calibration images)")
    if path.is_dir():
        return _from_folder(path, cfg, count, progress)
    if path.suffix.lower() == NPY_SUFFIX:
        return _from_npy(path, cfg, count, progress)
    raise CvtDeployError(f"calibration source {path} is neither a folder nor a {NPY_SUFFIX} file",
                         "pass a folder of images (searched recursively) or a .npy array of images")


# --- sources ------------------------------------------------------------------------------

def _from_demo(cfg: CvtConfig, count: int, progress: bool) -> tuple[np.ndarray, str]:
    from .demo import demo_split

    data = demo_split("calib")
    images = data.images[:count]
    batch = _preprocess_images(list(images), cfg, progress)
    what = f"demo calibration split: {len(batch)} handwritten-digit images"
    if not is_demo_model(cfg):
        what += (f" (real images, but handwritten digits, not from this {cfg.variant} model's domain; "
                 f"calibrate with --calib on images like the ones it will see)")
        if progress:
            print(f"  note: no calibration images given; using the {what}", file=sys.stderr)
    return batch, what


def _from_folder(folder: Path, cfg: CvtConfig, count: int, progress: bool) -> tuple[np.ndarray, str]:
    try:
        files = find_images(folder)
    except CvtDeployError as e:
        raise CvtDeployError(f"calibration folder: {e.message}",
                             "put calibration images (JPEG, PNG, ...) in the folder, in any sub-folders") from None
    chosen = spread_indices(len(files), count)
    batch = _preprocess_images([files[i] for i in chosen], cfg, progress)
    subset = f"{len(chosen)} of {len(files)}" if len(chosen) < len(files) else f"{len(files)}"
    return batch, f"{subset} images from folder {folder}"


def _from_npy(path: Path, cfg: CvtConfig, count: int, progress: bool) -> tuple[np.ndarray, str]:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise CvtDeployError(f"cannot read {path} as a numpy .npy array ({type(e).__name__}: {str(e)[:200]})",
                             "save the images with numpy.save(path, array) (no pickled objects)") from None
    size = cfg.img_size
    shape = tuple(array.shape)
    if array.dtype.kind == "f":
        if array.ndim != 4 or shape[1:] != (cfg.in_chans, size, size) or shape[0] == 0:
            raise CvtDeployError(
                f"{path} holds a float array of shape {shape}; a preprocessed calibration batch must be "
                f"(N, {cfg.in_chans}, {size}, {size}) for this model",
                "save preprocessed images as NCHW float32 at the model's size, or raw images as uint8 NHWC/NHW")
        chosen = spread_indices(shape[0], count)
        batch = validate_batch(np.asarray(array[chosen], dtype=np.float32), cfg.preprocess)
        return batch, f"{len(batch)} preprocessed images from {path}"
    if array.dtype == np.uint8:
        layout_ok = (array.ndim == 3 and 0 not in shape) or (array.ndim == 4 and shape[3] in (1, 3, 4) and 0 not in shape)
        if not layout_ok:
            hint = (" (it looks like NCHW: transpose it with array.transpose(0, 2, 3, 1))"
                    if array.ndim == 4 and shape[1] in (1, 3, 4) else "")
            raise CvtDeployError(f"{path} holds uint8 images of shape {shape}; expected (N, H, W, C) with C in 1/3/4, "
                                 f"or (N, H, W){hint}",
                                 "save raw images as uint8 NHWC or NHW, or preprocessed ones as float32 NCHW")
        chosen = spread_indices(shape[0], count)
        batch = _preprocess_images([np.ascontiguousarray(array[i]) for i in chosen], cfg, progress)
        return batch, f"{len(batch)} images from {path}"
    raise CvtDeployError(f"{path} holds a {array.dtype} array of shape {shape}; calibration arrays are uint8 images "
                         f"(N, H, W[, C]) or preprocessed float32 (N, {cfg.in_chans}, {size}, {size})",
                         "convert it with .astype(np.uint8) (raw 0-255 pixels) or .astype(np.float32) (preprocessed)")


# --- helpers ------------------------------------------------------------------------------

def _preprocess_images(items: list[Any], cfg: CvtConfig, progress: bool) -> np.ndarray:
    from .progress import track

    if not items:
        raise CvtDeployError("no calibration images were found", "pass a folder or .npy file that holds images")
    rows = [preprocess(item, cfg.preprocess)
            for item in track(items, len(items), "  loading calibration images", progress and len(items) >= 64)]
    return np.concatenate(rows)
