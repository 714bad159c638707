"""The two augmented views of Barlow Twins: their configuration and the per-sample PIL
transform (:mod:`.transforms`), and the batched on-device augmentation (:mod:`.batched`)."""

from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.transforms import BarlowTwinsTransform, ViewConfig, barlow_twins_views

__all__ = ["BarlowTwinsTransform", "BatchedBarlowTwinsAugment", "ViewConfig", "barlow_twins_views"]
