"""Tests of the view configuration and the per-sample PIL two-view transform."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from barlowtwins.views.pil import BarlowTwinsTransform
from barlowtwins.views.view_config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
    barlow_twins_views,
    blur_kernel_size,
    default_normalization,
    max_shift,
)

# Every random operation switched off and the crop forced to the whole (square) image.
IDENTITY = ViewConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_prob=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
)


def _normalise(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
    return TF.normalize(x, list(mean), list(std))


def _random_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_view_config_defaults_are_the_papers() -> None:
    config = ViewConfig()
    assert config.crop_scale == (0.08, 1.0)
    assert config.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (config.hflip_prob, config.color_jitter_prob) == (0.5, 0.8)
    assert (config.brightness, config.contrast, config.saturation, config.hue) == (
        0.4,
        0.4,
        0.2,
        0.1,
    )
    assert (config.grayscale_prob, config.blur_prob, config.solarize_prob) == (0.2, 1.0, 0.0)
    assert config.blur_sigma == (0.1, 2.0)


def test_view_config_normalises_ranges_to_float_tuples() -> None:
    config = ViewConfig(crop_scale=[0.5, 1], blur_sigma=[1, 2])
    assert config.crop_scale == (0.5, 1.0)
    assert config.blur_sigma == (1.0, 2.0)
    assert hash(config) == hash(ViewConfig(crop_scale=(0.5, 1.0), blur_sigma=(1.0, 2.0)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.6, 0.5)},
        {"crop_scale": (0.5, 1.5)},
        {"crop_scale": (0.5,)},
        {"crop_scale": "ab"},
        {"crop_ratio": (0.0, 1.0)},
        {"crop_ratio": (2.0, 1.0)},
        {"crop_ratio": (1.0, float("inf"))},
        {"hflip_prob": 1.5},
        {"color_jitter_prob": -0.1},
        {"grayscale_prob": 2.0},
        {"blur_prob": -1.0},
        {"solarize_prob": 1.01},
        {"brightness": -0.1},
        {"contrast": float("nan")},
        {"saturation": -1.0},
        {"hue": 0.6},
        {"hue": -0.1},
        {"blur_sigma": (0.0, 1.0)},
        {"blur_sigma": (2.0, 1.0)},
        {"translate": -0.1},
        {"translate": 1.0},
        {"erase_prob": 1.5},
    ],
)
def test_invalid_view_config_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ViewConfig(**kwargs)


def test_paper_views_are_asymmetric() -> None:
    view_a, view_b = barlow_twins_views(224)
    assert (view_a.blur_prob, view_a.solarize_prob) == (1.0, 0.0)
    assert (view_b.blur_prob, view_b.solarize_prob) == (0.1, 0.2)
    assert view_a.saturation == view_b.saturation == 0.2


def test_small_images_get_no_blur() -> None:
    for size in (28, 32):
        view_a, view_b = barlow_twins_views(size)
        assert view_a.blur_prob == view_b.blur_prob == 0.0
        assert view_b.solarize_prob == 0.2
    assert barlow_twins_views(33)[0].blur_prob == 1.0


def test_grayscale_preset_drops_colour_operations() -> None:
    for view in barlow_twins_views(64, channels=1):
        assert (view.saturation, view.hue, view.grayscale_prob) == (0.0, 0.0, 0.0)
        assert view.brightness == view.contrast == 0.4


def test_crop_scale_override_applies_to_both_views() -> None:
    views = barlow_twins_views(96, crop_scale=(0.2, 1.0))
    assert [v.crop_scale for v in views] == [(0.2, 1.0), (0.2, 1.0)]
    with pytest.raises(ValueError):
        barlow_twins_views(96, crop_scale=(0.0, 1.0))


def test_translate_override_applies_to_both_views() -> None:
    assert [v.translate for v in barlow_twins_views(28, 1, translate=0.1)] == [0.1, 0.1]
    assert [v.translate for v in barlow_twins_views(28, 1)] == [0.0, 0.0]
    assert max_shift(0.1, 28) == 2 and max_shift(0.1, 32) == 3 and max_shift(0.0, 224) == 0


def test_translation_shifts_the_pil_view_by_whole_pixels_with_a_black_border() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (28, 28), dtype=np.uint8))
    plain = _normalise(img, (0.0,), (1.0,))
    transform = BarlowTwinsTransform(
        28,
        channels=1,
        view_a=replace(IDENTITY, translate=0.1),
        view_b=IDENTITY,
        mean=(0.0,),
        std=(1.0,),
    )
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        view, unshifted = transform(img)
        torch.testing.assert_close(unshifted, plain)
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(view, torch.roll(plain, (dy, dx), (1, 2)) * _window(dy, dx))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10


def _window(dy: int, dx: int, size: int = 28) -> torch.Tensor:
    """1 where a view moved by (dy, dx) still shows the image, 0 on the uncovered border."""
    keep = torch.zeros(1, size, size)
    keep[:, max(dy, 0) : size + min(dy, 0), max(dx, 0) : size + min(dx, 0)] = 1
    return keep


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"image_size": 32, "channels": 2}])
def test_barlow_twins_views_rejects_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        barlow_twins_views(**kwargs)


def test_default_normalization() -> None:
    assert default_normalization(3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert default_normalization(1) == ((0.449,), (0.226,))
    with pytest.raises(ValueError):
        default_normalization(4)


def test_blur_kernel_size_is_a_tenth_and_odd() -> None:
    assert blur_kernel_size(224) == 23  # BYOL's kernel
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(8) == 3


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_output_shapes(channels: int) -> None:
    transform = BarlowTwinsTransform(image_size=40, channels=channels)
    view_a, view_b = transform(_random_rgb((50, 45)))
    for view in (view_a, view_b):
        assert view.shape == (channels, 40, 40)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()
    assert not torch.equal(view_a, view_b)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "P-transparent", "LA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_transform_accepts_any_pil_mode(tmp_path: Path, mode: str, channels: int) -> None:
    img = _random_rgb((24, 20))
    if mode == "P-transparent":
        img = img.convert("P")
        img.info["transparency"] = 0
        path = tmp_path / "img.png"
        img.save(path, transparency=0)
    else:
        img = img.convert(mode)
        path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
        img.save(path)
    with Image.open(path) as loaded:
        view_a, view_b = BarlowTwinsTransform(image_size=16, channels=channels)(loaded)
    assert view_a.shape == view_b.shape == (channels, 16, 16)
    assert torch.isfinite(view_a).all() and torch.isfinite(view_b).all()


def test_identity_configuration_gives_the_normalised_resized_image() -> None:
    img = _random_rgb((48, 48))
    transform = BarlowTwinsTransform(image_size=32, view_a=IDENTITY, view_b=IDENTITY)
    view_a, view_b = transform(img)
    expected = _normalise(
        img.resize((32, 32), Image.Resampling.BICUBIC), IMAGENET_MEAN, IMAGENET_STD
    )
    torch.testing.assert_close(view_a, expected)
    torch.testing.assert_close(view_b, expected)


def test_solarize_with_probability_one_inverts_bright_pixels() -> None:
    values = np.array([[0, 100, 127], [128, 200, 255]], dtype=np.uint8)
    img = Image.fromarray(np.stack([values] * 3, axis=-1)).resize((6, 6), Image.Resampling.NEAREST)
    solarize = replace(IDENTITY, solarize_prob=1.0)
    transform = BarlowTwinsTransform(
        6, view_a=solarize, view_b=IDENTITY, mean=(0,) * 3, std=(1,) * 3
    )
    view_a, view_b = transform(img)
    plain = view_b * 255
    expected = torch.where(plain >= 128, 255 - plain, plain)
    torch.testing.assert_close(view_a * 255, expected, atol=1e-4, rtol=0)
    assert view_a.max() <= 127 / 255 + 1e-6


def test_grayscale_with_probability_one_equalises_channels() -> None:
    gray = replace(IDENTITY, grayscale_prob=1.0)
    transform = BarlowTwinsTransform(16, view_a=gray, view_b=IDENTITY, mean=(0,) * 3, std=(1,) * 3)
    view_a, view_b = transform(_random_rgb((16, 16)))
    assert torch.equal(view_a[0], view_a[1]) and torch.equal(view_a[1], view_a[2])
    assert not torch.equal(view_b[0], view_b[1])


def test_flip_with_probability_one_mirrors() -> None:
    flip = replace(IDENTITY, hflip_prob=1.0)
    transform = BarlowTwinsTransform(16, view_a=flip, view_b=IDENTITY)
    view_a, view_b = transform(_random_rgb((16, 16)))
    torch.testing.assert_close(view_a, view_b.flip(-1))


def test_grayscale_channel_gets_grayscale_statistics() -> None:
    img = Image.new("L", (8, 8), color=128)
    view_a, _ = BarlowTwinsTransform(8, channels=1, view_a=IDENTITY, view_b=IDENTITY)(img)
    torch.testing.assert_close(view_a, torch.full((1, 8, 8), (128 / 255 - 0.449) / 0.226))


def test_transform_is_deterministic_under_a_seed() -> None:
    transform = BarlowTwinsTransform(image_size=36)
    img = _random_rgb((40, 40))
    torch.manual_seed(7)
    first = transform(img)
    torch.manual_seed(7)
    second = transform(img)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BarlowTwinsTransform(image_size=32)(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        BarlowTwinsTransform(image_size=32, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError):
        BarlowTwinsTransform(image_size=32, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError):
        BarlowTwinsTransform(image_size=32, channels=4)


def test_erasing_sets_a_box_of_the_pil_view_to_zero() -> None:
    img = _random_rgb((28, 28))
    erasing = replace(IDENTITY, erase_prob=1.0)
    view, plain = BarlowTwinsTransform(28, view_a=erasing, view_b=IDENTITY)(img)
    zero = (view == 0).all(dim=0)
    assert 0 < int(zero.sum()) <= 0.34 * 28 * 28
    torch.testing.assert_close(view[:, ~zero], plain[:, ~zero])


def test_erase_prob_override_applies_to_both_views() -> None:
    assert [v.erase_prob for v in barlow_twins_views(28, 1, erase_prob=0.5)] == [0.5, 0.5]


def test_solarize_prob_sets_each_view_and_defaults_to_the_paper() -> None:
    assert [v.solarize_prob for v in barlow_twins_views(28, 1)] == [0.0, 0.2]
    views = barlow_twins_views(28, 1, solarize_prob=(0.1, 0.4))
    assert [v.solarize_prob for v in views] == [0.1, 0.4]
