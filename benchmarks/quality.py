"""Quality at equal wall-clock: ``barlowtwins fit`` defaults vs lightly's example recipe.

1. barlowtwins: ``python -m barlowtwins fit`` with its defaults (Fashion-MNIST, offline) in a
   fresh output directory (or the finished run given by ``--run``); its ``results.json``
   gives the test kNN accuracy and the minutes its ``trainer.fit`` took.
2. lightly: the recipe of its Barlow Twins example (``examples/pytorch/barlowtwins.py``):
   ``BYOLTransform`` views on PIL images in a DataLoader, ``BarlowTwinsProjectionHead(512,
   2048, 2048)``, ``BarlowTwinsLoss``, SGD at lr 0.06, batch 256, float32, on the same
   backbone architecture as barlowtwins' default (a torchvision ResNet-10; RGB input, as the
   example's transform makes RGB views) and the same training images, trained for the same
   number of seconds as step 1's ``trainer.fit``.
3. Both encoders are scored with the same protocol as ``fit``'s own summary: weighted kNN
   (cosine, temperature 0.1, k = 200), all 60000 training images voting for each of the 10000
   test images.
4. Time to accuracy: ``fit``'s online kNN monitor scores the 10000 test images after every
   epoch with 10000 training images voting (``val_knn_acc``, logged beside ``train_minutes``,
   the wall-clock minutes of training so far, monitor included). lightly's encoder is scored
   the same way, with the same 10000 voters, when its training clock passes each of those
   minutes (its clock stops while it is scored, which favours lightly). ``--plot`` draws both
   curves with the final 60000-voter scores.

The two runs take turns on the machine (not interleaved: each is one long training run), so
run it on an otherwise idle machine. It takes about twice the default fit's time (~25 min on
2 CPU cores).

Run ``python benchmarks/quality.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from barlowtwins.backbones import resnet10
from barlowtwins.data import InMemoryImages, load_data
from barlowtwins.evaluation import extract_features, knn_accuracy
from barlowtwins.training.callbacks import TRAIN_MINUTES
from barlowtwins.views.view_config import IMAGENET_MEAN, IMAGENET_STD

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
        "--run",
        type=Path,
        help="a finished fit run (e.g. the quickstart's runs/barlowtwins) to compare instead of "
        "training one; it must have run on this machine, alone, for its minutes to count",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="lightly's DataLoader worker processes (its example uses 8; default: 2)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="write the time-to-accuracy plot (PNG) here, e.g. docs/images/time_to_accuracy.png",
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


def _online_curve(output: Path) -> list[tuple[float, float]]:
    """(train_minutes, val_knn_acc) after each epoch of a fit run, from its metrics.csv."""
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    minutes = {row["epoch"]: float(row[TRAIN_MINUTES]) for row in rows if row.get(TRAIN_MINUTES)}
    accuracy = {row["epoch"]: float(row["val_knn_acc"]) for row in rows if row.get("val_knn_acc")}
    return sorted((minutes[epoch], accuracy[epoch]) for epoch in minutes if epoch in accuracy)


def _train_lightly(
    images: torch.Tensor,
    seconds: float,
    workers: int,
    score_at: list[float],
    score: Callable[[nn.Module], float],
) -> tuple[nn.Module, list[tuple[float, float]]]:
    """lightly's example recipe on ``images`` for ``seconds`` of training.

    Returns:
        Its backbone, and (minutes, ``score(backbone)``) each time its training clock passed
        one of ``score_at`` (seconds); the clock stops while it is scored.
    """
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
    marks, curve = sorted(score_at), []
    steps, trained, started = 0, 0.0, time.perf_counter()
    while trained < seconds:
        for view_a, view_b in loader:
            loss = criterion(model(view_a), model(view_b))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            trained = time.perf_counter() - started
            while marks and trained >= marks[0]:
                marks.pop(0)
                model.eval()
                curve.append((trained / 60, score(backbone)))
                model.train()
                started = time.perf_counter() - trained  # the clock stood still meanwhile
            if trained >= seconds:
                break
    print(f"lightly: {steps} steps in {trained / 60:.2f} min, last loss {loss.item():.1f}")
    return backbone, curve


def _lightly_knn(backbone: nn.Module, bank: InMemoryImages, test: InMemoryImages) -> float:
    """Test kNN accuracy of lightly's backbone with ``bank``'s images voting."""

    def features(images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1)
        return extract_features(backbone, rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    return knn_accuracy(
        features(bank.images),
        bank.labels,
        features(test.images),
        test.labels,
        num_classes=10,
        k=_KNN_K,
        temperature=0.1,
    )


def _plot(
    path: Path,
    curves: dict[str, list[tuple[float, float]]],
    finals: dict[str, tuple[float, float]],
    machine: str,
    *,
    voters: int,
    final_voters: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    styles = (("tab:blue", -16), ("tab:orange", 8))  # colour, label offset in points
    for (name, curve), (colour, offset) in zip(curves.items(), styles, strict=True):
        xs, ys = zip(*curve, strict=True) if curve else ((), ())
        axes.plot(xs, ys, "o-", color=colour, label=f"{name} ({voters} voters)")
        minutes, accuracy = finals[name]
        axes.plot([minutes], [accuracy], "*", color=colour, markersize=13)
        axes.annotate(
            f"{accuracy:.2f} %",
            (minutes, accuracy),
            xytext=(-50, offset),
            textcoords="offset points",
            color=colour,
        )
    axes.set_xlabel("wall-clock minutes of training")
    axes.set_ylabel(f"Fashion-MNIST test kNN accuracy, k={_KNN_K} (%)")
    axes.set_title(
        f"Time to accuracy; stars: all {final_voters} training images vote\n"
        + machine.splitlines()[0],
        fontsize=9,
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    """Train both recipes for the same time and compare their test kNN accuracy."""
    args = _parse_args()
    _common.require_lightly()
    device = _common.setup(args)
    if device.type != "cpu":
        raise SystemExit("quality.py compares the CPU recipes; run it with --device cpu")
    machine = _common.describe_machine(device)
    print(machine)
    with tempfile.TemporaryDirectory() as scratch:
        if args.run is not None:
            output = args.run
            if not (output / "results.json").is_file():
                raise SystemExit(f"{output} is not a finished fit run (no results.json)")
            ours = json.loads((output / "results.json").read_text())
        else:
            output = args.output or Path(scratch) / "barlowtwins"
            if output.exists():
                raise SystemExit(f"{output} exists; give a new --output (fit would resume it)")
            ours = _run_barlowtwins(output, args.fit_args)
        our_curve = _online_curve(output)
        config = yaml.safe_load((output / "config.yaml").read_text())
    knn = ours["knn"]
    ours_at_k = knn["protocols"][f"k={knn['k']} T={knn['temperature']:g}"]["top1"]
    if knn["k"] != _KNN_K:
        raise SystemExit(f"fit scored with k={knn['k']}; run it with the default k={_KNN_K}")
    # results.json rounds the minutes to 0.01: lightly trains at least until fit's last epoch.
    seconds = max([60 * float(ours["training_minutes"]), *(60 * m for m, _ in our_curve)])
    print(f"\nbarlowtwins: trainer.fit took {seconds / 60:.2f} min; lightly gets the same\n")
    # The images fit trained on and scored with (all of Fashion-MNIST unless --fit-args cut it).
    train = load_data(config["data"], max_samples=config["max_samples"])
    test = load_data(config["val_data"], max_samples=config["val_max_samples"])
    if not (isinstance(train, InMemoryImages) and isinstance(test, InMemoryImages)):
        raise SystemExit("quality.py compares on Fashion-MNIST; do not give --data")
    # fit's monitor bank: the first knn_bank_size images of a permutation drawn from its seed.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config["seed"]))
    bank = train.subset(order[: config["knn_bank_size"]])
    backbone, their_curve = _train_lightly(
        train.images,
        seconds,
        args.workers,
        score_at=[60 * minutes for minutes, _ in our_curve],
        score=lambda encoder: _lightly_knn(encoder, bank, test),
    )
    theirs = _lightly_knn(backbone, train, test)
    print(f"time to accuracy (minutes, test kNN with {len(bank)} voters):")
    print(f"  barlowtwins: {', '.join(f'{m:.1f} min {a:.2f} %' for m, a in our_curve)}")
    print(f"  lightly:     {', '.join(f'{m:.1f} min {a:.2f} %' for m, a in their_curve)}")
    if args.plot:
        _plot(
            args.plot,
            {"barlowtwins fit": our_curve, "lightly example": their_curve},
            {
                "barlowtwins fit": (
                    seconds / 60,
                    float(ours_at_k["barlow twins"]),
                ),
                "lightly example": (seconds / 60, theirs),
            },
            machine,
            voters=len(bank),
            final_voters=len(train),
        )
    _common.print_summary(
        f"Fashion-MNIST test kNN accuracy (k={_KNN_K}, cosine, T=0.1) after "
        f"{seconds / 60:.1f} min of training each:",
        [
            _common.Comparison(
                "quality at equal wall-clock",
                float(ours_at_k["barlow twins"]),
                theirs,
                "%",
                (theirs + _TARGET_POINTS) / theirs,
                higher_is_better=True,
            )
        ],
    )
    print(
        f"difference: {float(ours_at_k['barlow twins']) - theirs:+.2f} points "
        f"(target +{_TARGET_POINTS:g}); random init {ours_at_k['random init']:.2f} %, "
        f"raw pixels {ours_at_k['raw pixels']:.2f} %"
    )


if __name__ == "__main__":
    main()
