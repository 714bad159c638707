"""Barlow Twins as a LightningModule trained by ``lightning.Trainer``.

Runs offline on a CPU by default, on Fashion-MNIST from the Debian package
dataset-fashion-mnist:

    python examples/pytorch_lightning/barlowtwins.py --epochs 1 --max-samples 2048

Reference: Zbontar et al., "Barlow Twins", 2021. https://arxiv.org/abs/2103.03230
"""

import argparse
import sys
from pathlib import Path

# This file is named like the package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


import lightning as L

from barlowtwins.data import load_data
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or an image folder")
parser.add_argument("--download", action="store_true", help="download Fashion-MNIST if absent")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--max-samples", type=int, default=None, help="train on a subset")
parser.add_argument("--image-size", type=int, default=28)
args = parser.parse_args()

dataset = load_data(
    args.data, image_size=args.image_size, download=args.download, max_samples=args.max_samples
)
# The module holds backbone, projection head, the batched two-view augmentation and the loss.
model = BarlowTwinsModule(
    backbone="resnet18",
    in_channels=dataset.channels,
    image_size=args.image_size,
    small_image=False,
    batch_size=args.batch_size,
    warmup_epochs=min(10, args.epochs / 10),
)
datamodule = BarlowTwinsDataModule(dataset, batch_size=args.batch_size)

trainer = L.Trainer(
    max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False
)
trainer.fit(model=model, datamodule=datamodule)
