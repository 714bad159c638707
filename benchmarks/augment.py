"""Two-view augmentation throughput: barlowtwins' batched augmentation vs lightly's per-image
transform, side by side in one process.

* barlowtwins: :class:`barlowtwins.BatchedBarlowTwinsAugment` on a uint8 batch
  ``(B, 3, H, W)``, as the training step receives it from the DataLoader.
* lightly: its BYOL two-view transform (what its Barlow Twins examples use), set to the same
  operations and probabilities as barlowtwins' views (see
  ``_common.lightly_two_view_transform``), applied to one PIL image at a time and collated
  into two batches with ``default_collate``, as its DataLoader does in each worker. The PIL
  images are made before timing (decoding is not counted on either side).

Sizes: 32 px views from 32x32 images and 224 px views from 256x256 images (barlowtwins stores
folders 8/7 the view size). Images are random uint8 pixels; the cost of these operations does
not depend on the content. Figures are images per second (each image gives both views),
median of interleaved repeats.

The batched path runs torch kernels on ``--threads`` threads, so other processes on the same
cores slow it far more than lightly's mostly single-threaded PIL work: check the load average
printed at the start.

Run ``python benchmarks/augment.py --help`` for the options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _common
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate

from barlowtwins import BatchedBarlowTwinsAugment

# The target: batched augmentation at least 5x lightly's per-image transform.
_TARGET = 5.0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 224],
        help="view sizes in pixels; views above 32 px are cropped from images 8/7 as large "
        "(default: 32 224)",
    )
    parser.add_argument("--batch", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.5,
        help="each timed repeat augments batches until it has run this long (default: 0.5)",
    )
    _common.add_common_arguments(parser, repeats=5)
    return parser.parse_args()


def _source_size(image_size: int) -> int:
    """Side of the stored images for views of ``image_size`` (as ``barlowtwins fit`` stores
    folders): the view size itself up to 32 px, else 8/7 of it (256 px for 224 px views)."""
    return image_size if image_size <= 32 else round(image_size * 8 / 7)


def _batched_call(
    augment: BatchedBarlowTwinsAugment, images: Tensor, device: torch.device
) -> Callable[[], None]:
    batch = images.to(device)

    def _call() -> None:
        augment(batch)

    return _call


def _per_image_call(
    transform: Callable[[Image.Image], list[Tensor]], images: list[Image.Image]
) -> Callable[[], None]:
    def _call() -> None:
        default_collate([transform(image) for image in images])

    return _call


def main() -> None:
    """Compare both augmentations at each size and print images per second."""
    args = _parse_args()
    _common.require_lightly()
    device = _common.setup(args)
    if args.batch < 1 or any(size < 1 for size in args.sizes):
        raise SystemExit(f"need --batch and --sizes >= 1, got {args.batch} and {args.sizes}")
    print(_common.describe_machine(device))
    comparisons = []
    for size in args.sizes:
        side = _source_size(size)
        images = torch.randint(
            0,
            256,
            (args.batch, 3, side, side),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(args.seed),
        )
        pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        calls = {
            "barlowtwins": _batched_call(BatchedBarlowTwinsAugment(size), images, device),
            "lightly": _per_image_call(_common.lightly_two_view_transform(size), pil_images),
        }
        print(f"\n{size} px views from {side}x{side}: {args.repeats} interleaved repeats (img/s)")
        counts = {
            name: _common.calibrate(fn, device, args.min_seconds) for name, fn in calls.items()
        }
        rates = _common.interleave(
            {
                name: (lambda fn=fn, n=counts[name]: args.batch / _common.per_call(fn, device, n))
                for name, fn in calls.items()
            },
            args.repeats,
        )
        comparisons.append(
            _common.Comparison(
                f"two-view augmentation {size} px (from {side} px), batch {args.batch}",
                _common.median(rates["barlowtwins"]),
                _common.median(rates["lightly"]),
                "img/s",
                _TARGET,
                higher_is_better=True,
            )
        )
    _common.print_summary(
        f"augmentation, device {device}, {torch.get_num_threads()} torch threads:", comparisons
    )


if __name__ == "__main__":
    main()
