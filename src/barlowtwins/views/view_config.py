"""The configuration of Barlow Twins' two views and their normalisation.

The augmentations follow the paper's appendix (Zbontar et al. 2021, arXiv 2103.03230,
Section A "Image augmentations"), which reuses BYOL's (Grill et al. 2020) pipeline: random
resized crop, horizontal flip, colour jitter, grayscale, Gaussian blur and solarisation, with
blur and solarisation probabilities that differ between the two views.

:class:`ViewConfig` describes one view; :func:`barlow_twins_views` builds the paper's
asymmetric pair with presets for tiny and grayscale images. Two pipelines apply them: the
per-sample PIL transform of :mod:`barlowtwins.views.pil` (Dataset use) and the batched
on-device augmentation of :mod:`barlowtwins.views.batched` (the training hot path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The mean of the ImageNet channel statistics, the usual choice for one-channel inputs.
GRAYSCALE_MEAN: tuple[float] = (0.449,)
GRAYSCALE_STD: tuple[float] = (0.226,)

# Images at most this large get no blur: a kernel of ~10% of 32 px is 3 px, which wipes out
# most of the detail of a tiny image (CIFAR recipes drop the blur for that reason).
_NO_BLUR_MAX_SIZE = 32
#: Solarisation probabilities of view A and view B (paper appendix A).
PAPER_SOLARIZE_PROB = (0.0, 0.2)


@dataclass(frozen=True)
class ViewConfig:
    """Augmentation parameters of one view (paper appendix A; BYOL's augmentations).

    Defaults are those of the paper's first view. Probabilities lie in [0, 1]; an operation
    whose probability or strength is 0 is skipped.

    Attributes:
        crop_scale: Range of the crop area as a fraction of the image area.
        crop_ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        translate: Largest shift of the cropped view along each axis, as a fraction of its
            side: the view moves by whole pixels drawn uniformly from [-m, m] per axis, with
            ``m = floor(translate * image_size)``, and the uncovered border is black (0), as
            torchvision's ``RandomCrop(image_size, padding=m)``. 0 leaves views in place.
        hflip_prob: Probability of a horizontal flip.
        color_jitter_prob: Probability of applying colour jitter.
        brightness: Brightness factor is drawn from [max(0, 1 - b), 1 + b].
        contrast: Contrast factor is drawn from [max(0, 1 - c), 1 + c].
        saturation: Saturation factor is drawn from [max(0, 1 - s), 1 + s].
        hue: Hue shift (fraction of a full turn) is drawn from [-hue, hue]; at most 0.5.
        grayscale_prob: Probability of converting to grayscale.
        blur_prob: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's standard deviation in pixels.
        solarize_prob: Probability of solarisation (inverting values >= 0.5).
        erase_prob: Probability of erasing one random rectangle (2-33 % of the area, aspect
            0.3-3.3) to the normalisation mean, i.e. to 0 in the normalised view: torchvision's
            ``RandomErasing(value=0)`` after normalisation (Zhong et al. 2020, arXiv
            1708.04896). Not in the paper.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0
    hflip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    erase_prob: float = 0.0

    def __post_init__(self) -> None:
        """Check every field and normalise the ranges to tuples of floats."""
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {self.translate}")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        for name in (
            "hflip_prob",
            "color_jitter_prob",
            "grayscale_prob",
            "blur_prob",
            "solarize_prob",
            "erase_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite strength >= 0, got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")


def _as_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """Return ``value`` as a ``(low, high)`` tuple of finite floats."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return low, high


def barlow_twins_views(
    image_size: int,
    channels: int = 3,
    crop_scale: tuple[float, float] | None = None,
    translate: float = 0.0,
    erase_prob: float = 0.0,
    solarize_prob: tuple[float, float] = PAPER_SOLARIZE_PROB,
    hflip_prob: float = 0.5,
) -> tuple[ViewConfig, ViewConfig]:
    """Return the paper's asymmetric pair of view configurations.

    View A always blurs and never solarises; view B blurs with probability 0.1 and solarises
    with probability 0.2 (paper appendix A; ``solarize_prob`` replaces those 0 and 0.2).
    Presets adapt the pair to the data:

    * ``image_size <= 32``: no blur in either view (as in CIFAR recipes: blur erases tiny
      images).
    * ``channels == 1``: no saturation, hue or grayscale (meaningless without colour).

    Args:
        image_size: Side of the square output views in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        crop_scale: Overrides both views' crop area range when given.
        translate: Both views' largest shift as a fraction of their side (not in the paper;
            small shifts suit centred objects that crops would cut, e.g. Fashion-MNIST).
        erase_prob: Both views' probability of random erasing (not in the paper).
        solarize_prob: Probability of solarisation in view A and in view B.
        hflip_prob: Both views' probability of a horizontal flip (paper: 0.5).

    Returns:
        The configurations of view A and view B.

    Raises:
        ValueError: If ``image_size`` < 1 or ``channels`` is not 1 or 3.
    """
    _check_image_size(image_size)
    _check_channels(channels)
    overrides: dict[str, Any] = {
        "translate": translate,
        "erase_prob": erase_prob,
        "hflip_prob": hflip_prob,
    }
    if crop_scale is not None:
        overrides["crop_scale"] = crop_scale
    if channels == 1:
        overrides.update(saturation=0.0, hue=0.0, grayscale_prob=0.0)
    blur = image_size > _NO_BLUR_MAX_SIZE
    solarize_a, solarize_b = solarize_prob
    view_a = ViewConfig(blur_prob=1.0 if blur else 0.0, solarize_prob=solarize_a)
    view_b = ViewConfig(blur_prob=0.1 if blur else 0.0, solarize_prob=solarize_b)
    return replace(view_a, **overrides), replace(view_b, **overrides)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the ``(mean, std)`` used to normalise views with ``channels`` channels.

    Raises:
        ValueError: If ``channels`` is not 1 or 3.
    """
    _check_channels(channels)
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return GRAYSCALE_MEAN, GRAYSCALE_STD


def max_shift(translate: float, image_size: int) -> int:
    """The largest shift in pixels of a view of side ``image_size`` (see ``ViewConfig``)."""
    return math.floor(translate * image_size)


def blur_kernel_size(image_size: int) -> int:
    """Return the Gaussian blur kernel side: ~10% of the image side, odd, at least 3.

    BYOL (which the paper follows) uses 23 px for 224 px crops.
    """
    _check_image_size(image_size)
    size = int(0.1 * image_size)
    return max(3, size + 1 - size % 2)


def resolve_normalization(
    channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fill in the default ``mean``/``std`` for ``channels`` and check the given ones.

    Raises:
        ValueError: If a statistic has the wrong length or a standard deviation is not > 0.
    """
    default_mean, default_std = default_normalization(channels)
    mean = default_mean if mean is None else tuple(float(m) for m in mean)
    std = default_std if std is None else tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values each, got {len(mean)} and {len(std)}"
        )
    if not all(s > 0 for s in std):
        raise ValueError(f"std values must be > 0, got {std}")
    return mean, std


def _check_image_size(image_size: int) -> None:
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
