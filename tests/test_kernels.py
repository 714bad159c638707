"""Tests of the batched augmentation's stateless kernels against torchvision's per-sample
operations: crops, flips, resizes, hue shifts, blurs, shifts and erase boxes."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from barlowtwins.views import kernels
from barlowtwins.views.view_config import ViewConfig


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_and_flip_match_torchvision_resized_crop() -> None:
    """The per-sample resize equals torchvision's antialiased crop + resize (+ flip) on uint8."""
    images = torch.randint(0, 256, (4, 3, 30, 40), dtype=torch.uint8, generator=_seeded())
    boxes = torch.tensor([[0, 0, 30, 40], [5, 7, 20, 30], [3, 1, 8, 8], [10, 20, 17, 9]])
    flip = torch.tensor([False, True, False, True])
    out = kernels.resize_each(
        images.contiguous(memory_format=torch.channels_last),
        boxes.float(),
        flip,
        out=torch.empty(4, 3, 16, 16),
    )
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(
            images[i], t, l, h, w, [16, 16], v2.InterpolationMode.BILINEAR, antialias=True
        )
        expected = expected.flip(-1) if flip[i] else expected
        assert torch.equal(out[i], expected.float())


def test_grid_crop_and_flip_match_resized_crop_without_antialias() -> None:
    """One grid_sample (small views, CUDA) equals crop + bilinear resize (+ flip) of each box."""
    images = torch.rand(4, 3, 30, 40, generator=_seeded())
    boxes = torch.tensor([[0, 0, 30, 40], [5, 7, 20, 30], [3, 1, 8, 8], [10, 20, 17, 9]])
    top, left, height, width = boxes.float().unbind(1)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = kernels.resized_crop_grid(
        images,
        kernels.crop_axis_map(left, width, 40, flip),
        kernels.crop_axis_map(top, height, 30, torch.ones(4)),
        grid=torch.empty(4, 16, 16, 2),
    )
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(
            images[i], t, l, h, w, [16, 16], v2.InterpolationMode.BILINEAR, antialias=False
        )
        expected = expected.flip(-1) if flip[i] < 0 else expected
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    # Enlarged crops (as for views as large as the images) equal the antialiased resize.
    for i in (0, 1):
        t, l, h, w = boxes[i].tolist()
        expected = TF.resized_crop(
            images[i], t, l, h, w, [48, 48], v2.InterpolationMode.BILINEAR, antialias=True
        )
        grid_x = kernels.crop_axis_map(left[i : i + 1], width[i : i + 1], 40, flip[i : i + 1])
        grid_y = kernels.crop_axis_map(top[i : i + 1], height[i : i + 1], 30, torch.ones(1))
        enlarged = kernels.resized_crop_grid(
            images[i : i + 1], grid_x, grid_y, grid=torch.empty(1, 48, 48, 2)
        )[0]
        expected = expected.flip(-1) if flip[i] < 0 else expected
        torch.testing.assert_close(enlarged, expected, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop() -> None:
    config = ViewConfig(crop_scale=(0.2, 0.9))
    uniforms = torch.rand(4000, kernels.CROP_UNIFORMS, generator=_seeded())
    sizes = torch.tensor([[60, 80]]).expand(4000, 2)
    top, left, height, width = kernels.sample_crop_boxes(uniforms, sizes, config)
    for value in (top, left, height, width):
        assert torch.equal(value, value.round())
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 60).all() and (left + width <= 80).all()
    area = height * width / (60 * 80)
    assert area.min() >= 0.19 and area.max() <= 0.91
    ratio = (width / height).log()
    assert ratio.abs().max() <= abs(torch.tensor(3 / 4).log()) + 0.1
    # Same distribution as torchvision's sampler (rejection of boxes that do not fit included).
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(8, scale=(0.2, 0.9))
    reference = [crop.make_params([torch.empty(3, 60, 80)]) for _ in range(4000)]
    ref_area = torch.tensor([p["height"] * p["width"] / (60 * 80) for p in reference])
    ref_top = torch.tensor([float(p["top"]) for p in reference])
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.015)
    assert area.std().item() == pytest.approx(ref_area.std().item(), abs=0.015)
    assert top.mean().item() == pytest.approx(ref_top.mean().item(), abs=0.6)


def test_impossible_crop_falls_back_to_the_centre() -> None:
    config = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    uniforms = torch.rand(5, kernels.CROP_UNIFORMS, generator=_seeded())
    sizes = torch.tensor([[20, 30]]).expand(5, 2)
    top, left, height, width = kernels.sample_crop_boxes(uniforms, sizes, config)
    assert top.tolist() == [0.0] * 5 and left.tolist() == [5.0] * 5
    assert height.tolist() == [20.0] * 5 and width.tolist() == [20.0] * 5


def test_hue_shift_matches_torchvision() -> None:
    images = torch.rand(5, 3, 9, 9, generator=_seeded())
    images[0, :, :3] = 0.5  # gray pixels
    images[1, 1] = images[1, 0]  # ties between the maximum channels
    shifts = torch.tensor([0.1, -0.1, 0.5, -0.5, 0.03])
    out = kernels.shift_hue(images, shifts)
    for i in range(5):
        expected = TF.adjust_hue(images[i], shifts[i].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_blur_matches_torchvision_with_per_sample_sigma() -> None:
    images = torch.rand(3, 3, 40, 40, generator=_seeded())
    sigma = torch.tensor([0.1, 1.0, 2.0])
    out = kernels.gaussian_blur(images, sigma, kernel_size=11)
    for i in range(3):
        expected = TF.gaussian_blur(images[i], [11, 11], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)


def test_blur_radius_groups_match_each_samples_own_kernel() -> None:
    """Samples grouped by radius get exactly their own kernel of 2 * ceil(4 sigma) + 1 taps."""
    images = torch.rand(6, 3, 30, 30, generator=_seeded())
    sigma = torch.tensor([0.1, 2.0, 0.6, 1.3, 2.0, 0.3])  # radii 1, 8, 3, 6, 8, 2
    out = kernels.gaussian_blur(images, sigma, kernel_size=23)
    for i in range(6):
        radius = int(torch.ceil(4 * sigma[i]))
        expected = TF.gaussian_blur(images[i], [2 * radius + 1] * 2, [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
        alone = kernels.gaussian_blur(images[i : i + 1], sigma[i : i + 1], kernel_size=23)
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-6, rtol=0)
    # The per-sample truncation differs from the full 23-tap kernel only in its far tail.
    full = kernels.gaussian_blur_radius(images, sigma, radius=11)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=0)


def test_shifts_are_uniform_over_the_range() -> None:
    shifts = kernels.sample_shifts(torch.rand(70_000, 2, generator=_seeded()), 3)
    assert shifts is not None
    counts = torch.bincount(shifts.flatten() + 3, minlength=7)
    assert counts.numel() == 7
    assert (counts - 20_000).abs().max() < 600  # ~4.5 standard deviations
    assert kernels.sample_shifts(torch.rand(4, 2), 0) is None


def test_erase_boxes_follow_random_erasing() -> None:
    """Area and shape of the boxes match torchvision's RandomErasing.get_params."""
    boxes = kernels.sample_erase_boxes(
        torch.rand(4000, kernels.ERASE_UNIFORMS, generator=_seeded()), height=28, width=28
    )
    torch.manual_seed(0)
    image = torch.zeros(1, 28, 28)
    reference = torch.tensor(
        [
            v2.RandomErasing.get_params(image, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=[0])[:4]
            for _ in range(4000)
        ],
        dtype=torch.float32,
    )  # (top, left, h, w)
    ours, theirs = boxes[:, 2] * boxes[:, 3], reference[:, 2] * reference[:, 3]
    assert abs(ours.mean() - theirs.mean()) < 0.05 * theirs.mean()  # areas
    for column in range(4):
        assert abs(boxes[:, column].mean() - reference[:, column].mean()) < 0.6
    assert ((boxes[:, 0] + boxes[:, 2]) <= 28).all() and ((boxes[:, 1] + boxes[:, 3]) <= 28).all()


def test_each_sample_crops_its_own_source_size() -> None:
    config = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(0.5, 2.0))
    uniforms = torch.rand(3, kernels.CROP_UNIFORMS, generator=_seeded())
    # A wide, a tall and a square source: at scale 1 each crop is its whole source.
    sizes = torch.tensor([[40, 80], [90, 45], [50, 50]])
    boxes = torch.stack(kernels.sample_crop_boxes(uniforms, sizes, config), dim=1)
    assert boxes.tolist() == [[0, 0, 40, 80], [0, 0, 90, 45], [0, 0, 50, 50]]
    # On 32 x 32 canvases that hold the sources stretched, each is the whole canvas.
    on_canvas = kernels.boxes_on_canvas(boxes, sizes, (32, 32))
    assert on_canvas.tolist() == [[0, 0, 32, 32]] * 3


def test_boxes_move_onto_the_canvas_at_each_axis_scale() -> None:
    # Right half of a 100 x 200 source, on a 50 x 50 canvas: the canvas's right half.
    boxes = torch.tensor([[0.0, 100.0, 100.0, 100.0], [10.0, 0.0, 1.0, 1.0]])
    sizes = torch.tensor([[100, 200], [100, 200]])
    on_canvas = kernels.boxes_on_canvas(boxes, sizes, (50, 50))
    # A box smaller than a canvas pixel keeps one pixel.
    assert on_canvas.tolist() == [[0, 25, 50, 25], [5, 0, 1, 1]]
