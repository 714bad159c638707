"""Barlow Twins self-supervised learning, exact under distribution and fast on CPU and GPU.

Reference:
    Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    ICML 2021. https://arxiv.org/abs/2103.03230
"""

from typing import Any

from barlowtwins.backbones import build_backbone
from barlowtwins.heads import BarlowTwinsProjectionHead
from barlowtwins.hparams import Hyperparameters
from barlowtwins.loss import BarlowTwinsLoss
from barlowtwins.mixed_loss import MixedBarlowTwinsLoss, MixUp
from barlowtwins.model import BarlowTwins
from barlowtwins.optim import LARS, build_optimizer, build_warmup_cosine_scheduler
from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.pil import BarlowTwinsTransform
from barlowtwins.views.view_config import ViewConfig, barlow_twins_views

__all__ = [
    "LARS",
    "BarlowTwins",
    "BarlowTwinsLoss",
    "BarlowTwinsModule",
    "BarlowTwinsProjectionHead",
    "BarlowTwinsTransform",
    "BatchedBarlowTwinsAugment",
    "Hyperparameters",
    "MixUp",
    "MixedBarlowTwinsLoss",
    "ViewConfig",
    "barlow_twins_views",
    "build_backbone",
    "build_optimizer",
    "build_warmup_cosine_scheduler",
    "load_pretrained",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The LightningModule imports Lightning: only pay for it when it is asked for.
    if name == "BarlowTwinsModule":
        from barlowtwins.training.module import BarlowTwinsModule

        return BarlowTwinsModule
    if name == "load_pretrained":
        # The loader of runs and exports is the application's; only import it when asked.
        from barlowtwins.runs.loader import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'barlowtwins' has no attribute {name!r}")
