"""Image preprocessing shared by every backend, in numpy and PIL only (no torch).

Matches the CvT evaluation transform (and Hugging Face's CvT image processor): 224 models
resize the shorter side to 256 (bicubic) and center-crop 224; 384 models resize to 384x384.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PreprocessConfig
from .errors import CvtDeployError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
Images = Union[ImageLike, Sequence[ImageLike]]
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}  # config.INTERPOLATIONS
_ORIENTATION = 0x0112  # the EXIF orientation tag
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@contextlib.contextmanager
def _opened(path: Path | io.BytesIO, what: str | None = None) -> Iterator[Image.Image]:
    """``Image.open`` with every failure (not an image, a decompression bomb) as our error."""
    what = what or str(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it: both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CvtDeployError(f"{what} is refused as a possible decompression bomb ({e})",
                             "downscale the image first, or raise PIL.Image.MAX_IMAGE_PIXELS in your own "
                             "code if you trust the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CvtDeployError(f"{what} is not a readable image ({type(e).__name__}: {e})",
                             "pass a JPEG, PNG or other image file PIL can open") from None


def check_image_header(path: str | os.PathLike[str]) -> None:
    """Fail now if ``path`` is not an image PIL can open (header only: no pixels decoded)."""
    path = Path(path)
    if not path.is_file():
        raise CvtDeployError(f"image {str(path)!r} does not exist", "check the path")
    with _opened(path) as im:
        if im.width == 0 or im.height == 0:
            raise CvtDeployError(f"{path} is empty ({im.width}x{im.height} pixels)", "pass an image with pixels")


def load_image(item: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, an encoded image file's bytes (PNG, JPEG...: a served
    request), a PIL image (any mode) or an HWC/HW array.

    How pixels are read, one rule for every source (documented in docs/predict.md):
    integer images are scaled by their type's full range (8-bit as is, 16-bit -- PIL modes
    I;16*, I, uint16 arrays -- by 255/65535), float images (mode F, float arrays) are taken
    as 0..1; both end as 8-bit RGB, what the models were trained on. The EXIF orientation
    is applied, so the model sees the photo the way viewers show it. Transparent pixels are
    composited on white. Empty images, values outside their type's range, and images with
    more pixels than PIL's decompression-bomb limit are refused.
    """
    if isinstance(item, bytes):  # files and bytes go through the same decoder
        what = f"{len(item)} bytes" + (f" starting {item[:8]!r}" if item else "")
        with _opened(io.BytesIO(item), what) as im:
            im.load()
            return _to_rgb(im, what)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise CvtDeployError(f"image {str(path)!r} does not exist", "check the path")
        with _opened(path) as im:
            im.load()
            return _to_rgb(im, str(path))
    if isinstance(item, Image.Image):
        return _to_rgb(item, "the PIL image")
    if isinstance(item, np.ndarray):
        return _to_rgb(Image.fromarray(_array_to_uint8(item)), "the image array")
    raise CvtDeployError(f"cannot read an image from a {type(item).__name__}",
                         "pass a file path, a PIL image, or a uint8 HWC numpy array")


def _array_to_uint8(item: np.ndarray) -> np.ndarray:
    if item.ndim == 3 and item.shape[0] in (1, 3) and item.shape[2] not in (1, 3, 4) and item.dtype.kind == "f":
        raise CvtDeployError(f"the float array of shape {item.shape} looks like one preprocessed CHW image, "
                             "not an HWC image", "add the batch dimension (x[None]) to pass it as a preprocessed NCHW batch")
    if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))):
        raise CvtDeployError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {item.shape}",
                             "pass one image per array, channels last")
    if item.size == 0:
        raise CvtDeployError(f"the image array is empty (shape {item.shape})", "pass an image with pixels")
    item = item.squeeze(2) if item.ndim == 3 and item.shape[2] == 1 else item
    if item.dtype == np.uint8:
        return item
    if item.dtype == np.uint16:
        return _scaled(item.astype(np.float64), 65535.0, "the uint16 image array")
    if item.dtype.kind == "f":
        return _scaled(item.astype(np.float64), 1.0, f"the {item.dtype} image array")
    raise CvtDeployError(f"an image array must be uint8, uint16 or float (0..1), got dtype {item.dtype} shape {item.shape}",
                         "convert it to uint8 (0..255), or pass a preprocessed float32 NCHW batch")


def _scaled(arr: np.ndarray, full: float, what: str) -> np.ndarray:
    """0..full -> 0..255 uint8 (rounded); values outside 0..full are refused, not clipped."""
    if not np.isfinite(arr).all():
        raise CvtDeployError(f"{what} holds NaN or infinite values", "pass an image with finite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > full:
        kind = "float images are read as 0..1" if full == 1.0 else f"its values are read as 0..{full:g}"
        raise CvtDeployError(f"{what} holds values from {lo:g} to {hi:g}, but {kind}",
                             "rescale it to that range, or save it as an 8-bit image")
    return np.rint(arr * (255.0 / full)).astype(np.uint8)


def _to_rgb(im: Image.Image, what: str) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise CvtDeployError(f"{what} is empty ({im.width}x{im.height} pixels)", "pass an image with pixels")
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(_scaled(np.asarray(im, dtype=np.float64), 65535.0, f"{what} (mode {im.mode})")).convert("RGB")
    if im.mode == "F":
        return Image.fromarray(_scaled(np.asarray(im, dtype=np.float64), 1.0, f"{what} (mode F)")).convert("RGB")
    if im.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these to straight alpha only
        im = im.convert("LA" if im.mode == "La" else "RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on white like a viewer would, instead of dropping alpha to black fill.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise CvtDeployError(f"{what} has PIL mode {im.mode}, which cannot be converted to RGB ({e})",
                             "save it as an 8-bit RGB or grayscale image") from None


def resize_crop(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One RGB image -> (size, size, channels) uint8 pixels: the model's resize and crop
    (grayscale when the model takes one channel)."""
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
    return np.asarray(im, dtype=np.uint8).reshape(size, size, cfg.channels)


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N, H, W, C) uint8 pixels -> (N, C, H, W) float32, scaled to 0..1 and normalised."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def transform(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One RGB image -> CHW float32, normalised (grayscale when the model takes one channel)."""
    return normalize(resize_crop(im, cfg)[None], cfg)[0]


def preprocess_pixels(images: Images | Any, cfg: PreprocessConfig) -> np.ndarray:
    """Paths, PIL images, image arrays (one, a list, or an NHWC uint8/uint16 batch) -> (N, size, size,
    channels) uint8 pixels after the model's resize and crop: what a raw-pixel graph takes."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if len(images) == 0:
            raise CvtDeployError("the image batch is empty (0 images)", "pass at least one image")
        if images.dtype not in (np.uint8, np.uint16):  # NHWC images, not a preprocessed batch
            raise CvtDeployError(f"an image batch must be uint8 or uint16 NHWC, got dtype {images.dtype}",
                                 "pass images, or a preprocessed float32 NCHW batch to preprocess()")
        return np.stack([resize_crop(load_image(x), cfg) for x in images])
    items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise CvtDeployError("no images were given", "pass at least one image path, PIL image or array")
    return np.stack([resize_crop(load_image(x), cfg) for x in items])


def preprocess(images: Images | Any, cfg: PreprocessConfig) -> np.ndarray:
    """Paths, PIL images, uint8 arrays (one, a list, or an NHWC uint8 batch) -> NCHW float32.

    A float32 NCHW array is taken as already preprocessed and only validated. Images of
    different sizes and modes (grayscale, RGBA) can be mixed in one call.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype not in (np.uint8, np.uint16) and len(images):
        return validate_batch(images, cfg)
    return normalize(preprocess_pixels(images, cfg), cfg)


def pixels_from_batch(batch: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Undo :func:`normalize`: a float NCHW batch made from 8-bit pixels -> those NHWC uint8 pixels.

    Exact for batches :func:`preprocess` made; a batch that is not made of 8-bit pixels is
    refused rather than silently rounded (a raw-pixel graph cannot take it).
    """
    batch = validate_batch(batch, cfg)
    std, mean = np.asarray(cfg.std, np.float64), np.asarray(cfg.mean, np.float64)
    p = (batch.transpose(0, 2, 3, 1).astype(np.float64) * std + mean) * 255.0
    q = np.rint(p)
    worst = float(np.abs(p - q).max())
    if worst > 0.05 or q.min() < 0 or q.max() > 255:
        raise CvtDeployError(f"this graph takes 8-bit pixels, but the float batch is not made of them (values up to "
                             f"{worst:.2f} off a pixel level, range {p.min():.1f}..{p.max():.1f})",
                             "pass images (paths, PIL, uint8 arrays) instead of a float batch, or use a float-input bundle")
    return q.astype(np.uint8)


def graph_dims(cfg: PreprocessConfig, input_format: str) -> tuple[int, int, int]:
    """One image's input dimensions in a graph of ``input_format``: (H, W, C) for NHWC, else (C, H, W)."""
    if input_format == "uint8-nhwc":
        return cfg.size, cfg.size, cfg.channels
    return cfg.channels, cfg.size, cfg.size


def graph_input(batch: np.ndarray, cfg: PreprocessConfig, input_format: str) -> np.ndarray:
    """What a graph of ``input_format`` takes (see ``util.INPUT_FORMATS``) from a preprocessed
    float32 NCHW batch or from (N, size, size, channels) uint8 pixels at the model's size."""
    if batch.dtype == np.uint8:
        expected = (cfg.size, cfg.size, cfg.channels)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise CvtDeployError(f"a pixel batch has shape {tuple(batch.shape)}; the model takes (N, "
                                 f"{', '.join(map(str, expected))}) uint8 pixels at its input size",
                                 "use predict() with images of any size: it resizes and crops them")
        pixels = batch
    elif input_format == "float":
        return batch
    else:
        pixels = pixels_from_batch(batch, cfg)
    if input_format == "float":
        return normalize(pixels, cfg)
    if input_format == "uint8-nhwc":
        return np.ascontiguousarray(pixels)
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    return nchw.astype(np.float32) if input_format == "float-pixels" else nchw


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
    check_normalised(batch, cfg)
    return np.ascontiguousarray(batch)


def check_normalised(batch: np.ndarray, cfg: PreprocessConfig) -> None:
    """Refuse a float NCHW batch far outside what normalised images hold, as a float image
    outside 0..1 is refused: a batch of 0..255 pixels, say, that was never normalised, would
    give confident nonsense. Pixels 0..1 normalised lie in (0 - mean) / std .. (1 - mean) / std
    per channel; a pixel's full range either side of that is allowed (other normalisations,
    augmentation), values beyond it are not an image this model was made for."""
    if not len(batch) or batch.ndim != 4 or batch.shape[1] != len(cfg.mean):
        return
    mean, std = np.asarray(cfg.mean, np.float64), np.asarray(cfg.std, np.float64)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    width = 1 / std
    got_lo = batch.min(axis=(0, 2, 3)).astype(np.float64)
    got_hi = batch.max(axis=(0, 2, 3)).astype(np.float64)
    if (got_lo < lo - width).any() or (got_hi > hi + width).any():
        raise CvtDeployError(
            f"the float batch holds values from {got_lo.min():.4g} to {got_hi.max():.4g}, far outside what this model's "
            f"normalised images hold ({lo.min():.3g}..{hi.max():.3g}: pixels 0..1, mean {list(cfg.mean)}, std {list(cfg.std)})"
            + (": it looks like pixels 0..255 that were never normalised" if got_hi.max() > 20 else ""),
            "pass the images themselves (paths, PIL, uint8 arrays) and let preprocessing normalise them, or "
            "normalise the batch: (pixels / 255 - mean) / std")


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
