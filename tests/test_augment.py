"""Tests of the batched two-view augmentation with per-sample random parameters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from barlowtwins.data import first_images, load_image_folder
from barlowtwins.views import batched as augment
from barlowtwins.views import kernels
from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.view_config import IMAGENET_MEAN, IMAGENET_STD, ViewConfig

IDENTITY = ViewConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_prob=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
)


def _images(batch: int, channels: int = 3, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, channels, *size), dtype=torch.uint8, generator=generator)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("channels", "dtype", "size", "out"),
    [
        (3, torch.uint8, (40, 48), 32),
        (1, torch.float32, (30, 20), 24),
        (3, torch.float64, (64, 64), 48),
    ],
)
def test_output_shapes_dtypes_and_values(
    channels: int, dtype: torch.dtype, size: tuple[int, int], out: int
) -> None:
    images = _images(6, channels, size)
    if dtype != torch.uint8:
        images = images.to(dtype) / 255
    view_a, view_b = BatchedBarlowTwinsAugment(out, channels=channels)(images, _seeded())
    for view in (view_a, view_b):
        assert view.shape == (6, channels, out, out)
        assert view.dtype == torch.float32
        assert view.is_contiguous()
        assert torch.isfinite(view).all()
    assert not torch.equal(view_a, view_b)


def test_every_sample_draws_its_own_parameters() -> None:
    images = _images(1).expand(16, -1, -1, -1)
    for view in BatchedBarlowTwinsAugment(32)(images, _seeded()):
        flat = view.flatten(1)
        distinct = torch.cdist(flat, flat) + torch.eye(16) > 1e-3
        assert distinct.all(), "two samples of the batch got the same augmentation"


def test_identity_configuration_gives_the_normalised_resized_input() -> None:
    images = _images(4, size=(48, 48))
    aug = BatchedBarlowTwinsAugment(32, view_a=IDENTITY, view_b=IDENTITY)
    resized = F.interpolate(images.float() / 255, size=32, mode="bilinear", align_corners=False)
    torch.testing.assert_close(aug.augment_view(images.float() / 255, IDENTITY), resized)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for view in aug(images):
        torch.testing.assert_close(view, (resized - mean) / std)


def test_color_jitter_matches_torchvision_per_sample() -> None:
    """Factors, per-sample random order and clipping equal torchvision's ColorJitter."""
    config = replace(
        IDENTITY, color_jitter_prob=0.7, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.3
    )
    images = torch.rand(48, 3, 12, 12, generator=_seeded(1))
    out = BatchedBarlowTwinsAugment(12).augment_view(images, config, _seeded(3))
    # Replay the draw: one row of uniforms per sample, in the layout _sample uses.
    uniforms = torch.rand(48, augment.UNIFORMS_PER_SAMPLE, generator=_seeded(3))[
        :, kernels.CROP_UNIFORMS :
    ]
    jittered, factors, order = uniforms[:, 1] < 0.7, uniforms[:, 2:6], uniforms[:, 6:10].argsort(1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(48):
        expected = images[i]
        if jittered[i]:
            for op in order[i].tolist():
                u = factors[i, op].item()
                expected = ops[op](expected, 0.6 + 0.8 * u if op < 3 else -0.3 + 0.6 * u)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_uint8_and_float_inputs_give_the_same_jitter() -> None:
    """The 1/255 scale folded into the first blend step equals jittering the scaled image."""
    config = replace(
        IDENTITY, color_jitter_prob=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1
    )
    images = _images(16, size=(12, 12))
    aug = BatchedBarlowTwinsAugment(12)
    from_uint8 = aug.augment_view(images, config, _seeded(7))
    from_float = aug.augment_view(images.float() / 255, config, _seeded(7))
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=0)


def test_solarize_grayscale_and_flip_with_probability_one() -> None:
    images = _images(4, size=(16, 16)).float() / 255
    aug = BatchedBarlowTwinsAugment(16)
    solarized = aug.augment_view(images, replace(IDENTITY, solarize_prob=1.0))
    torch.testing.assert_close(solarized, torch.where(images >= 0.5, 1 - images, images))
    gray = aug.augment_view(images, replace(IDENTITY, grayscale_prob=1.0))
    luma = 0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    torch.testing.assert_close(gray, luma[:, None].expand(-1, 3, -1, -1))
    flipped = aug.augment_view(images, replace(IDENTITY, hflip_prob=1.0))
    torch.testing.assert_close(flipped, images.flip(-1))


def test_probabilities_select_about_that_share_of_samples() -> None:
    images = torch.rand(1, 3, 8, 8, generator=_seeded()).expand(2000, -1, -1, -1)
    out = BatchedBarlowTwinsAugment(8).augment_view(images, replace(IDENTITY, hflip_prob=0.3))
    flipped = (out - images.flip(-1)).flatten(1).abs().amax(1) < 1e-6
    assert flipped.float().mean().item() == pytest.approx(0.3, abs=0.04)


def test_seeded_generator_is_deterministic() -> None:
    images = _images(8, size=(40, 40))
    aug = BatchedBarlowTwinsAugment(36)
    first, second, other = aug(images, _seeded(5)), aug(images, _seeded(5)), aug(images, _seeded(6))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("size", [36, 96])  # grid_sample and per-sample resize
def test_results_do_not_depend_on_the_chunk_size(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    images = _images(7, size=(size + 4, size + 4))
    aug = BatchedBarlowTwinsAugment(size)
    whole = aug(images, _seeded(2))
    # Two samples a chunk, whichever of input and output sets the chunk size.
    monkeypatch.setattr(augment, "_CPU_CHUNK_ELEMENTS", 3 * size * size * 2)
    for a, b in zip(whole, aug(images, _seeded(2)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_presets_for_small_and_grayscale_images() -> None:
    small = BatchedBarlowTwinsAugment(32)
    assert small.view_a.blur_prob == small.view_b.blur_prob == 0.0
    gray = BatchedBarlowTwinsAugment(64, channels=1)
    assert gray.view_a.hue == gray.view_a.saturation == gray.view_a.grayscale_prob == 0.0
    assert gray.mean == (0.449,) and gray.std == (0.226,)
    assert BatchedBarlowTwinsAugment(64).view_a.blur_prob == 1.0


def test_grayscale_images_ignore_colour_operations() -> None:
    colour = replace(IDENTITY, color_jitter_prob=1.0, brightness=0.0, contrast=0.0, hue=0.5)
    images = torch.rand(4, 1, 8, 8, generator=_seeded())
    out = BatchedBarlowTwinsAugment(8, channels=1).augment_view(images, colour)
    torch.testing.assert_close(out, images)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 8),
        torch.zeros(2, 1, 8, 8),
        torch.zeros(2, 3, 8, 8, dtype=torch.int32),
        torch.zeros(2, 3, 0, 8),
    ],
)
def test_bad_images_raise(images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        BatchedBarlowTwinsAugment(8)(images)


def test_bad_normalisation_raises() -> None:
    with pytest.raises(ValueError):
        BatchedBarlowTwinsAugment(8, mean=(0.5,), std=(0.5,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_a_cuda_generator() -> None:
    aug = BatchedBarlowTwinsAugment(32).cuda()
    images = _images(16, size=(40, 40)).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    view_a, view_b = aug(images, generator)
    assert view_a.device.type == view_b.device.type == "cuda"
    assert view_a.shape == (16, 3, 32, 32) and torch.isfinite(view_a).all()
    with pytest.raises(ValueError):
        aug(images, _seeded())


def test_empty_batch_gives_empty_views() -> None:
    view_a, view_b = BatchedBarlowTwinsAugment(16)(torch.zeros(0, 3, 20, 20, dtype=torch.uint8))
    assert view_a.shape == view_b.shape == (0, 3, 16, 16)


@pytest.mark.parametrize("size", [32, 96])  # grid_sample and per-sample resize
def test_channels_last_input_gives_the_same_views(size: int) -> None:
    images = _images(5, size=(size + 8, size + 8))
    aug = BatchedBarlowTwinsAugment(size)
    expected = aug(images, _seeded(4))
    channels_last = images.contiguous(memory_format=torch.channels_last)
    for a, b in zip(expected, aug(channels_last, _seeded(4)), strict=True):
        torch.testing.assert_close(a, b)


def test_large_float_views_resize_each_sample_with_antialias() -> None:
    """Float inputs take the per-sample resize too; a centre crop of the whole image is kept."""
    images = torch.rand(3, 3, 120, 120, generator=_seeded())
    out = BatchedBarlowTwinsAugment(96).augment_view(images, IDENTITY, _seeded())
    expected = F.interpolate(images, size=96, mode="bilinear", antialias=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    as_double = BatchedBarlowTwinsAugment(96).augment_view(images.double(), IDENTITY)
    torch.testing.assert_close(as_double, expected, atol=1e-5, rtol=0)


def _matching_shifts(
    images: torch.Tensor, views: torch.Tensor, largest: int
) -> list[tuple[int, int]]:
    """The one (dy, dx) within ``largest`` that turns each image into its view."""
    found = []
    for image, view in zip(images, views, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-largest, largest + 1)
            for dx in range(-largest, largest + 1)
            if torch.allclose(view, _shifted(image, dy, dx), atol=1e-5, rtol=0)
        ]
        assert len(matches) == 1, f"a view is not its input moved by whole pixels <= {largest}"
        found.append(matches[0])
    return found


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved down by dy and right by dx, the uncovered border 0."""
    out = torch.zeros_like(image)
    height, width = image.shape[1:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def test_translation_moves_each_sample_by_whole_pixels_with_a_black_border() -> None:
    """Every view is its input shifted by its own (dy, dx) in [-m, m], zeros moved in."""
    images = torch.rand(64, 1, 28, 28, generator=_seeded()) + 0.1  # no zeros of its own
    shifted = replace(IDENTITY, translate=0.1)  # m = floor(2.8) = 2
    view = BatchedBarlowTwinsAugment(28, channels=1).augment_view(images, shifted, _seeded(1))
    seen = set(_matching_shifts(images, view, 2))
    assert len(seen) > 15, f"64 samples hit only {len(seen)} of the 25 shifts"


def test_translation_applies_on_the_per_sample_resize_path_too() -> None:
    """Large CPU views (100 px: resized one sample at a time) shift like small ones."""
    images = torch.rand(8, 3, 100, 100, generator=_seeded()) + 0.1
    view = BatchedBarlowTwinsAugment(100).augment_view(
        images, replace(IDENTITY, translate=0.03), _seeded(2)
    )
    assert len(set(_matching_shifts(images, view, 3))) > 3


def test_erasing_sets_one_box_per_sample_to_zero_after_normalisation() -> None:
    images = _images(32, size=(28, 28)) // 2 + 100  # far from the mean: no accidental zeros
    erasing = replace(IDENTITY, erase_prob=1.0)
    aug = BatchedBarlowTwinsAugment(28, view_a=erasing, view_b=IDENTITY)
    erased, plain = aug(images, _seeded())
    for view, original in zip(erased, plain, strict=True):
        zero = (view.abs() < 1e-6).all(dim=0)
        rows, cols = zero.any(dim=1).nonzero(), zero.any(dim=0).nonzero()
        box_h, box_w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(zero.sum()) == box_h * box_w, "the erased pixels are not one rectangle"
        assert 0.015 * 784 <= box_h * box_w <= 0.34 * 784
        torch.testing.assert_close(view[:, ~zero], original[:, ~zero])


def test_no_erasing_below_its_probability() -> None:
    images = _images(400, size=(28, 28)) // 2 + 100
    aug = BatchedBarlowTwinsAugment(28, view_a=replace(IDENTITY, erase_prob=0.25))
    erased = aug(images, _seeded())[0]
    share = (erased.abs() < 1e-6).flatten(1).any(dim=1).float().mean()
    assert 0.18 < share < 0.32


@pytest.mark.parametrize("crop_scale", [(0.08, 1.0), (1.0, 1.0)], ids=["paper", "whole"])
def test_views_reach_both_edges_of_a_wide_image(
    tmp_path: Path, crop_scale: tuple[float, float]
) -> None:
    # A 4:3 photo (64x48): red left edge, blue right edge, grey elsewhere; neither colour
    # appears anywhere else. At scale 1 RandomResizedCrop keeps a 4:3 image whole.
    array = np.full((48, 64, 3), 128, dtype=np.uint8)
    array[:, :6] = (255, 0, 0)
    array[:, -6:] = (0, 0, 255)
    Image.fromarray(array).save(tmp_path / "wide.png")
    images, sizes = first_images(load_image_folder(tmp_path, image_size=32), 1)
    images, sizes = images.expand(64, -1, -1, -1), sizes.expand(64, -1)
    crop_only = replace(IDENTITY, crop_scale=crop_scale, crop_ratio=(3 / 4, 4 / 3))
    augment = BatchedBarlowTwinsAugment(32, view_a=crop_only, view_b=crop_only)
    views = augment.augment_view(images, crop_only, _seeded(), sizes)
    red = (views[:, 0] > 0.9) & (views[:, 1] < 0.1) & (views[:, 2] < 0.1)
    blue = (views[:, 2] > 0.9) & (views[:, 0] < 0.1) & (views[:, 1] < 0.1)
    has_red, has_blue = red.flatten(1).any(1), blue.flatten(1).any(1)
    assert has_red.any() and has_blue.any()
    if crop_scale == (1.0, 1.0):  # every view is the whole image
        assert has_red.all() and has_blue.all()
    else:  # crops of at least 8 % of the image: most miss one edge or both
        assert not (has_red & has_blue).all()
