from __future__ import annotations

import pytest
import torch
from torch import nn

from barlowtwins import BarlowTwinsProjectionHead


def test_paper_defaults_three_layers_of_8192() -> None:
    head = BarlowTwinsProjectionHead()
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2048, 8192),
        (8192, 8192),
        (8192, 8192),
    ]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2


@pytest.mark.parametrize(("num_layers", "expected_bn"), [(1, 0), (2, 1), (4, 3)])
def test_shapes_and_layer_count(num_layers: int, expected_bn: int) -> None:
    head = BarlowTwinsProjectionHead(16, 32, 8, num_layers=num_layers)
    assert head(torch.randn(5, 16)).shape == (5, 8)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == expected_bn
    # The last layer is a plain linear map: no norm or activation after it.
    assert isinstance(head.layers[-1], nn.Linear)


def test_positional_signature_matches_lightly() -> None:
    head = BarlowTwinsProjectionHead(512, 1024, 256)
    assert head(torch.randn(3, 512)).shape == (3, 256)


@pytest.mark.parametrize("kwargs", [{"num_layers": 0}, {"hidden_dim": 0}, {"input_dim": -1}])
def test_bad_sizes_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        BarlowTwinsProjectionHead(**kwargs)


@pytest.mark.parametrize(
    ("input_dim", "hidden_dim", "output_dim"),
    [(8, 16, 32), (8, 32, 16), (16, 8, 32), (16, 32, 8), (32, 8, 16), (32, 16, 8)],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_eval_mode_maps_any_batch_to_output_dim(
    input_dim: int, hidden_dim: int, output_dim: int, batch: int
) -> None:
    # Narrowing, widening and bottleneck shapes; in eval mode even a batch of one works,
    # since the batch norms use their running statistics.
    head = BarlowTwinsProjectionHead(input_dim, hidden_dim, output_dim).eval()
    with torch.no_grad():
        out = head(torch.rand(batch, input_dim))
    assert out.shape == (batch, output_dim)
    assert torch.isfinite(out).all()
