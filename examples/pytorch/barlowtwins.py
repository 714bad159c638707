# %% [markdown]
# # Barlow Twins in a plain PyTorch training loop
#
# Barlow Twins (Zbontar et al., 2021, https://arxiv.org/abs/2103.03230) with the
# `barlowtwins` library, offline on a CPU (or a GPU when there is one), on Fashion-MNIST from
# the Debian package `dataset-fashion-mnist`. From the command line:
#
#     python examples/pytorch/barlowtwins.py --epochs 1 --max-samples 2048
#
# The notebook trains one epoch on 2048 images, a minute or two on 2 CPU cores. For the full
# run (10 epochs on all 60 000 images), call `parser.parse_args([])` below instead.

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description="Barlow Twins in a plain PyTorch training loop.")
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
import torch
from torch import nn
from torch.utils.data import DataLoader

from barlowtwins import BarlowTwinsLoss, BarlowTwinsProjectionHead
from barlowtwins.backbones import build_backbone
from barlowtwins.data import load_data
from barlowtwins.optim import build_optimizer, build_warmup_cosine_scheduler
from barlowtwins.views.batched import BatchedBarlowTwinsAugment


class BarlowTwins(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BarlowTwinsProjectionHead(feature_dim, 2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


# %%
# A ResNet-18 (standard stem: cheap on a CPU at 28 px); Fashion-MNIST has one channel.
dataset = load_data(
    args.data, image_size=args.image_size, download=args.download, max_samples=args.max_samples
)
backbone, feature_dim = build_backbone("resnet18", in_channels=dataset.channels, small_image=False)
device = "cuda" if torch.cuda.is_available() else "cpu"
model = BarlowTwins(backbone, feature_dim).to(device)

# Both views are augmented per sample, as a batch on the device.
augment = BatchedBarlowTwinsAugment(args.image_size, channels=dataset.channels)
dataloader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

criterion = BarlowTwinsLoss()
optimizer = build_optimizer(model, name="lars", batch_size=args.batch_size)
scheduler = build_warmup_cosine_scheduler(
    optimizer, warmup_steps=len(dataloader), total_steps=args.epochs * len(dataloader)
)

# %%
print("Starting Training")
for epoch in range(args.epochs):
    total_loss = 0.0
    # Each item also carries its source image's size: crops are cut from the whole image.
    for images, _, _, sizes in dataloader:
        x0, x1 = augment(images.to(device), sizes=sizes.to(device))
        loss = criterion(model(x0), model(x1))
        total_loss += loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    print(f"epoch: {epoch:>02}, loss: {total_loss / len(dataloader):.5f}")
