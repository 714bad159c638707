"""The Barlow Twins network: a backbone followed by a projector."""

from __future__ import annotations

from torch import Tensor, nn

from barlowtwins.backbones import build_backbone
from barlowtwins.heads import BarlowTwinsProjectionHead


class BarlowTwins(nn.Module):
    """Backbone ``f`` and projector ``g`` of Barlow Twins; ``forward`` returns ``g(f(x))``.

    After pretraining only the backbone is kept: :meth:`features` gives the representation
    used downstream (the paper evaluates the ResNet's 2048-d pooled output).

    Args:
        backbone: Module mapping images (B, C, H, W) to features (B, feature_dim).
        feature_dim: Size of the backbone's features.
        projector_dims: Hidden and output sizes of the projector, e.g. (8192, 8192, 8192) for
            the paper's three layers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projector_dims: tuple[int, ...] = (8192, 8192, 8192),
    ) -> None:
        super().__init__()
        if not projector_dims:
            raise ValueError("projector_dims needs at least one size (the output size)")
        if len(set(projector_dims[:-1])) > 1:
            raise ValueError(f"hidden projector sizes must be equal, got {projector_dims}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = BarlowTwinsProjectionHead(
            input_dim=feature_dim,
            hidden_dim=projector_dims[0],
            output_dim=projector_dims[-1],
            num_layers=len(projector_dims),
        )

    @classmethod
    def from_name(
        cls,
        backbone: str = "resnet50",
        *,
        in_channels: int = 3,
        small_image: bool = False,
        projector_dims: tuple[int, ...] = (8192, 8192, 8192),
        zero_init_residual: bool = False,
        dirac_init: bool = False,
        small_output_convolutions: bool = False,
    ) -> BarlowTwins:
        """Build the model around a named backbone (see :func:`build_backbone`)."""
        module, feature_dim = build_backbone(
            backbone,
            in_channels=in_channels,
            small_image=small_image,
            zero_init_residual=zero_init_residual,
            dirac_init=dirac_init,
            small_output_convolutions=small_output_convolutions,
        )
        return cls(module, feature_dim, projector_dims)

    def features(self, x: Tensor) -> Tensor:
        """Backbone representation of images, shape (B, feature_dim)."""
        return self.backbone(x).flatten(start_dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings fed to the loss, shape (B, projector_dims[-1])."""
        return self.projector(self.features(x))
