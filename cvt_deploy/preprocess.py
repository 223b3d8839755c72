"""Image preprocessing shared by every backend, in numpy and PIL only (no torch).

Matches the CvT evaluation transform (and Hugging Face's CvT image processor): 224 models
resize the shorter side to 256 (bicubic) and center-crop 224; 384 models resize to 384x384.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import PreprocessConfig
from .errors import CvtDeployError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
Images = Union[ImageLike, Sequence[ImageLike]]
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}  # config.INTERPOLATIONS
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image(item: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, an encoded image file's bytes (PNG, JPEG...), a PIL image
    (any mode) or an HWC/HW uint8 array."""
    if isinstance(item, (str, os.PathLike, bytes)):
        # Files and bytes (e.g. a served request) go through the same decoder.
        if isinstance(item, bytes):
            source: Any = io.BytesIO(item)
            what = f"{len(item)} bytes" + (f" starting {item[:8]!r}" if item else "")
        else:
            source = path = Path(item)
            what = str(path)
            if not path.is_file():
                raise CvtDeployError(f"image {what!r} does not exist", "check the path")
        try:
            with Image.open(source) as im:
                im.load()
                return _to_rgb(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise CvtDeployError(f"{what} is not a readable image ({type(e).__name__}: {e})",
                                 "pass a JPEG, PNG or other image file PIL can open") from None
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise CvtDeployError(f"an image array must be uint8 HWC, got dtype {item.dtype} shape {item.shape}",
                                 "convert with (x * 255).clip(0, 255).astype(np.uint8), or pass a preprocessed float32 NCHW batch")
        if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4)):
            return _to_rgb(Image.fromarray(item.squeeze(2) if item.ndim == 3 and item.shape[2] == 1 else item))
        raise CvtDeployError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {item.shape}",
                             "pass one image per array, channels last")
    raise CvtDeployError(f"cannot read an image from a {type(item).__name__}",
                         "pass a file path, a PIL image, or a uint8 HWC numpy array")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on white like a viewer would, instead of dropping alpha to black fill.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = 255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def transform(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One RGB image -> CHW float32, normalised (grayscale when the model takes one channel)."""
    resample = RESAMPLE[cfg.interpolation]
    size = cfg.size
    if cfg.resize == "squash":
        im = im.resize((size, size), resample)
    else:
        short = int(size / cfg.crop_pct)
        w, h = im.size
        # Same rounding as the reference processors: the long side is truncated.
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    if cfg.channels == 1:  # a grayscale model
        im = im.convert("L")
    x = np.asarray(im, dtype=np.float32).reshape(size, size, cfg.channels) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(images: Images | Any, cfg: PreprocessConfig) -> np.ndarray:
    """Paths, PIL images, uint8 arrays (one, a list, or an NHWC uint8 batch) -> NCHW float32.

    A float32 NCHW array is taken as already preprocessed and only validated. Images of
    different sizes and modes (grayscale, RGBA) can be mixed in one call.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if len(images) == 0:
            raise CvtDeployError("the image batch is empty (0 images)", "pass at least one image")
        if images.dtype == np.uint8:
            return np.stack([transform(load_image(x), cfg) for x in images])
        return validate_batch(images, cfg)
    items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise CvtDeployError("no images were given", "pass at least one image path, PIL image or array")
    return np.stack([transform(load_image(x), cfg) for x in items])


def validate_batch(batch: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Check a preprocessed batch: float32, (N, channels, size, size), finite."""
    expected = (cfg.channels, cfg.size, cfg.size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise CvtDeployError(f"input batch has shape {tuple(batch.shape)}, the model takes (N, {', '.join(map(str, expected))})",
                             "pass images (paths, PIL, uint8 arrays) and let preprocessing resize them, or fix the batch shape")
    if batch.dtype != np.float32:
        if batch.dtype.kind != "f":
            raise CvtDeployError(f"input batch has dtype {batch.dtype}; preprocessed batches are float32",
                                 "pass uint8 images as NHWC, or convert the NCHW batch with .astype(np.float32)")
        batch = batch.astype(np.float32)
    if not np.isfinite(batch).all():
        bad = int((~np.isfinite(batch)).reshape(len(batch), -1).any(axis=1).sum())
        raise CvtDeployError(f"input batch has NaN or infinite values in {bad} of {len(batch)} images",
                             "check how the batch was made; predictions on NaN input are meaningless")
    return np.ascontiguousarray(batch)


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files below ``folder``, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise CvtDeployError(f"{root} is not a folder", "pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CvtDeployError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}",
                             "point at a folder that holds image files")
    return files
