# %% [markdown]
# # Barlow Twins with Lightning Distributed Data Parallel (DDP)
#
# Barlow Twins (Zbontar et al., 2021, https://arxiv.org/abs/2103.03230) with the
# `barlowtwins` library, on all GPUs when there are any, else on 2 CPU processes (gloo),
# offline on Fashion-MNIST from the Debian package `dataset-fashion-mnist`. From the
# command line:
#
#     python examples/pytorch_lightning_distributed/barlowtwins.py --epochs 1 --max-samples 2048
#
# Across nodes, start it on each node with torchrun (or srun under SLURM), e.g. two nodes of
# one process each:
#
#     torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST \
#         --master-port 29500 examples/pytorch_lightning_distributed/barlowtwins.py \
#         --devices 1 --num-nodes 2
#
# It differs from the single-device version in three lines: the DDP strategy, batch norms
# over the global batch (`GlobalBatchNormSync`: `torch.nn.SyncBatchNorm` on GPUs, our
# `GlobalBatchNorm` on CPU), and a loss whose statistics are taken over all processes
# (`gather_distributed=True`). With both, W processes compute exactly the loss and gradients
# of one process on the global batch. `--batch-size` is that global batch, as in the paper:
# the data module gives each of the W processes `batch_size / W` images a step, each process
# draws its own augmentations, and the learning rate follows the global batch.
#
# The notebook trains one epoch on 2048 images with `--strategy ddp_notebook`, which forks
# the kernel into the 2 processes (the script's `ddp` starts them by running the script
# again, which a notebook cannot). For the full run (10 epochs on all 60 000 images), call
# `parser.parse_args(["--strategy", "ddp_notebook"])` below instead.

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description="Barlow Twins with Lightning DDP.")
parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or an image folder")
parser.add_argument("--download", action="store_true", help="download Fashion-MNIST if absent")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=256, help="global, over all processes")
parser.add_argument("--max-samples", type=int, default=None, help="train on a subset")
parser.add_argument("--image-size", type=int, default=28)
parser.add_argument(
    "--devices", type=int, default=None, help="per node (default: all GPUs or 2 CPUs)"
)
parser.add_argument("--num-nodes", type=int, default=1)
parser.add_argument("--strategy", default="ddp", help="ddp, or ddp_notebook inside Jupyter")

# The example scripts are named like the package: keep their folder off the import path.
sys.path[:] = [p for p in sys.path if not Path(p or ".", "barlowtwins.py").is_file()]

# %% tags=["active-py"]
args = parser.parse_args()

# %% tags=["active-ipynb"]
# args = parser.parse_args(["--epochs", "1", "--max-samples", "2048", "--strategy", "ddp_notebook"])

# %%
import lightning as L
import torch

from barlowtwins import Hyperparameters
from barlowtwins.data import load_data
from barlowtwins.training.callbacks import GlobalBatchNormSync
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

dataset = load_data(
    args.data, image_size=args.image_size, download=args.download, max_samples=args.max_samples
)
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
    gather_distributed=True,
)
datamodule = BarlowTwinsDataModule(dataset, batch_size=args.batch_size)

# %%
# Importing Lightning makes this an NVML query that creates no CUDA context, so that
# ddp_notebook can still fork the processes on GPUs.
on_gpu = torch.cuda.is_available()
trainer = L.Trainer(
    max_epochs=args.epochs,
    accelerator="gpu" if on_gpu else "cpu",
    devices=args.devices or ("auto" if on_gpu else 2),
    num_nodes=args.num_nodes,
    strategy=args.strategy,
    plugins=[GlobalBatchNormSync()],
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model=model, datamodule=datamodule)
# Every rank holds the same global loss.
print(f"rank {trainer.global_rank}: train_loss {trainer.callback_metrics['train_loss']:.6f}")
