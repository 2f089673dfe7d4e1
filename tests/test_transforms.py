"""cnnkit.transforms: decoding images the same way everywhere, and the train/eval pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.config import PreprocessConfig
from cnnkit.data.transforms import (
    CenterCrop,
    NormalizedTensor,
    build_transforms,
    is_image_file,
    load_image,
    resolve_preprocess,
)
from cnnkit.errors import ImageError

from helpers import colour_image, write_corrupt_files

SMALL = PreprocessConfig(image_size=32, resize_size=36)


@pytest.fixture
def rgb_file(tmp_path):
    path = tmp_path / "red.png"
    colour_image("red", np.random.default_rng(0), size=(50, 40)).save(path)
    return path


# --- pipelines ------------------------------------------------------------------------------


def test_eval_pipeline_is_deterministic_and_crops_to_image_size(rgb_file):
    pipeline = build_transforms(SMALL, train=False)
    image = load_image(rgb_file)
    first, second = pipeline(image), pipeline(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)


def test_eval_pipeline_normalises_with_the_configured_mean_and_std():
    cfg = PreprocessConfig(image_size=16, resize_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = Image.new("RGB", (20, 20), (255, 0, 51))
    tensor = build_transforms(cfg, train=False)(image)
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.0) / 1.0])
    assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_eval_pipeline_is_torchvisions_resize_center_crop_to_tensor_normalize_value_for_value(interpolation):
    """Built without torchvision (scoring an export must not import it), the eval pipeline gives
    torchvision's tensors exactly: portrait, landscape, odd and even margins, images already at
    the resize size, and images smaller than the crop (padded the way torchvision pads)."""
    from torchvision import transforms as T

    cfg = PreprocessConfig(image_size=24, resize_size=28, interpolation=interpolation, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    ours = build_transforms(cfg, train=False)
    mode = T.InterpolationMode(interpolation)
    theirs = T.Compose([T.Resize(28, interpolation=mode), T.CenterCrop(24), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    rng = np.random.default_rng(1)
    for size in [(28, 28), (28, 41), (41, 28), (57, 30), (30, 57), (100, 77), (29, 1000 // 29), (255, 256)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        assert torch.equal(ours(image), theirs(image)), size
    for size in [(20, 20), (21, 19), (23, 24)]:  # smaller than the crop: padded
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        crop = CenterCrop(30)
        assert np.array_equal(np.asarray(crop(image)), np.asarray(T.CenterCrop(30)(image))), size


def test_scoring_an_export_does_not_import_torchvision():
    """torchvision's import pulls in torch._dynamo (seconds of every cnnkit predict): the eval
    pipeline, the predictor and the export backends must not need it."""
    import subprocess
    import sys

    code = ("import sys; import cnnkit.inference.predict, cnnkit.inference.onnx, cnnkit.inference.openvino; "
            "from cnnkit.data.transforms import build_transforms; from cnnkit.config import PreprocessConfig; "
            "build_transforms(PreprocessConfig(), train=False); print('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_normalized_tensor_gives_torchvisions_to_tensor_and_normalize_bit_for_bit(mode):
    """The one-step lookup is the two torchvision steps' arithmetic: every one of the 256 levels
    of every channel, and a noisy photo-like image, give the very same floats."""
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1 x 256, every level
    noisy = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    for pixels in (levels, noisy):
        image = Image.fromarray(pixels, "RGB").convert(mode).convert("RGB")
        expected = T.Normalize(mean, std)(T.ToTensor()(image))
        actual = NormalizedTensor(mean, std)(image)
        assert actual.shape == expected.shape and actual.dtype == torch.float32
        assert torch.equal(actual, expected)


def test_train_pipeline_outputs_image_size_squares_from_any_shape(rgb_file):
    pipeline = build_transforms(SMALL, train=True)
    for size in [(50, 40), (33, 90), (200, 64)]:
        image = Image.new("RGB", size, (10, 200, 30))
        assert pipeline(image).shape == (3, 32, 32)


def test_train_pipeline_augments_randomly_but_reproducibly_under_a_seed(rgb_file):
    pipeline = build_transforms(PreprocessConfig(image_size=32, resize_size=36, min_scale=0.1), train=True)
    image = load_image(rgb_file)
    torch.manual_seed(1)
    a = pipeline(image)
    torch.manual_seed(1)
    b = pipeline(image)
    c = pipeline(image)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_is_image_file_checks_the_extension_case_insensitively():
    assert is_image_file("a/b/photo.JPG") and is_image_file("x.webp") and is_image_file("scan.TIFF")
    assert not is_image_file("notes.txt") and not is_image_file("model.pt") and not is_image_file("jpg")


# --- resolve_preprocess ---------------------------------------------------------------------


def test_resolve_preprocess_densenet121_uses_224_from_256_bilinear():
    cfg = resolve_preprocess("densenet121")
    assert (cfg.image_size, cfg.resize_size, cfg.interpolation) == (224, 256, "bilinear")


def test_resolve_preprocess_efficientnet_b3_uses_its_own_300_from_320_bicubic():
    cfg = resolve_preprocess("efficientnet_b3")
    assert (cfg.image_size, cfg.resize_size, cfg.interpolation) == (300, 320, "bicubic")


def test_resolve_preprocess_explicit_image_size_keeps_the_0_875_crop_ratio():
    cfg = resolve_preprocess("resnet18", image_size=64)
    assert (cfg.image_size, cfg.resize_size) == (64, 73)


def test_resolve_preprocess_explicit_sizes_win():
    cfg = resolve_preprocess("efficientnet_b3", image_size=32, resize_size=36)
    assert (cfg.image_size, cfg.resize_size, cfg.interpolation) == (32, 36, "bicubic")


def test_resolve_preprocess_unknown_arch_falls_back_to_imagenet_defaults():
    cfg = resolve_preprocess("no_such_arch")
    assert (cfg.image_size, cfg.resize_size, cfg.interpolation) == (224, 256, "bilinear")


# --- load_image: colour modes and orientation -----------------------------------------------


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_load_image_converts_grayscale_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L").save(path)
    pixels = _pixels(load_image(path))
    assert pixels.shape == (10, 10, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[3, 7, 0] == 37


def test_load_image_composites_rgba_onto_white(tmp_path):
    path = tmp_path / "alpha.png"
    image = Image.new("RGBA", (10, 10), (0, 255, 0, 0))  # fully transparent green
    image.putpixel((0, 0), (0, 255, 0, 255))  # one opaque green pixel
    image.save(path)
    pixels = _pixels(load_image(path))
    assert tuple(pixels[0, 0]) == (0, 255, 0)
    assert tuple(pixels[5, 5]) == (255, 255, 255)


def test_load_image_palette_with_transparency_becomes_white_where_transparent(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    image.paste(1, (5, 0, 10, 10))
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    pixels = _pixels(load_image(path))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[0, 9]) == (0, 0, 255)


def test_load_image_converts_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    red, green, blue = _pixels(load_image(path))[5, 5].astype(int)
    assert red > 200 and green < 50 and blue < 50


def _gradient16() -> np.ndarray:
    return (np.arange(20 * 30, dtype=np.int64).reshape(20, 30) * 100).astype(np.uint16)  # 0..59900


def test_load_image_scales_16_bit_png_instead_of_clipping_to_white(tmp_path):
    path = tmp_path / "gray16.png"
    values = _gradient16()
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = _pixels(load_image(path))[..., 0].astype(int)
    expected = (values.astype(np.float64) * 255 / 65535).astype(int)
    assert np.abs(pixels - expected).max() <= 1
    assert pixels[10, 15] == 122  # 31500 / 65535 of full scale, not 255
    assert (pixels < 255).all()


def test_load_image_scales_32_bit_integer_tiff(tmp_path):
    path = tmp_path / "gray32.tif"
    Image.fromarray(_gradient16().astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    pixels = _pixels(load_image(path))[..., 0]
    assert pixels[10, 15] == 122 and pixels.max() < 255


def test_load_image_16_bit_brightness_does_not_jump_with_the_brightest_pixel(tmp_path):
    """Two 16-bit images that differ in one pixel (255 vs 256 of 65535) must decode alike: the
    value range of a 16-bit file is 0..65535 whatever its content."""
    dark = np.full((8, 8), 200, dtype=np.uint16)
    dark[0, 0] = 255
    darker_but_one = dark.copy()
    darker_but_one[0, 0] = 256
    a, b = tmp_path / "a16.png", tmp_path / "b16.png"
    Image.fromarray(dark).save(a)
    Image.fromarray(darker_but_one).save(b)
    pa, pb = _pixels(load_image(a)).astype(int), _pixels(load_image(b)).astype(int)
    assert np.abs(pa[4, 4] - pb[4, 4]).max() <= 1, (pa[4, 4], pb[4, 4])
    assert pa[4, 4, 0] <= 1  # 200 of 65535 is nearly black


def test_load_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (40, 20), (10, 20, 30)).save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_load_image_returns_a_usable_image_after_the_file_is_closed(rgb_file):
    image = load_image(rgb_file)
    assert image.size == (50, 40)
    assert build_transforms(SMALL, train=False)(image).shape == (3, 32, 32)


# --- load_image: refusals -------------------------------------------------------------------


@pytest.mark.parametrize("kind, reason", [
    ("garbage", "not an image"),
    ("text", "not an image"),
    ("empty", "not an image"),
    ("truncated", "truncated"),
])
def test_load_image_rejects_undecodable_files(tmp_path, kind, reason):
    path = write_corrupt_files(tmp_path)[kind]
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_load_image_rejects_truncated_png(tmp_path):
    full, cut = tmp_path / "full.png", tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(cut)


def test_load_image_rejects_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_load_image_refuses_images_over_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(ImageError, match="too large: 20x20"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=400).size == (20, 20)  # exactly at the limit is fine


def test_load_image_refuses_a_bomb_before_decoding_its_pixels(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (20, 20)).save(path)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or real_load(self))
    with pytest.raises(ImageError):
        load_image(path, max_pixels=100)
    assert decoded == []


def test_eval_pipeline_refuses_an_image_that_would_be_enormous_once_resized():
    cfg = PreprocessConfig(image_size=32, resize_size=36, max_pixels=100_000)
    pipeline = build_transforms(cfg, train=False)
    assert pipeline(Image.new("RGB", (60, 20))).shape == (3, 32, 32)  # 36x108 once resized: fine
    with pytest.raises(ImageError, match="too elongated"):
        pipeline(Image.new("RGB", (2000, 10)))  # 7200x36 once resized
