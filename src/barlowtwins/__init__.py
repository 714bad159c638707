"""Barlow Twins self-supervised learning, exact under distribution and fast on CPU and GPU.

Reference:
    Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    ICML 2021. https://arxiv.org/abs/2103.03230
"""

from barlowtwins.heads import BarlowTwinsProjectionHead
from barlowtwins.loss import BarlowTwinsLoss

__all__ = ["BarlowTwinsLoss", "BarlowTwinsProjectionHead"]
__version__ = "0.1.0"
