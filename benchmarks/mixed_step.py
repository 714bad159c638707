"""Cost of Mixed Barlow Twins: seconds per training step with and without the mixed batch.

barlowtwins alone. Both sides train ``barlowtwins fit``'s Fashion-MNIST network (ResNet-10,
standard stem, one channel, projector 1024-1024-1024, channels-last, the CPU weight-gradient
convolutions) with LARS from :func:`build_optimizer`, in float32, on the same pre-made views
(augmentation is excluded: it is the same work on both sides and is timed once for reference).

* plain: forward both views, :class:`BarlowTwinsLoss`, backward, optimiser step.
* mixed: the same plus :class:`MixUp` (alpha, permutation, mixed images), a third forward pass
  on the mixed images and :class:`MixedBarlowTwinsLoss` in place of the plain loss.

Each repeat times ``--steps`` steps of each side in turn (plain, mixed, plain, ...) after one
warm-up step each; the summary is the median over repeats and the ratio mixed / plain, by
wall clock and by this process's CPU time, and the same for the fastest repeat (the least
disturbed one where other processes share the CPU).

Example::

    OMP_NUM_THREADS=2 python benchmarks/mixed_step.py --threads 2 --repeats 3 --steps 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _common
import torch

from barlowtwins import BarlowTwins, BarlowTwinsLoss, BatchedBarlowTwinsAugment, build_optimizer
from barlowtwins.mixed_loss import MixedBarlowTwinsLoss, MixUp
from barlowtwins.views.view_config import barlow_twins_views


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=512, help="images per step (default: 512)")
    parser.add_argument("--image-size", type=int, default=28, help="view size (default: 28)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat (default: 3)")
    parser.add_argument(
        "--mix-weight", type=float, default=4.0, help="MixedBarlowTwinsLoss weight (default: 4)"
    )
    _common.add_common_arguments(parser, repeats=3)
    return parser.parse_args()


def _training_step(
    model: BarlowTwins,
    optimizer: torch.optim.Optimizer,
    views: tuple[torch.Tensor, torch.Tensor],
    mixed: bool,
    mix_weight: float,
) -> Callable[[int], None]:
    plain_loss = BarlowTwinsLoss(5e-3)
    mixed_loss = MixedBarlowTwinsLoss(5e-3, mix_weight=mix_weight)
    mixup = MixUp(seed=0)

    def step(index: int) -> None:
        view_a, view_b = views
        z_a, z_b = model(view_a), model(view_b)
        if mixed:
            mix = mixup(view_a, view_b, step=index)
            z_m = model(mix.images.contiguous(memory_format=torch.channels_last))
            loss = mixed_loss(z_a, z_b, z_m, mix.alpha, mix.permutation)
        else:
            loss = plain_loss(z_a, z_b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = _parse_args()
    device = _common.setup(args)
    print(_common.describe_machine(device), flush=True)
    images = torch.randint(0, 256, (args.batch, 1, args.image_size, args.image_size))
    view_a, view_b = barlow_twins_views(args.image_size, 1, crop_scale=(1.0, 1.0))
    augment = BatchedBarlowTwinsAugment(args.image_size, 1, view_a, view_b).to(device)
    images = images.to(device, torch.uint8)
    augment_seconds = _common.timed(lambda: augment(images), device)
    views = tuple(v.contiguous(memory_format=torch.channels_last) for v in augment(images))

    steps: dict[str, Callable[[int], None]] = {}
    for name in ("plain", "mixed"):
        torch.manual_seed(args.seed)
        model = BarlowTwins.from_name(
            "resnet10",
            in_channels=1,
            projector_dims=(1024, 1024, 1024),
            small_output_convolutions=device.type == "cpu",
        ).to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, name="lars", batch_size=args.batch, lr_weights=0.6)
        steps[name] = _training_step(model, optimizer, views, name == "mixed", args.mix_weight)
        steps[name](0)  # warm-up

    cpu_seconds: dict[str, list[float]] = {name: [] for name in steps}

    def repeat(name: str) -> Callable[[], float]:
        def run() -> float:
            cpu_start = time.process_time()
            wall = _common.timed(lambda: [steps[name](i + 1) for i in range(args.steps)], device)
            cpu_seconds[name].append((time.process_time() - cpu_start) / args.steps)
            return wall / args.steps

        return run

    wall_seconds = _common.interleave({name: repeat(name) for name in steps}, args.repeats)
    print(f"augmentation of one batch (both views, not in the steps): {augment_seconds:.3f} s")
    for clock, seconds in (("wall", wall_seconds), ("CPU", cpu_seconds)):
        for statistic in (_common.median, min):
            plain, mixed = statistic(seconds["plain"]), statistic(seconds["mixed"])
            print(
                f"{clock} seconds per step ({statistic.__name__} of {args.repeats} x "
                f"{args.steps}): plain {plain:.3f} s, mixed {mixed:.3f} s -> mixed / plain "
                f"{mixed / plain:.3f}x"
            )


if __name__ == "__main__":
    main()
