"""Quality at equal wall-clock: ``barlowtwins fit`` defaults vs lightly's example recipe.

1. barlowtwins: ``python -m barlowtwins fit`` with its defaults (Fashion-MNIST, offline) in a
   fresh output directory; its ``results.json`` gives the test kNN accuracy and the minutes
   its ``trainer.fit`` took.
2. lightly: the recipe of its Barlow Twins example (``examples/pytorch/barlowtwins.py``):
   ``BYOLTransform`` views on PIL images in a DataLoader, ``BarlowTwinsProjectionHead(512,
   2048, 2048)``, ``BarlowTwinsLoss``, SGD at lr 0.06, batch 256, float32, on the same
   backbone architecture as barlowtwins' default (a torchvision ResNet-10; RGB input, as the
   example's transform makes RGB views) and the same training images, trained for the same
   number of seconds as step 1's ``trainer.fit``.
3. Both encoders are scored with the same protocol as ``fit``'s own summary: weighted kNN
   (cosine, temperature 0.1, k = 200), all 60000 training images voting for each of the 10000
   test images.

The two runs take turns on the machine (not interleaved: each is one long training run), so
run it on an otherwise idle machine. It takes about twice the default fit's time (~25 min on
2 CPU cores).

Run ``python benchmarks/quality.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from barlowtwins.backbones import resnet10
from barlowtwins.data import load_fashion_mnist
from barlowtwins.evaluation import extract_features, knn_accuracy
from barlowtwins.views.transforms import IMAGENET_MEAN, IMAGENET_STD

# The target: at least 2 points of test kNN accuracy above lightly.
_TARGET_POINTS = 2.0
# lightly's example: batch 256, SGD at _common.LIGHTLY_LR, no schedule.
_LIGHTLY_BATCH = 256
_KNN_K = 200


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--output",
        type=Path,
        help="directory of barlowtwins' run (default: a temporary one); must not exist",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="lightly's DataLoader worker processes (its example uses 8; default: 2)",
    )
    parser.add_argument(
        "--fit-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra options for barlowtwins fit, e.g. --fit-args --epochs 1 (must come last)",
    )
    _common.add_common_arguments(parser, repeats=1)
    return parser.parse_args()


class _RGBImages(Dataset):
    """Fashion-MNIST as the RGB PIL images the example's transform expects."""

    def __init__(self, images: torch.Tensor, transform: object) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = Image.fromarray(self.images[index, 0].numpy()).convert("RGB")
        return self.transform(image)


def _run_barlowtwins(output: Path, fit_args: list[str]) -> dict[str, object]:
    command = [sys.executable, "-m", "barlowtwins", "fit", "--output", str(output), *fit_args]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit("barlowtwins fit failed")
    return json.loads((output / "results.json").read_text())


def _train_lightly(images: torch.Tensor, seconds: float, workers: int) -> nn.Module:
    """lightly's example recipe on ``images`` for ``seconds`` of training; its backbone."""
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    size = images.shape[-1]
    resnet = resnet10()
    backbone = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(start_dim=1))
    model = nn.Sequential(backbone, BarlowTwinsProjectionHead(512, 2048, 2048))
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size),
        view_2_transform=BYOLView2Transform(input_size=size),
    )
    loader = DataLoader(
        _RGBImages(images, transform),
        batch_size=_LIGHTLY_BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    criterion = BarlowTwinsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=_common.LIGHTLY_LR)
    model.train()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for view_a, view_b in loader:
            loss = criterion(model(view_a), model(view_b))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    print(f"lightly: {steps} steps in {elapsed / 60:.2f} min, last loss {loss.item():.1f}")
    return backbone


def _lightly_knn(backbone: nn.Module, train: torch.Tensor, test: torch.Tensor) -> float:
    def features(images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1)
        return extract_features(backbone, rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    return knn_accuracy(
        features(train),
        train_set.labels,
        features(test),
        test_set.labels,
        num_classes=10,
        k=_KNN_K,
        temperature=0.1,
    )


def main() -> None:
    """Train both recipes for the same time and compare their test kNN accuracy."""
    args = _parse_args()
    _common.require_lightly()
    device = _common.setup(args)
    if device.type != "cpu":
        raise SystemExit("quality.py compares the CPU recipes; run it with --device cpu")
    print(_common.describe_machine(device))
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch) / "barlowtwins"
        if output.exists():
            raise SystemExit(f"{output} exists; give a new --output (fit would resume it)")
        ours = _run_barlowtwins(output, args.fit_args)
    knn = ours["knn"]
    if knn["k"] != _KNN_K:
        raise SystemExit(f"fit scored with k={knn['k']}; run it with the default k={_KNN_K}")
    seconds = 60 * float(ours["training_minutes"])
    print(f"\nbarlowtwins: trainer.fit took {seconds / 60:.2f} min; lightly gets the same\n")
    train = load_fashion_mnist("train").images
    backbone = _train_lightly(train, seconds, args.workers)
    theirs = _lightly_knn(backbone, train, load_fashion_mnist("test").images)
    _common.print_summary(
        f"Fashion-MNIST test kNN accuracy (k={_KNN_K}, cosine, T=0.1) after "
        f"{seconds / 60:.1f} min of training each:",
        [
            _common.Comparison(
                "quality at equal wall-clock",
                float(knn["barlow twins"]),
                theirs,
                "%",
                (theirs + _TARGET_POINTS) / theirs,
                higher_is_better=True,
            )
        ],
    )
    print(
        f"difference: {float(knn['barlow twins']) - theirs:+.2f} points "
        f"(target +{_TARGET_POINTS:g}); random init {knn['random init']:.2f} %, "
        f"raw pixels {knn['raw pixels']:.2f} %"
    )


if __name__ == "__main__":
    main()
