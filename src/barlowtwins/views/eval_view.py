"""The evaluation view: the deterministic pre-processing of images for a backbone.

Evaluation, embedding, the kNN monitor and the health measurements feed the backbone this
view instead of the augmented ones: scale to [0, 1], resize to the training view size when it
differs, normalise per channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from barlowtwins.views.kernels import boxes_on_canvas


def check_uint8_images(images: Tensor, name: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name} must be a uint8 tensor of shape (N, C, H, W); "
            f"got dtype {images.dtype} with shape {tuple(images.shape)}"
        )


def prepare_images(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    sizes: Tensor | None = None,
) -> Tensor:
    """Turn a uint8 batch into the normalised float input of a backbone, on its own device.

    The deterministic evaluation-time pre-processing: scale to [0, 1], take the centred
    square of each sample's source image (the classic "resize the shorter side, crop the
    centre"), resize to ``image_size x image_size`` (bilinear, antialiased, only when the size
    differs), then subtract ``mean`` and divide by ``std`` per channel.

    Args:
        images: A uint8 ``(B, C, H, W)`` tensor, on any device.
        mean: Per-channel mean on the [0, 1] scale, ``C`` values.
        std: Per-channel standard deviation on the [0, 1] scale, ``C`` positive values.
        image_size: Side of the output, or ``None`` to keep the input size.
        sizes: ``(B, 2)`` height and width of the source image each sample holds stretched to
            its canvas (see :class:`barlowtwins.data.ImageDataset`); None: every sample is its
            own source, as a square one is.

    Returns:
        A float32 ``(B, C, S, S)`` (or ``(B, C, H, W)``) tensor on ``images.device``.

    Raises:
        ValueError: On a wrong dtype or shape, ``mean``/``std`` lengths that differ from ``C``,
            a non-positive ``std`` entry, or ``image_size < 1``.
    """
    check_uint8_images(images, "images")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"images have {channels} channels but mean/std have {len(mean)}/{len(std)} entries; "
            "they must match"
        )
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive; got {list(std)}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 or None; got {image_size}")
    x = images.float().div_(255.0)
    output = tuple(x.shape[-2:]) if image_size is None else (image_size, image_size)
    boxes = None if sizes is None else _centred_squares(sizes.to(x.device), tuple(x.shape[-2:]))
    if boxes is not None and not bool((boxes == _whole(x)).all()):
        x = torch.cat(
            [
                F.interpolate(
                    x[i : i + 1, :, top : top + height, left : left + width],
                    size=output,
                    mode="bilinear",
                    antialias=True,
                )
                for i, (top, left, height, width) in enumerate(boxes.int().tolist())
            ]
        )
    elif x.shape[-2:] != output:
        x = F.interpolate(x, size=output, mode="bilinear", antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, channels, 1, 1)
    return (x - mean_t) / std_t


def _centred_squares(sizes: Tensor, canvas: tuple[int, ...]) -> Tensor:
    """Each source's centred square, on its canvas: ``(B, 4)`` top, left, height, width."""
    height, width = sizes[:, 0].float(), sizes[:, 1].float()
    side = torch.minimum(height, width)
    source = torch.stack(
        (
            torch.div(height - side, 2, rounding_mode="floor"),
            torch.div(width - side, 2, rounding_mode="floor"),
            side,
            side,
        ),
        dim=1,
    )
    return boxes_on_canvas(source, sizes, (int(canvas[0]), int(canvas[1])))


def _whole(x: Tensor) -> Tensor:
    return torch.tensor([0, 0, *x.shape[-2:]], dtype=torch.float32, device=x.device)
