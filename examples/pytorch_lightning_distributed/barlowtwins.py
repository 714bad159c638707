"""Barlow Twins with Lightning Distributed Data Parallel (DDP).

Runs on all GPUs when there are any, else on 2 CPU processes (gloo), offline on Fashion-MNIST
from the Debian package dataset-fashion-mnist:

    python examples/pytorch_lightning_distributed/barlowtwins.py --epochs 1 --max-samples 2048

Across nodes, start it on each node with torchrun (or srun under SLURM), e.g. two nodes of
one process each::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST --master-port 29500 \
        examples/pytorch_lightning_distributed/barlowtwins.py --devices 1 --num-nodes 2

The model differs in the following ways from the non-distributed implementation:

- Distributed Data Parallel is enabled.
- Batch norms are synchronised: ``torch.nn.SyncBatchNorm`` on GPUs, our ``GlobalBatchNorm``
  on CPU (``GlobalBatchNormSync`` picks the right one).
- The loss gathers its statistics from all processes (``gather_distributed=True``).

With both, the W processes compute exactly the loss and gradients of one process on the
global batch (``batch_size * W`` images); the learning rate is scaled by that global batch.
Without them each process normalises over its own shard only.

Reference: Zbontar et al., "Barlow Twins", 2021. https://arxiv.org/abs/2103.03230
"""

import argparse
import sys
from pathlib import Path

# This file is named like the package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


import lightning as L
import torch

from barlowtwins.data import load_data
from barlowtwins.training.callbacks import GlobalBatchNormSync
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or an image folder")
parser.add_argument("--download", action="store_true", help="download Fashion-MNIST if absent")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=128, help="per process")
parser.add_argument("--max-samples", type=int, default=None, help="train on a subset")
parser.add_argument("--image-size", type=int, default=28)
parser.add_argument(
    "--devices", type=int, default=None, help="per node (default: all GPUs or 2 CPUs)"
)
parser.add_argument("--num-nodes", type=int, default=1)
args = parser.parse_args()

dataset = load_data(
    args.data, image_size=args.image_size, download=args.download, max_samples=args.max_samples
)
model = BarlowTwinsModule(
    backbone="resnet18",
    in_channels=dataset.channels,
    image_size=args.image_size,
    small_image=False,
    batch_size=args.batch_size,
    warmup_epochs=min(10, args.epochs / 10),
    gather_distributed=True,
)
datamodule = BarlowTwinsDataModule(dataset, batch_size=args.batch_size)

on_gpu = torch.cuda.is_available()
trainer = L.Trainer(
    max_epochs=args.epochs,
    accelerator="gpu" if on_gpu else "cpu",
    devices=args.devices or ("auto" if on_gpu else 2),
    num_nodes=args.num_nodes,
    strategy="ddp",
    plugins=[GlobalBatchNormSync()],
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model=model, datamodule=datamodule)
# Every rank holds the same global loss.
print(f"rank {trainer.global_rank}: train_loss {trainer.callback_metrics['train_loss']:.6f}")
