"""End-to-end Barlow Twins training throughput: barlowtwins vs lightly on identical work.

Both sides train the same network on the same data: by default a ResNet-18 with the
small-image stem (3x3 stride-1 first convolution, no max-pool) and a 512-2048-2048-2048
projector, on random uint8 32x32 RGB images, ``--batch`` images per step. ``--fit-network``
trains the network of ``barlowtwins fit``'s defaults instead: ResNet-10 with the standard stem
on 28x28 images, batch 512, projector 1024-1024-1024 (RGB on both sides, as lightly's
transform expects three channels). ``--backbone``, ``--image-size``, ``--small-image`` /
``--no-small-image`` and ``--projector`` change one part of either network, e.g. a ResNet-50
on 224 px images with an 8192-8192-8192 projector. One step is: make both views of the batch,
forward both, the Barlow Twins loss, backward and the optimiser step. Throughput is source
images per second (each image gives two views), median of interleaved repeats after warm-up.

* barlowtwins, default path: a DataLoader of uint8 tensors, ``BatchedBarlowTwinsAugment`` on
  the batch on the training device, ``build_backbone("resnet18", small_image=True)`` (whose
  convolutions are :class:`barlowtwins.nn.convolution.SmallOutputConv2d`) and
  ``BarlowTwins`` in channels-last (the training module's default), ``BarlowTwinsLoss``, LARS
  from ``build_optimizer(name="lars")``, at barlowtwins' default precision for the device
  (bf16 autocast on CUDA and CPUs with fast bf16, float32 elsewhere).
* lightly, its example pipeline as shipped: its BYOL two-view transform (same operations and
  probabilities as barlowtwins' views) on PIL images in the DataLoader (``--workers``
  processes; 0 = in the training process), torchvision's ResNet with the same stem,
  lightly's ``BarlowTwinsProjectionHead(512, 2048, 2048)`` and ``BarlowTwinsLoss``,
  ``torch.optim.SGD(lr=0.06)``, float32, default memory format.

A second comparison, "equal precision", feeds both sides the same pre-made float32 views and
times forward + loss + backward + optimiser step only, both in float32: augmentation is
excluded, each side keeps its own model, loss, optimiser and memory format.

This measures the training pipelines' own work; Lightning's loop, logging and checkpoints are
not part of it.

Run ``python benchmarks/throughput.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import _common
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from barlowtwins import (
    BarlowTwins,
    BarlowTwinsLoss,
    BatchedBarlowTwinsAugment,
    build_backbone,
    build_optimizer,
)
from barlowtwins.backbones import resnet10

# (backbone, small-image stem, image size, batch, projector) of the two networks.
ISSUE_NETWORK = ("resnet18", True, 32, 128, (2048, 2048, 2048))
FIT_NETWORK = ("resnet10", False, 28, 512, (1024, 1024, 1024))
# lightly's side builds these plain torchvision ResNets, barlowtwins' side the same by name.
_TORCHVISION_RESNETS: dict[str, Callable[[], torchvision.models.ResNet]] = {
    "resnet10": resnet10,
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
# The issue's targets: 2.5x on the default path, at least even at equal precision.
_DEFAULT_TARGET = 2.5
_EQUAL_TARGET = 1.0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--fit-network",
        action="store_true",
        help="train barlowtwins fit's default network (ResNet-10, standard stem, 28 px, "
        "batch 512, projector 1024^3) instead of the issue's ResNet-18 on 32 px",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per step, per device (default: 128; 512 with --fit-network)",
    )
    parser.add_argument(
        "--num-images", type=int, default=512, help="random images in the dataset (default: 512)"
    )
    parser.add_argument(
        "--backbone",
        choices=sorted(_TORCHVISION_RESNETS),
        default=None,
        help="the ResNet on both sides (default: resnet18; resnet10 with --fit-network)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the random images and views (default: 32; 28 with --fit-network)",
    )
    parser.add_argument(
        "--small-image",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the small-image stem (3x3 stride-1 first convolution, no max-pool) on both sides "
        "(default: on; off with --fit-network)",
    )
    parser.add_argument(
        "--projector",
        type=int,
        nargs="+",
        default=None,
        help="projector sizes after the backbone features "
        "(default: 2048 2048 2048; 1024 1024 1024 with --fit-network)",
    )
    parser.add_argument(
        "--steps", type=int, default=1, help="training steps per timed repeat (default: 1)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per side first (default: 1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="lightly's DataLoader worker processes; 0 augments in the training process, "
        "which on a 2-core machine leaves both cores to the training step (default: 0)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=_common.PRECISION_CHOICES,
        help="barlowtwins' precision on its default path; auto = its default for the device",
    )
    parser.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep barlowtwins' model in the default memory format",
    )
    parser.add_argument(
        "--skip-equal", action="store_true", help="skip the equal-precision comparison"
    )
    _common.add_common_arguments(parser, repeats=2)
    args = parser.parse_args()
    backbone, small_image, image_size, batch, projector = (
        FIT_NETWORK if args.fit_network else ISSUE_NETWORK
    )
    args.backbone = backbone if args.backbone is None else args.backbone
    args.small_image = small_image if args.small_image is None else args.small_image
    args.image_size = image_size if args.image_size is None else args.image_size
    args.batch = batch if args.batch is None else args.batch
    args.projector = list(projector) if args.projector is None else args.projector
    return args


@dataclass
class Side:
    """One library's training setup; ``step`` runs one training step.

    ``step(None)`` takes the next batch from the side's own data pipeline (augmentation
    included); ``step(views)`` trains on the given pair of float32 views instead.
    """

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    next_views: Callable[[], tuple[Tensor, Tensor]]
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def step(self, views: tuple[Tensor, Tensor] | None = None, *, precision: bool = True) -> None:
        """One step; ``precision=False`` runs it in float32 whatever the side's default."""
        view_a, view_b = self.next_views() if views is None else views
        view_a = view_a.contiguous(memory_format=self.memory_format)
        view_b = view_b.contiguous(memory_format=self.memory_format)
        device = view_a.device
        dtype = self.autocast_dtype if precision else None
        with _common.autocast(device, dtype):
            loss = self.loss_fn(self.model(view_a), self.model(view_b))
        self.optimizer.zero_grad(set_to_none=True)
        if dtype == torch.float16:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


class _PILImages(Dataset):
    """PIL images with a per-image transform, as a torchvision dataset of images serves them."""

    def __init__(
        self, images: list[Image.Image], transform: Callable[[Image.Image], list[Tensor]]
    ) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[Tensor]:
        return self.transform(self.images[index])


def _forever(loader: DataLoader) -> Iterator[object]:
    return itertools.chain.from_iterable(itertools.repeat(loader))


def barlowtwins_side(
    args: argparse.Namespace, images: Tensor, device: torch.device, precision: str
) -> Side:
    # As fit trains: the faster CPU weight gradient on a CPU, plain convolutions elsewhere.
    backbone, feature_dim = build_backbone(
        args.backbone, small_image=args.small_image, small_output_convolutions=device.type == "cpu"
    )
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = BarlowTwins(backbone, feature_dim, tuple(args.projector))
    model = model.to(device, memory_format=memory_format)
    augment = BatchedBarlowTwinsAugment(args.image_size).to(device)
    batches = _forever(
        DataLoader(
            TensorDataset(images),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
    )

    def next_views() -> tuple[Tensor, Tensor]:
        (batch,) = next(batches)
        return augment(batch.to(device, non_blocking=True))

    dtype = _common.autocast_dtype(precision)
    return Side(
        model=model,
        loss_fn=BarlowTwinsLoss(),
        optimizer=build_optimizer(model, name="lars", batch_size=args.batch),
        next_views=next_views,
        memory_format=memory_format,
        autocast_dtype=dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
    )


def lightly_side(args: argparse.Namespace, images: Tensor, device: torch.device) -> Side:
    from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    # Plain torchvision ResNets, as lightly's example builds them.
    resnet = _TORCHVISION_RESNETS[args.backbone]()
    if args.small_image:
        # The same small-image stem as barlowtwins' small_image=True.
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    hidden, output = args.projector[0], args.projector[-1]
    model = nn.Sequential(
        nn.Sequential(*list(resnet.children())[:-1]),
        nn.Flatten(start_dim=1),
        BarlowTwinsProjectionHead(resnet.fc.in_features, hidden, output),
    ).to(device)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    batches = _forever(
        DataLoader(
            _PILImages(pil_images, _common.lightly_two_view_transform(args.image_size)),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            pin_memory=device.type == "cuda",
        )
    )

    def next_views() -> tuple[Tensor, Tensor]:
        view_a, view_b = next(batches)
        return view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)

    return Side(
        model=model,
        loss_fn=LightlyBarlowTwinsLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=_common.LIGHTLY_LR),
        next_views=next_views,
        memory_format=torch.contiguous_format,
        autocast_dtype=None,
        scaler=torch.amp.GradScaler(device.type, enabled=False),
    )


def _throughput(
    sides: dict[str, Side],
    args: argparse.Namespace,
    device: torch.device,
    *,
    views: tuple[Tensor, Tensor] | None,
    precision: bool,
    warmup: bool,
) -> dict[str, float]:
    """Median images per second of each side over interleaved repeats."""

    def _steps(side: Side, count: int) -> None:
        for _ in range(count):
            side.step(views, precision=precision)

    if warmup:
        for side in sides.values():
            _steps(side, args.warmup)
    rates = _common.interleave(
        {
            name: (
                lambda side=side: (
                    args.batch
                    * args.steps
                    / _common.timed(lambda: _steps(side, args.steps), device)
                )
            )
            for name, side in sides.items()
        },
        args.repeats,
    )
    return {name: _common.median(values) for name, values in rates.items()}


def _precision_label(precision: str) -> str:
    """barlowtwins' precision as a reader needs it: under autocast its loss stays float32."""
    if precision == "32-true":
        return precision
    return f"{precision}, loss in float32"


def main() -> None:
    """Run the default-path and equal-precision comparisons and print images per second."""
    args = _parse_args()
    _common.require_lightly()
    device = _common.setup(args)
    if min(args.batch, args.steps, args.workers + 1, args.warmup + 1) < 1 or args.batch < 2:
        raise SystemExit("need --batch >= 2, --steps >= 1, --warmup >= 0 and --workers >= 0")
    if args.num_images < args.batch:
        raise SystemExit(f"--num-images must be >= --batch, got {args.num_images}")
    precision = _common.default_precision(device) if args.precision == "auto" else args.precision
    print(_common.describe_machine(device))
    print(
        f"network: {args.backbone}, small-image stem: {args.small_image}, "
        f"{args.image_size} px, projector {args.projector}; "
        f"barlowtwins precision: {precision}, channels_last: {not args.no_channels_last}; "
        f"lightly: 32-true, DataLoader workers: {args.workers}; batch {args.batch}, "
        f"{args.steps} step(s) per repeat, {args.warmup} warm-up step(s)"
    )
    images = torch.randint(
        0,
        256,
        (args.num_images, 3, args.image_size, args.image_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(args.seed),
    )
    sides = {
        "barlowtwins": barlowtwins_side(args, images, device, precision),
        "lightly": lightly_side(args, images, device),
    }
    ours_precision = _precision_label(precision)
    print(
        f"\ndefault paths, augmentation included: images/s (barlowtwins {ours_precision}; "
        "lightly 32-true, as its examples train)"
    )
    rates = _throughput(sides, args, device, views=None, precision=True, warmup=True)
    comparisons = [
        _common.Comparison(
            f"training throughput, default paths (barlowtwins {ours_precision}, lightly "
            f"32-true), {args.backbone} {args.image_size} px, batch {args.batch}",
            rates["barlowtwins"],
            rates["lightly"],
            "img/s",
            _DEFAULT_TARGET,
            higher_is_better=True,
        )
    ]
    if not args.skip_equal:
        print(
            "\nequal precision, augmentation excluded: images/s (barlowtwins 32-true, "
            "lightly 32-true)"
        )
        generator = torch.Generator(device).manual_seed(args.seed)
        shape = (args.batch, 3, args.image_size, args.image_size)
        views = (
            torch.randn(shape, generator=generator, device=device),
            torch.randn(shape, generator=generator, device=device),
        )
        # A float32 default path already ran (and warmed up) exactly these kernels.
        rates = _throughput(
            sides, args, device, views=views, precision=False, warmup=precision != "32-true"
        )
        comparisons.append(
            _common.Comparison(
                f"training throughput, equal precision (barlowtwins 32-true, lightly 32-true, "
                f"augmentation excluded), {args.backbone} {args.image_size} px, "
                f"batch {args.batch}",
                rates["barlowtwins"],
                rates["lightly"],
                "img/s",
                _EQUAL_TARGET,
                higher_is_better=True,
            )
        )
    _common.print_summary(f"training throughput, device {device}:", comparisons)


if __name__ == "__main__":
    main()
