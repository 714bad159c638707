"""The Barlow Twins projection head ("projector")."""

from __future__ import annotations

import itertools

from torch import Tensor, nn


class BarlowTwinsProjectionHead(nn.Module):
    """Projector of Barlow Twins: ``num_layers`` linear layers, all but the last followed by
    batch norm and ReLU.

    The paper (§2, "Implementation details") uses three layers of 8192 units on a ResNet-50's
    2048 features; hidden layers have no bias because the batch norm after them removes it.
    The signature matches lightly's ``BarlowTwinsProjectionHead``.

    Reference:
        Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
        ICML 2021. https://arxiv.org/abs/2103.03230

    Args:
        input_dim: Size of the backbone's features.
        hidden_dim: Size of each hidden layer.
        output_dim: Size of the embeddings fed to the loss.
        num_layers: Number of linear layers (>= 1).
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 8192,
        output_dim: int = 8192,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        for name, dim in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("output_dim", output_dim),
        ):
            if dim < 1:
                raise ValueError(f"{name} must be >= 1, got {dim}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for in_dim, out_dim in itertools.pairwise(dims):
            layers += [
                nn.Linear(in_dim, out_dim, bias=False),
                nn.BatchNorm1d(out_dim),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Linear(dims[-1], output_dim, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project features of shape (batch, input_dim) to (batch, output_dim)."""
        return self.layers(x)
