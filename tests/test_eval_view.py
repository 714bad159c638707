"""Tests for barlowtwins.views.eval_view: the deterministic view evaluation feeds a backbone."""

from __future__ import annotations

import pytest
import torch

from barlowtwins.views import prepare_images

_MEAN = (0.5, 0.4, 0.3)
_STD = (0.2, 0.25, 0.3)


def test_prepare_images_resizes_only_when_needed() -> None:
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    same = prepare_images(images, _MEAN, _STD, image_size=12)
    torch.testing.assert_close(same, prepare_images(images, _MEAN, _STD))
    # A constant image stays constant through the antialiased resize.
    flat = torch.full((1, 3, 12, 12), 51, dtype=torch.uint8)
    resized = prepare_images(flat, _MEAN, _STD, image_size=5)
    assert resized.shape == (1, 3, 5, 5)
    expected = (0.2 - torch.tensor(_MEAN)) / torch.tensor(_STD)
    torch.testing.assert_close(resized[0, :, 2, 2], expected)
    with pytest.raises(ValueError, match="std must be positive"):
        prepare_images(images, _MEAN, (0.2, 0.0, 0.3))


def test_prepare_images_refuses_anything_but_uint8_batches() -> None:
    with pytest.raises(ValueError, match=r"images must be a uint8 tensor of shape \(N, C, H, W\)"):
        prepare_images(torch.rand(2, 3, 8, 8), _MEAN, _STD)
