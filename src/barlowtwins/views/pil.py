"""The per-sample (PIL) two-view transform of Barlow Twins, for use in a ``Dataset``.

It applies the views of :func:`barlowtwins.views.view_config.barlow_twins_views` with torchvision's
``transforms.v2``, as the paper's released code does; the batched equivalent for the training
hot path is :class:`barlowtwins.views.batched.BatchedBarlowTwinsAugment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from barlowtwins.views.view_config import (
    ViewConfig,
    barlow_twins_views,
    blur_kernel_size,
    max_shift,
    resolve_normalization,
)


class BarlowTwinsTransform:
    """Two augmented views of one PIL image, for use as a ``Dataset`` transform.

    Each view is a torchvision ``transforms.v2`` pipeline applied to the PIL image, as in the
    paper's released code: random resized crop (bicubic, antialiased), translation (padded
    random crop, when ``translate`` > 0), horizontal flip, colour jitter, grayscale, Gaussian
    blur (kernel ~10% of the size, as BYOL's 23 px at 224 px), solarisation (threshold 128 on
    the 8-bit image), then conversion to float and normalisation, then random erasing (when
    ``erase_prob`` > 0). Randomness comes from torch's global generator, so DataLoader
    workers draw independent views.

    Args:
        image_size: Side of the square output views in pixels.
        channels: 1 (views are grayscale) or 3 (RGB). Inputs of any PIL mode are converted.
        view_a: Configuration of the first view; defaults to :func:`barlow_twins_views`.
        view_b: Configuration of the second view; defaults to :func:`barlow_twins_views`.
        mean: Per-channel normalisation mean; defaults to :func:`default_normalization`.
        std: Per-channel normalisation std; defaults to :func:`default_normalization`.

    Examples:
        >>> transform = BarlowTwinsTransform(image_size=32)
        >>> view_a, view_b = transform(Image.new("RGB", (40, 40)))
        >>> view_a.shape
        torch.Size([3, 32, 32])
    """

    def __init__(
        self,
        image_size: int = 224,
        channels: int = 3,
        view_a: ViewConfig | None = None,
        view_b: ViewConfig | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        default_a, default_b = barlow_twins_views(image_size, channels)
        self.image_size = int(image_size)
        self.channels = channels
        self.view_a = default_a if view_a is None else view_a
        self.view_b = default_b if view_b is None else view_b
        self.mean, self.std = resolve_normalization(channels, mean, std)
        self._mode = "L" if channels == 1 else "RGB"
        self._pipeline_a = self._build(self.view_a)
        self._pipeline_b = self._build(self.view_b)

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        """Return two normalised float32 views of shape (channels, image_size, image_size).

        Raises:
            ValueError: If ``img`` is not a PIL image.
        """
        if not isinstance(img, Image.Image):
            raise ValueError(f"expected a PIL.Image.Image, got {type(img).__name__}")
        img = _convert_mode(img, self._mode)
        return self._pipeline_a(img), self._pipeline_b(img)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, channels={self.channels}, "
            f"view_a={self.view_a}, view_b={self.view_b}, mean={self.mean}, std={self.std})"
        )

    def _build(self, config: ViewConfig) -> v2.Compose:
        """Build one view's pipeline, leaving out operations that can never change the image."""
        ops: list[v2.Transform] = [
            v2.RandomResizedCrop(
                self.image_size,
                scale=config.crop_scale,
                ratio=config.crop_ratio,
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            )
        ]
        shift = max_shift(config.translate, self.image_size)
        if shift > 0:
            ops.append(v2.RandomCrop(self.image_size, padding=shift, fill=0))
        if config.hflip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=config.hflip_prob))
        colour = self.channels == 3
        strengths = {
            "brightness": config.brightness,
            "contrast": config.contrast,
            "saturation": config.saturation if colour else 0.0,
            "hue": config.hue if colour else 0.0,
        }
        if config.color_jitter_prob > 0 and any(strengths.values()):
            jitter = v2.ColorJitter(**{k: v for k, v in strengths.items() if v > 0})
            ops.append(v2.RandomApply([jitter], p=config.color_jitter_prob))
        if colour and config.grayscale_prob > 0:
            ops.append(v2.RandomGrayscale(p=config.grayscale_prob))
        if config.blur_prob > 0:
            blur = v2.GaussianBlur(blur_kernel_size(self.image_size), sigma=config.blur_sigma)
            ops.append(v2.RandomApply([blur], p=config.blur_prob))
        if config.solarize_prob > 0:
            # The image is still 8-bit here, so 128 is the 0.5 of the batched augmentation.
            ops.append(v2.RandomSolarize(threshold=128, p=config.solarize_prob))
        ops += [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ]
        if config.erase_prob > 0:
            ops.append(v2.RandomErasing(p=config.erase_prob, value=0))
        return v2.Compose(ops)


def _convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert ``img`` to ``mode`` ("L" or "RGB"), dropping any alpha channel."""
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        # PIL asks for palette images with transparency to go through RGBA.
        img = img.convert("RGBA")
    return img.convert(mode)
