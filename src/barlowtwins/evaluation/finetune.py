"""Semi-supervised evaluation: fine-tune a backbone and a linear head on a few labels.

The protocol of the Barlow Twins paper's semi-supervised table (Zbontar et al. 2021, arXiv
2103.03230, Table 2: 1 % and 10 % of the ImageNet labels) and of the official code,
``evaluate.py --weights finetune`` of facebookresearch/barlowtwins, whose README runs it as
``--train-perc 1 --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5 --weight-decay 0``
(an earlier README said ``--lr-backbone 0.002``). What is taken from it
(:class:`FinetuneSettings`):

* the backbone and a new linear head train together with SGD (momentum 0.9), each with its
  own learning rate (backbone 0.005, head 0.5 for batch 256) and weight decay 0, decayed
  to 0 by a cosine schedule; the head starts at ``N(0, 0.01)`` weights and zero bias;
* batch norm trains (``model.train()``), as in the official fine-tuning;
* the augmentation is the standard supervised one: ``RandomResizedCrop`` + horizontal flip
  for large images (the official code's, at 224 px), and for small images (32 px and less,
  where a crop of 8 % of the area leaves a few pixels) a flip and a pad-and-crop of 2 px at
  28 px (the usual Fashion-MNIST / CIFAR practice); the test images take the evaluation
  view (:func:`~barlowtwins.views.eval_view.prepare_images`);
* the labelled subset is class-balanced and fixed (:func:`balanced_subset`), as SimCLR's 1 %
  and 10 % lists that the official code downloads.

Where it differs, on purpose: the cosine decays per step rather than per epoch (the same
curve, smoothed for subsets of a few steps per epoch); every step takes a full batch (the
last partial one is dropped, every epoch draws a new order); epochs follow the subset's size
(:meth:`FinetuneSettings.epochs_for`: at least the official 20 epochs and at least the 1 000
steps those 20 epochs make on ImageNet's 1 %); and the score is the last epoch's test
accuracy, where the official code reports the best epoch's, which selects on the test set.

This is evaluation, not training of the method: a plain PyTorch loop, like the linear probe
of :mod:`barlowtwins.evaluation.probes`, with no Lightning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from barlowtwins.data import DataError, ImageDataset
from barlowtwins.evaluation.probes import extract_features
from barlowtwins.precision import autocast
from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.view_config import ViewConfig

_log = logging.getLogger("barlowtwins")


@dataclass(frozen=True)
class FinetuneSettings:
    """The fine-tuning protocol; the defaults are the official semi-supervised ones.

    Attributes:
        lr_backbone: Peak SGD learning rate of the backbone (official README: 0.005).
        lr_classifier: Peak SGD learning rate of the linear head (official: 0.5).
        weight_decay: SGD weight decay of both (official for fine-tuning: 0).
        momentum: SGD momentum (official: 0.9).
        batch_size: Images per step (official: 256).
        epochs: Passes over the labelled subset; ``None``: :meth:`epochs_for` decides.
        min_epochs: The fewest epochs ``None`` gives (official: 20).
        min_steps: The fewest steps ``None`` gives: 20 epochs of ImageNet's 1 % (12 811
            images) at batch 256 are 1 000 steps; a subset of 600 images would get 40.
        head_init_std: Standard deviation of the head's initial weights (official: 0.01).
        hflip_prob: Probability of a horizontal flip (official: 0.5; 0 where orientation
            matters).
        small_image: Largest image side that is padded and cropped instead of
            ``RandomResizedCrop``-ed.
        pad_fraction: Padding of the pad-and-crop, as a fraction of the side (2 px at 28 px).
        crop_scale: Area range of ``RandomResizedCrop`` (torchvision's and official: 8-100 %).
        probe_min_steps: The fewest steps of the frozen linear probe it is compared with
            (:func:`~barlowtwins.evaluation.probes.linear_probe`, batches of 1 024).
        probe_min_epochs: The fewest epochs of that probe (``evaluate --linear``'s 100).
        seed: Seed of the subset, the head's initial weights, the random-init backbone,
            the batch order and the augmentation.
    """

    lr_backbone: float = 0.005
    lr_classifier: float = 0.5
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 256
    epochs: int | None = None
    min_epochs: int = 20
    min_steps: int = 1000
    head_init_std: float = 0.01
    hflip_prob: float = 0.5
    small_image: int = 32
    pad_fraction: float = 1 / 14
    crop_scale: tuple[float, float] = (0.08, 1.0)
    probe_min_steps: int = 1000
    probe_min_epochs: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings no run can use, with one-line messages."""
        for name in ("lr_backbone", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.lr_classifier > 0:
            raise ValueError(f"lr_classifier must be > 0; got {self.lr_classifier}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm trains); got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must lie in [0, 1]; got {self.hflip_prob}")

    def steps_per_epoch(self, images: int) -> int:
        """Full batches of ``images`` (a last partial batch is dropped; every epoch shuffles
        anew, so every image is used): one batch of all of them when they are fewer."""
        return max(1, images // self.batch_size)

    def epochs_for(self, images: int) -> int:
        """The epochs of a subset of ``images``: ``epochs`` when set, else
        ``max(min_epochs, ceil(min_steps / steps_per_epoch))``."""
        if self.epochs is not None:
            return self.epochs
        return max(self.min_epochs, math.ceil(self.min_steps / self.steps_per_epoch(images)))

    def probe_epochs_for(self, images: int, probe_batch: int = 1024) -> int:
        """The epochs of the frozen linear probe on ``images``: as many as give it at least
        ``probe_min_steps`` steps of ``probe_batch``, and at least ``probe_min_epochs``."""
        steps = math.ceil(images / probe_batch)
        return max(self.probe_min_epochs, math.ceil(self.probe_min_steps / steps))

    def view(self, image_size: int) -> ViewConfig:
        """The supervised augmentation of images of side ``image_size`` (see the module)."""
        # Crop and flip only: no colour jitter, grey, blur or solarisation.
        large = ViewConfig(
            crop_scale=self.crop_scale,
            hflip_prob=self.hflip_prob,
            color_jitter_prob=0.0,
            grayscale_prob=0.0,
            blur_prob=0.0,
            solarize_prob=0.0,
        )
        if image_size > self.small_image:
            return large
        pad = max(1, round(self.pad_fraction * image_size))
        # The whole image (a non-square one's centred square, as the test view), moved by up
        # to `pad` pixels with a black border: RandomCrop(size, padding=pad). The view floors
        # translate * size to whole pixels; the half pixel keeps float rounding from losing one.
        return replace(
            large, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), translate=(pad + 0.5) / image_size
        )


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`finetune_classifier`.

    Attributes:
        test_accuracy: Top-1 accuracy on the test images after the last epoch, in percent.
        epochs: Epochs trained.
        steps: Optimisation steps taken.
        minutes: Wall-clock minutes of training and testing.
    """

    test_accuracy: float
    epochs: int
    steps: int
    minutes: float


def balanced_subset(
    labels: Tensor,
    count: int,
    *,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> Tensor:
    """A class-balanced random subset of ``count`` labelled samples, fixed by ``seed``.

    Each of the ``C`` classes present gets ``count // C`` samples; the ``count % C`` left over
    go to as many classes drawn at random, one each, so counts differ by at most one. Within a
    class the samples are a random draw. ``count`` equal to the number of samples takes them all
    (the data's own balance).

    Args:
        labels: ``(N,)`` integer labels.
        count: Samples to choose, ``C <= count <= N``.
        seed: Seed of the draws (a private generator; the global RNG is untouched).
        classes: Class names indexed by label, for messages.

    Returns:
        ``(count,)`` int64 indices into ``labels``, in increasing order.

    Raises:
        DataError: If ``count`` cannot cover every class, or a class has fewer samples than
            its share.
    """
    labels = labels.long()
    present = labels.unique()
    if not present.numel() <= count <= labels.numel():
        raise DataError(
            f"asked for {count} labels; choose between {present.numel()} (one per class) and "
            f"{labels.numel()} (all)"
        )
    if count == labels.numel():
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    share = torch.full((present.numel(),), count // present.numel())
    share[torch.randperm(present.numel(), generator=generator)[: count % present.numel()]] += 1
    chosen = []
    for label, wanted in zip(present.tolist(), share.tolist(), strict=True):
        members = torch.nonzero(labels == label).flatten()
        if members.numel() < wanted:
            name = classes[label] if classes and label < len(classes) else str(label)
            raise DataError(
                f"asked for {wanted} labels of class {name!r}, which has {members.numel()} "
                f"images; ask for at most {members.numel() * present.numel()} labels"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:wanted]])
    return torch.cat(chosen).sort().values


def _batches(
    data: ImageDataset, order: Tensor, batch_size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(images, labels, sizes)`` of ``data`` in ``order``, full batches only: sliced from
    memory, or decoded by DataLoader workers for a lazily decoded folder."""
    batches = [
        order[i * batch_size : (i + 1) * batch_size] for i in range(len(order) // batch_size)
    ]
    images = getattr(data, "images", None)
    if isinstance(images, Tensor):
        sizes = getattr(data, "source_sizes", None)
        assert data.labels is not None
        for batch in batches:
            size = (
                torch.tensor([data.image_size] * 2).expand(len(batch), 2)
                if sizes is None
                else sizes[batch]
            )
            yield images[batch], data.labels[batch], size
        return
    loader = DataLoader(
        data,
        batch_sampler=[batch.tolist() for batch in batches],
        num_workers=min(8, torch.get_num_threads()),
    )
    for image, label, _, size in loader:
        yield image, label, size


def new_head(features: int, classes: int, *, std: float, seed: int) -> nn.Linear:
    """A linear head initialised as the official code's: ``N(0, std)`` weights, zero bias,
    drawn from a private generator (the global RNG is untouched)."""
    head = nn.utils.skip_init(nn.Linear, features, classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, features, generator=generator) * std)
        head.bias.zero_()
    return head


def finetune_classifier(
    backbone: nn.Module,
    head: nn.Linear,
    train: ImageDataset,
    test: ImageDataset,
    settings: FinetuneSettings,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    device: torch.device,
    precision: str = "32",
    test_batch_size: int = 512,
) -> FinetuneResult:
    """Train ``backbone`` and ``head`` together on ``train``, then score them on ``test``.

    Both are trained in place and left on ``device`` in eval mode. Every random draw (batch
    order, augmentation) comes from generators seeded with ``settings.seed``.

    Args:
        backbone: Maps a normalised ``(B, C, S, S)`` batch to ``(B, F)`` features (or
            ``(B, F, 1, 1)``).
        head: ``nn.Linear(F, classes)``.
        train: The labelled subset.
        test: Labelled test images.
        settings: The protocol.
        mean: Per-channel normalisation mean of the backbone's training.
        std: Its per-channel standard deviation.
        image_size: The backbone's input side.
        device: Where to train.
        precision: Autocast precision name (:mod:`barlowtwins.precision`).
        test_batch_size: Images per test forward pass.

    Returns:
        The test accuracy and what the training took.

    Raises:
        DataError: If either dataset has no labels.
    """
    for name, data in (("training", train), ("test", test)):
        if data.labels is None:
            raise DataError(f"the {name} data has no labels (use class subfolders)")
    assert train.labels is not None
    started = time.perf_counter()
    model = nn.Sequential(backbone, nn.Flatten(), head).to(device)
    backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [
            {"params": list(head.parameters()), "lr": settings.lr_classifier},
            {"params": list(backbone.parameters()), "lr": settings.lr_backbone},
        ],
        lr=settings.lr_classifier,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    batch_size = min(settings.batch_size, len(train))
    epochs = settings.epochs_for(len(train))
    total_steps = epochs * settings.steps_per_epoch(len(train))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    augment = BatchedBarlowTwinsAugment(image_size, channels=train.channels, mean=mean, std=std)
    view = settings.view(image_size)
    order_generator = torch.Generator().manual_seed(settings.seed)
    view_generator = torch.Generator(device).manual_seed(settings.seed)
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    scale = torch.tensor(std, device=device).view(1, -1, 1, 1)
    # About ten progress lines per training.
    report_every, step = max(1, total_steps // 10), 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=order_generator)
        for images, labels, sizes in _batches(train, order, batch_size):
            views = augment.augment_view(
                images.to(device, non_blocking=True), view, view_generator, sizes.to(device)
            )
            x = ((views - shift) / scale).contiguous(memory_format=torch.channels_last)
            with autocast(device.type, precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % report_every == 0 or step == total_steps:
                _log.info("  step %d/%d, training loss %.3f", step, total_steps, loss.item())
    accuracy = classifier_accuracy(
        model,
        test,
        mean=mean,
        std=std,
        image_size=image_size,
        device=device,
        precision=precision,
        batch_size=test_batch_size,
    )
    return FinetuneResult(
        test_accuracy=accuracy,
        epochs=epochs,
        steps=total_steps,
        minutes=(time.perf_counter() - started) / 60,
    )


def classifier_accuracy(
    classifier: nn.Module,
    test: ImageDataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    device: torch.device,
    precision: str = "32",
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy (percent) of a classifier on labelled images, in the evaluation view."""
    if test.labels is None:
        raise DataError("the test data has no labels (use class subfolders)")
    logits = extract_features(
        classifier,
        test,
        batch_size=batch_size,
        device=device,
        mean=mean,
        std=std,
        image_size=image_size,
        precision=precision,
    )
    return 100.0 * int((logits.argmax(dim=1) == test.labels).sum()) / len(test.labels)


#: The key of the random-init network's accuracies, as in :mod:`barlowtwins.evaluation.results`.
RANDOM_INIT = "random init"


@dataclass(frozen=True)
class FinetuneAccuracies:
    """What ``barlowtwins finetune`` measured: the one shape it prints, writes into the run
    (``finetune.json``) and the model card reads.

    ::

        {
          "train_images": 60000, "labels": 600, "labels_per_class": {"T-shirt/top": 60, ...},
          "test_images": 10000,
          "finetune": {"epochs": 500, "steps": 1000,
                       "top1": {"barlow twins": 80.1, "random init": 75.2}},
          "linear_probe": {"epochs": 1000, "top1": {"barlow twins": 78.0}},
          "minutes": {"finetune barlow twins": 2.2, ...}
        }

    Accuracies are top-1 percentages keyed by the encoder they start from (``"barlow twins"``,
    :data:`~barlowtwins.evaluation.results.TRAINED`, and ``"random init"``).

    Attributes:
        train_images: Labelled training images the subset was drawn from.
        labels: Images of the subset.
        labels_per_class: Images of the subset per class name (or label).
        test_images: Images scored.
        epochs: Epochs of each fine-tuning.
        steps: Steps of each fine-tuning.
        finetuned: ``{encoder: accuracy %}`` after fine-tuning.
        linear_probe: ``{encoder: accuracy %}`` of the frozen linear probe on the subset.
        linear_probe_epochs: Epochs of that probe.
        minutes: Wall-clock minutes of each part.
    """

    train_images: int
    labels: int
    labels_per_class: Mapping[str, int]
    test_images: int
    epochs: int
    steps: int
    finetuned: Mapping[str, float]
    linear_probe: Mapping[str, float]
    linear_probe_epochs: int
    minutes: Mapping[str, float] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        """The subset's share of the labelled training images, in percent."""
        return 100.0 * self.labels / self.train_images

    def to_dict(self) -> dict[str, Any]:
        """The shape of the class docstring (JSON-ready)."""
        return {
            "train_images": self.train_images,
            "labels": self.labels,
            "percent": round(self.percent, 4),
            "labels_per_class": dict(self.labels_per_class),
            "test_images": self.test_images,
            "finetune": {"epochs": self.epochs, "steps": self.steps, "top1": dict(self.finetuned)},
            "linear_probe": {"epochs": self.linear_probe_epochs, "top1": dict(self.linear_probe)},
            "minutes": dict(self.minutes),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneAccuracies:
        """Read :meth:`to_dict`'s shape.

        Raises:
            KeyError: If a field is missing.
        """
        return cls(
            train_images=int(values["train_images"]),
            labels=int(values["labels"]),
            labels_per_class=dict(values["labels_per_class"]),
            test_images=int(values["test_images"]),
            epochs=int(values["finetune"]["epochs"]),
            steps=int(values["finetune"]["steps"]),
            finetuned=dict(values["finetune"]["top1"]),
            linear_probe=dict(values["linear_probe"]["top1"]),
            linear_probe_epochs=int(values["linear_probe"]["epochs"]),
            minutes=dict(values.get("minutes", {})),
        )

    def rows(self) -> list[tuple[str, float, float | None]]:
        """``(what, top-1 %, minutes)`` of each measurement, as the table and the model card
        show them."""
        rows = [
            (f"fine-tuned from {name}", value, self.minutes.get(f"finetune {name}"))
            for name, value in self.finetuned.items()
        ]
        rows += [
            (f"linear probe on frozen {name}", value, self.minutes.get("linear probe"))
            for name, value in self.linear_probe.items()
        ]
        return rows

    def table(self) -> str:
        """The accuracies as ``barlowtwins finetune`` prints them."""
        counts = list(self.labels_per_class.values()) or [0]
        low, high = min(counts), max(counts)
        per_class = str(low) if low == high else f"{low}-{high}"
        lines = [
            f"Test top-1 on {self.test_images} images, trained on {self.labels} labels "
            f"({self.percent:.4g} % of {self.train_images}, {per_class} per class; fine-tuning "
            f"{self.epochs} epochs = {self.steps} steps):",
            f"  {'':<36}{'top-1':>8}{'minutes':>9}",
        ]
        lines += [
            f"  {name:<36}{value:7.2f}%" + (f"{minutes:9.1f}" if minutes is not None else "")
            for name, value, minutes in self.rows()
        ]
        return "\n".join(lines)


__all__ = [
    "RANDOM_INIT",
    "FinetuneAccuracies",
    "FinetuneResult",
    "FinetuneSettings",
    "balanced_subset",
    "classifier_accuracy",
    "finetune_classifier",
    "new_head",
]
