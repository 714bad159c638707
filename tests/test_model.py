from __future__ import annotations

import pytest
import torch

from barlowtwins import BarlowTwins


def test_features_and_embeddings() -> None:
    model = BarlowTwins.from_name("resnet10", in_channels=1, projector_dims=(64, 64, 32))
    x = torch.rand(4, 1, 28, 28)
    assert model.features(x).shape == (4, 512)
    assert model(x).shape == (4, 32)


def test_projector_dims_validation() -> None:
    with pytest.raises(ValueError, match="at least one size"):
        BarlowTwins.from_name("resnet10", projector_dims=())
    with pytest.raises(ValueError, match="hidden projector sizes must be equal"):
        BarlowTwins.from_name("resnet10", projector_dims=(64, 32, 16))
