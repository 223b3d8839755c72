"""Preprocessing: parity with the Hugging Face image processor, input kinds, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvt_deploy.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cvt_deploy.errors import CvtDeployError
from cvt_deploy.preprocess import find_images, load_image, preprocess

skdata = pytest.importorskip("skimage.data")

MEAN = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
STD = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
CFG = PreprocessConfig.for_size(224)


def photos() -> dict[str, np.ndarray]:
    cat = skdata.chelsea()  # 300x451, landscape
    return {"chelsea": cat, "coffee": skdata.coffee(), "astronaut": skdata.astronaut(),
            "chelsea_portrait": np.ascontiguousarray(cat.transpose(1, 0, 2))}


def denormalize(x: np.ndarray) -> np.ndarray:
    """CHW normalised -> CHW in [0, 255]."""
    return (x * STD + MEAN) * 255.0


@pytest.fixture(scope="module")
def hf_processor():
    mod = pytest.importorskip("transformers.models.convnext.image_processing_pil_convnext")

    def make(size: int):
        # What microsoft/cvt-13's preprocessor_config.json says: ImageNet mean/std, bicubic
        # (resample=3), crop_pct 0.875 below 384. The class's own default mean/std is 0.5.
        return mod.ConvNextImageProcessorPil(size={"shortest_edge": size}, image_mean=list(IMAGENET_MEAN),
                                             image_std=list(IMAGENET_STD), resample=3, crop_pct=224 / 256)
    return make


# --- parity with Hugging Face -------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 384])
def test_matches_hf_image_processor(hf_processor, size):
    processor = hf_processor(size)
    cfg = PreprocessConfig.for_size(size)
    for name, img in photos().items():
        ref = processor(images=Image.fromarray(img), return_tensors="np")["pixel_values"]
        ours = preprocess(img, cfg)
        assert ours.shape == ref.shape == (1, 3, size, size), name
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=name)


def test_resize_policies_differ_as_documented():
    """224: shorter side to 256 then center crop (aspect kept); 384: squashed, no crop."""
    img = photos()["coffee"]  # 400x600
    assert CFG.resize == "shorter" and int(CFG.size / CFG.crop_pct) == 256
    manual = Image.fromarray(img).resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240))
    expected = (np.asarray(manual, np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(preprocess(img, CFG)[0], expected, atol=1e-5)
    squashed = Image.fromarray(img).resize((384, 384), Image.Resampling.BICUBIC)
    expected = (np.asarray(squashed, np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(preprocess(img, PreprocessConfig.for_size(384))[0], expected, atol=1e-5)


def test_normalisation_values():
    img = np.empty((300, 260, 3), np.uint8)
    img[...] = (255, 128, 0)
    x = preprocess(img, CFG)[0]
    expected = (np.array([255, 128, 0], np.float32) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 100, 100], expected, atol=1e-6)
    np.testing.assert_allclose(x.reshape(3, -1).std(axis=1), 0, atol=1e-6)  # constant stays constant


# --- input kinds ------------------------------------------------------------------------------


def test_paths_pil_arrays_lists_and_batches_agree(tmp_path):
    img = photos()["chelsea"]
    png = tmp_path / "cat.png"
    Image.fromarray(img).save(png)
    jpg = tmp_path / "cat.jpeg"
    Image.fromarray(img).save(jpg, quality=95)
    ref = preprocess(img, CFG)
    assert ref.shape == (1, 3, 224, 224) and ref.dtype == np.float32
    assert ref.flags["C_CONTIGUOUS"]
    for item in (str(png), png, Image.fromarray(img), [img]):
        out = preprocess(item, CFG)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, ref)
    from_jpeg = preprocess(jpg, CFG)
    assert from_jpeg.shape == ref.shape
    assert np.abs(from_jpeg - ref).mean() < 0.05  # lossy, but the same picture

    mixed = preprocess([png, Image.fromarray(img), img, str(jpg)], CFG)
    assert mixed.shape == (4, 3, 224, 224) and mixed.dtype == np.float32
    np.testing.assert_array_equal(mixed[:3], np.concatenate([ref] * 3))

    crops = np.stack([img[:256, :256], img[20:276, 100:356]])  # NHWC uint8 batch
    out = preprocess(crops, CFG)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], preprocess(crops[1], CFG)[0])
    assert not np.array_equal(out[0], out[1])


def test_preprocessed_batch_passes_through():
    x = preprocess([photos()["coffee"]], CFG)
    np.testing.assert_array_equal(preprocess(x, CFG), x)
    assert preprocess(x.astype(np.float64), CFG).dtype == np.float32


def test_mixed_sizes_in_one_batch():
    p = photos()
    out = preprocess([p["chelsea"], p["coffee"], p["astronaut"], p["chelsea_portrait"],
                      np.zeros((17, 5, 3), np.uint8)], CFG)
    assert out.shape == (5, 3, 224, 224)
    assert np.isfinite(out).all()


def _rgb_from(x: np.ndarray) -> np.ndarray:
    return np.rint(denormalize(x)).astype(int)


def test_grayscale_image_becomes_rgb(tmp_path):
    gray = skdata.camera()  # 512x512 uint8
    for item in (gray, gray[:, :, None], Image.fromarray(gray, "L")):
        x = preprocess(item, CFG)[0]
        assert x.shape == (3, 224, 224)
        rgb = _rgb_from(x)
        assert (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()
        assert rgb.std() > 10


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, 32:, 3] = 255  # ... opaque on the right half, fully transparent on the left
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    for item in (rgba, Image.fromarray(rgba, "RGBA"), path):
        x = preprocess(item, PreprocessConfig.for_size(384))[0]  # squash: no crop
        rgb = _rgb_from(x)
        assert tuple(rgb[:, 10, 10]) == (255, 255, 255)  # transparent -> white
        assert tuple(rgb[:, 10, 370]) == (255, 0, 0)  # opaque red stays red


def test_palette_images(tmp_path):
    img = Image.fromarray(photos()["astronaut"]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert img.mode == "P"
    ref = preprocess(img.convert("RGB"), CFG)
    np.testing.assert_array_equal(preprocess(img, CFG), ref)
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(preprocess(tmp_path / "p.png", CFG), ref)
    # Palette with a transparent index: that colour becomes white.
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (20, 0, 40, 40))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "t.png")
    rgb = _rgb_from(preprocess(tmp_path / "t.png", PreprocessConfig.for_size(384))[0])
    assert tuple(rgb[:, 5, 5]) == (255, 255, 255)
    assert tuple(rgb[:, 5, 380]) == (0, 255, 0)


def test_16_bit_images(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (200, 1))
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    path = tmp_path / "deep.png"
    img.save(path)
    with Image.open(path) as reread:
        assert reread.mode in ("I;16", "I")
    for item in (img, path):
        x = preprocess(item, CFG)[0]
        assert x.shape == (3, 224, 224)
        rgb = _rgb_from(x)
        assert (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()
        # The ramp survives: dark on the left, bright on the right, not clipped to white.
        assert rgb[0, 100, 0] < 60 and rgb[0, 100, -1] > 195
        assert np.all(np.diff(rgb[0, 100].astype(int)) >= -1)


def test_load_image_returns_rgb():
    for mode in ("L", "LA", "RGBA", "CMYK", "1", "I", "F", "YCbCr"):
        im = Image.new(mode, (10, 7))
        out = load_image(im)
        assert out.mode == "RGB" and out.size == (10, 7), mode


# --- bad input ----------------------------------------------------------------------------------


def test_not_an_image_file(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture\n")
    with pytest.raises(CvtDeployError) as e:
        preprocess(fake, CFG)
    assert "notes.jpg" in str(e.value) and "not a readable image" in str(e.value)


def test_truncated_image_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(photos()["coffee"]).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CvtDeployError, match="not a readable image"):
        preprocess(path, CFG)


def test_missing_image_path(tmp_path):
    with pytest.raises(CvtDeployError, match="does not exist"):
        preprocess(tmp_path / "nope.png", CFG)
    with pytest.raises(CvtDeployError, match="does not exist"):
        preprocess([photos()["coffee"], str(tmp_path / "nope.png")], CFG)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_image_array_of_another_dtype(dtype):
    with pytest.raises(CvtDeployError) as e:
        preprocess(np.zeros((32, 32, 3), dtype), CFG)
    assert "uint8" in str(e.value) and np.dtype(dtype).name in str(e.value)


def test_image_arrays_follow_the_one_scaling_rule():
    """uint16 is read as 0..65535 and float as 0..1, so the same scene in any dtype gives the
    same input; values outside the dtype's range are refused, never clipped."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    ref = preprocess(u8, CFG)
    for same in (u8.astype(np.uint16) * 257, u8.astype(np.float32) / 255, u8.astype(np.float64) / 255):
        np.testing.assert_array_equal(preprocess(same, CFG), ref)
    for bad, value in ((u8.astype(np.float32), "255"), (u8.astype(np.float32) / 255 - 0.5, "-0.5")):
        with pytest.raises(CvtDeployError, match=f"values from .*{value}.*read as 0..1"):
            preprocess(bad, CFG)
    with pytest.raises(CvtDeployError, match="NaN"):
        preprocess(np.full((8, 8), np.nan, np.float32), CFG)


def test_int_nchw_batch():
    with pytest.raises(CvtDeployError, match="dtype int32"):
        preprocess(np.zeros((2, 3, 224, 224), np.int32), CFG)


def test_bad_array_shapes():
    with pytest.raises(CvtDeployError, match=r"shape \(32, 32, 5\)"):
        preprocess(np.zeros((32, 32, 5), np.uint8), CFG)
    with pytest.raises(CvtDeployError, match="cannot read an image from a dict"):
        preprocess({"a": 1}, CFG)
    with pytest.raises(CvtDeployError, match="no images"):
        preprocess([], CFG)


def test_wrong_size_nchw_batch():
    with pytest.raises(CvtDeployError) as e:
        preprocess(np.zeros((2, 3, 256, 256), np.float32), CFG)
    assert "(2, 3, 256, 256)" in str(e.value) and "(N, 3, 224, 224)" in str(e.value)


def test_nan_in_batch():
    x = np.zeros((4, 3, 224, 224), np.float32)
    x[2, 1, 5, 5] = np.nan
    with pytest.raises(CvtDeployError) as e:
        preprocess(x, CFG)
    assert "NaN" in str(e.value) and "1 of 4" in str(e.value)


def test_empty_uint8_batch():
    with pytest.raises(CvtDeployError):
        preprocess(np.zeros((0, 32, 32, 3), np.uint8), CFG)


def test_find_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "sub/a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_images(tmp_path)] == ["b.png", "a.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvtDeployError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(CvtDeployError, match="not a folder"):
        find_images(tmp_path / "b.png")
