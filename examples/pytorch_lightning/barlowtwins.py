# %% [markdown]
# # Barlow Twins as a LightningModule trained by `lightning.Trainer`
#
# Barlow Twins (Zbontar et al., 2021, https://arxiv.org/abs/2103.03230) with the
# `barlowtwins` library, offline on a CPU (or a GPU when there is one), on Fashion-MNIST from
# the Debian package `dataset-fashion-mnist`. From the command line:
#
#     python examples/pytorch_lightning/barlowtwins.py --epochs 1 --max-samples 2048
#
# The notebook trains one epoch on 2048 images, a minute or two on 2 CPU cores. For the full
# run (10 epochs on all 60 000 images), call `parser.parse_args([])` below instead.

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description="Barlow Twins trained by lightning.Trainer.")
parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or an image folder")
parser.add_argument("--download", action="store_true", help="download Fashion-MNIST if absent")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--max-samples", type=int, default=None, help="train on a subset")
parser.add_argument("--image-size", type=int, default=28)

# The example scripts are named like the package: keep their folder off the import path.
sys.path[:] = [p for p in sys.path if not Path(p or ".", "barlowtwins.py").is_file()]

# %% tags=["active-py"]
args = parser.parse_args()

# %% tags=["active-ipynb"]
# args = parser.parse_args(["--epochs", "1", "--max-samples", "2048"])

# %%
import lightning as L

from barlowtwins import Hyperparameters
from barlowtwins.data import load_data
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

dataset = load_data(
    args.data, image_size=args.image_size, download=args.download, max_samples=args.max_samples
)
# The module holds backbone, projection head, the batched two-view augmentation and the loss.
model = BarlowTwinsModule(
    Hyperparameters(
        backbone="resnet18",
        image_size=args.image_size,
        small_image=False,
        projector_dims=(2048, 2048, 2048),  # the seed's head: 512 -> 2048 -> 2048 -> 2048
        batch_size=args.batch_size,
        warmup_epochs=min(10, args.epochs / 10),
    ),
    in_channels=dataset.channels,
)
datamodule = BarlowTwinsDataModule(dataset, batch_size=args.batch_size)

# %%
trainer = L.Trainer(
    max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False
)
trainer.fit(model=model, datamodule=datamodule)
