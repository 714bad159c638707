"""Quick recipe comparison on Fashion-MNIST: a fixed number of training steps, then test kNN.

The tool behind the README's table of recipe choices. It trains a ResNet-10 (standard stem,
28 px, grey) with the library's pieces in a plain loop, without Lightning: per-sample batched
augmentation (:class:`BatchedBarlowTwinsAugment`), :class:`BarlowTwinsLoss`, the optimiser of
:func:`build_optimizer`, and a warm-up + cosine schedule over ``--steps`` steps. It then
scores the backbone with a weighted kNN (cosine, temperature 0.1) at k = 5, 20 and 200, with
the first ``--bank`` training images voting for each of the 10 000 test images. The number of
steps is fixed (not the time), so runs compare fairly even on a busy machine.

Examples::

    python benchmarks/recipe.py --baselines             # random init and raw pixels
    python benchmarks/recipe.py                          # session 1's recipe, 240 steps
    python benchmarks/recipe.py --crop 1 --lr 0.6 --lr-biases 0.0144 --projector 1024 1024 1024
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from barlowtwins import (
    BarlowTwins,
    BarlowTwinsLoss,
    BatchedBarlowTwinsAugment,
    build_optimizer,
    build_warmup_cosine_scheduler,
)
from barlowtwins.data import load_fashion_mnist
from barlowtwins.evaluation import extract_features, knn_accuracy, raw_pixel_features
from barlowtwins.views.view_config import barlow_twins_views, resolve_normalization

_KS = (5, 20, 200)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=240, help="training steps (default: 240)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--optimizer", default="lars", help="lars, sgd or adamw")
    parser.add_argument("--lr", type=float, default=0.2, help="base LR of weights")
    parser.add_argument("--lr-biases", type=float, default=0.0048, help="base LR of biases")
    parser.add_argument("--weight-decay", type=float, default=1.5e-6)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    parser.add_argument("--crop", type=float, default=0.2, help="smallest crop area fraction")
    parser.add_argument("--projector", type=int, nargs="+", default=[2048, 2048, 2048])
    parser.add_argument("--lambda-param", type=float, default=5e-3)
    parser.add_argument("--bank", type=int, default=10000, help="training images that vote")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baselines", action="store_true", help="score the random-init encoder and raw pixels"
    )
    return parser.parse_args()


def _knn(
    bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, labels: torch.Tensor
) -> dict[int, float]:
    return {
        k: round(knn_accuracy(bank, bank_labels, test, labels, num_classes=10, k=k), 2) for k in _KS
    }


def main() -> None:
    """Train one recipe for a fixed number of steps and print its test kNN accuracy."""
    args = _parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    bank, bank_labels = train.images[: args.bank], train.labels[: args.bank]
    mean, std = resolve_normalization(1, None, None)
    model = BarlowTwins.from_name(
        "resnet10",
        in_channels=1,
        projector_dims=tuple(args.projector),
        small_output_convolutions=True,  # a CPU benchmark, as fit on a CPU
    ).to(memory_format=torch.channels_last)
    results: dict[str, object] = {"recipe": vars(args)}
    if args.baselines:
        results["raw pixels"] = _knn(
            raw_pixel_features(bank), bank_labels, raw_pixel_features(test.images), test.labels
        )
    else:
        view_a, view_b = barlow_twins_views(28, 1, crop_scale=(args.crop, 1.0))
        augment = BatchedBarlowTwinsAugment(28, 1, view_a, view_b, mean=mean, std=std)
        loss_fn = BarlowTwinsLoss(args.lambda_param)
        optimizer = build_optimizer(
            model,
            name=args.optimizer,
            batch_size=args.batch,
            lr_weights=args.lr,
            lr_biases=args.lr_biases,
            weight_decay=args.weight_decay,
        )
        # The library's schedule: linear warm-up, then cosine down to 1/1000 (as fit's).
        schedule = build_warmup_cosine_scheduler(
            optimizer, warmup_steps=int(args.warmup * args.steps), total_steps=args.steps
        )
        step, started = 0, time.perf_counter()
        while step < args.steps:
            order = torch.randperm(len(train))
            for start in range(0, len(train) - args.batch + 1, args.batch):
                if step == args.steps:
                    break
                views = augment(train.images[order[start : start + args.batch]])
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                loss = loss_fn(model(views[0]), model(views[1]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
        seconds = time.perf_counter() - started
        results["images/s"] = round(step * args.batch / seconds, 1)
        results["final loss"] = round(loss.item(), 1)
    name = "random init" if args.baselines else "trained"
    features = [
        extract_features(model.backbone, images, mean=mean, std=std)
        for images in (bank, test.images)
    ]
    results[name] = _knn(features[0], bank_labels, features[1], test.labels)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
