"""The supervised ceiling: the same network as ``barlowtwins fit``'s default, trained with all
the labels in the same wall-clock minutes, scored by the same kNN protocols.

How much of the supervised accuracy does a label-free run reach? This trains ``fit``'s
default backbone (ResNet-10, standard stem, Fashion-MNIST at 28 px, 1 channel) with a linear
classifier on all 60 000 labelled training images: one view per image (random horizontal flip
and a 2-pixel pad-and-crop), cross-entropy, SGD with Nesterov momentum 0.9 and weight decay
5e-4, a one-cycle learning rate to 0.2 (Smith & Topin 2017, arXiv 1708.07120; the schedule of
the CIFAR-10 speedruns, e.g. KellerJordan/cifar10-airbench), batch 256, in the precision ``fit``
picks for the machine. Training stops when ``--minutes`` are spent (the one-cycle schedule is
sized from the speed of the first steps, and re-sized after each epoch from the time taken);
``--run RUN`` takes the minutes from a finished ``fit`` run's ``results.json``
(``training_minutes``), so both sides get the same budget. Then it reports the classifier's
test accuracy, and the weighted kNN of the backbone's features with both common protocols
(k=20, T=0.07 as solo-learn and DINO; k=200, T=0.1 as InstDisc and lightly), next to the raw
pixels scored the same way.

Run ``python benchmarks/supervised.py --help`` for the options; the README's results table has
its row.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from barlowtwins.backbones import build_backbone
from barlowtwins.data import InMemoryImages, load_data
from barlowtwins.evaluation import extract_features, knn_accuracy, raw_pixel_features
from barlowtwins.evaluation.results import STANDARD_KNN
from barlowtwins.precision import autocast, cpu_name, default_precision
from barlowtwins.views.view_config import default_normalization

_BATCH = 256
_PEAK_LR = 0.2
_WEIGHT_DECAY = 5e-4
_PAD = 2
# Steps timed before the schedule is sized (the first ones pay for kernel selection).
_PROBE_STEPS = 10


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock minutes of training")
    budget.add_argument(
        "--run", type=Path, help="a finished fit run: train as long as its training_minutes"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--max-samples", type=int, default=None, help="train and test on subsets (a smoke test)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Per-sample random horizontal flip and 2-pixel pad-and-crop (zero border), in [0, 1]."""
    batch, _, height, width = images.shape
    x = images.float().div_(255)
    flip = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD))
    shifts = torch.randint(0, 2 * _PAD + 1, (batch, 2), generator=generator)
    rows = (shifts[:, 0:1] + torch.arange(height)).view(batch, 1, height, 1)
    cols = (shifts[:, 1:2] + torch.arange(width)).view(batch, 1, 1, width)
    index = torch.arange(batch).view(batch, 1, 1, 1)
    return padded[index, torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    minutes = args.minutes
    if args.run is not None:
        minutes = float(json.loads((args.run / "results.json").read_text())["training_minutes"])
    precision = default_precision("cpu")
    train = load_data("fashion-mnist:train", max_samples=args.max_samples)
    test = load_data("fashion-mnist:test", max_samples=args.max_samples)
    assert isinstance(train, InMemoryImages) and isinstance(test, InMemoryImages)
    assert train.labels is not None and test.labels is not None
    mean, std = default_normalization(1)
    backbone, features = build_backbone("resnet10", in_channels=1, small_image=False)
    backbone = backbone.to(memory_format=torch.channels_last)
    head = nn.Linear(features, 10)
    model = nn.Sequential(backbone, head)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(
        parameters, lr=_PEAK_LR, momentum=0.9, nesterov=True, weight_decay=_WEIGHT_DECAY
    )
    generator = torch.Generator().manual_seed(args.seed)
    mean_t, std_t = torch.tensor(mean).view(1, 1, 1, 1), torch.tensor(std).view(1, 1, 1, 1)
    batch = min(_BATCH, len(train))
    steps_per_epoch = len(train) // batch

    def step(indices: Tensor, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = ((_augment(train.images[indices], generator) - mean_t) / std_t).contiguous(
            memory_format=torch.channels_last
        )
        with autocast("cpu", precision):
            loss = F.cross_entropy(model(x), train.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    budget = minutes * 60
    started = time.perf_counter()
    # One-cycle: linear warm-up over the first 25 % of the steps, then cosine to 0.
    planned = None
    done = 0
    epoch = 0
    while True:
        order = torch.randperm(len(train), generator=generator)
        for index in range(steps_per_epoch):
            elapsed = time.perf_counter() - started
            if planned is None and done == _PROBE_STEPS:
                planned = max(done + 1, math.floor(budget / (elapsed / done)))
            if planned is not None and (done >= planned or elapsed >= budget):
                break
            total = planned or 10**9
            warm = max(1, total // 4)
            lr = (
                _PEAK_LR * (done + 1) / warm
                if done < warm
                else _PEAK_LR * 0.5 * (1 + math.cos(math.pi * (done - warm) / (total - warm)))
            )
            step(order[index * batch : (index + 1) * batch], lr)
            done += 1
        else:
            epoch += 1
            # Re-size the schedule from the real pace (the probe's steps ran cold).
            pace = (time.perf_counter() - started) / done
            planned = max(done + 1, math.floor(budget / pace))
            continue
        break
    trained = (time.perf_counter() - started) / 60

    model.eval()
    with torch.no_grad(), autocast("cpu", precision):
        correct = 0
        for start in range(0, len(test), 1024):
            x = ((test.images[start : start + 1024].float() / 255 - mean_t) / std_t).contiguous(
                memory_format=torch.channels_last
            )
            correct += int((model(x).argmax(1) == test.labels[start : start + 1024]).sum())
    head_accuracy = 100 * correct / len(test)
    options = {"mean": mean, "std": std, "precision": precision}
    train_features = extract_features(backbone, train, **options)
    test_features = extract_features(backbone, test, **options)
    pixels = raw_pixel_features(train.images), raw_pixel_features(test.images)
    knn = {}
    for protocol in STANDARD_KNN:
        scores = {}
        for name, (bank, queries) in {
            "supervised": (train_features, test_features),
            "raw pixels": pixels,
        }.items():
            scores[name] = knn_accuracy(
                bank,
                train.labels,
                queries,
                test.labels,
                num_classes=10,
                k=protocol.k,
                temperature=protocol.temperature,
            )
        knn[protocol.label] = scores
    results = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, {precision}",
        "budget_minutes": round(minutes, 2),
        "training_minutes": round(trained, 2),
        "steps": done,
        "epochs": round(done / steps_per_epoch, 2),
        "head_test_accuracy": round(head_accuracy, 2),
        "knn": {name: {k: round(v, 2) for k, v in s.items()} for name, s in knn.items()},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
