"""Lightning training: the LightningModule, its DataModule, callbacks and plugins, and
crash-safe checkpoint files."""

from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

__all__ = ["BarlowTwinsDataModule", "BarlowTwinsModule"]
