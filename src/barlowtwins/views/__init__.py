"""The augmented views of Barlow Twins and the evaluation view, by concept: their
configuration (:mod:`.view_config`), the per-sample PIL transform (:mod:`.pil`), the batched
on-device augmentation (:mod:`.batched`) and its stateless kernels (:mod:`.kernels`), and the
deterministic view that evaluation and the monitors feed the backbone (:mod:`.eval_view`)."""

from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.eval_view import prepare_images
from barlowtwins.views.pil import BarlowTwinsTransform
from barlowtwins.views.view_config import ViewConfig, barlow_twins_views

__all__ = [
    "BarlowTwinsTransform",
    "BatchedBarlowTwinsAugment",
    "ViewConfig",
    "barlow_twins_views",
    "prepare_images",
]
