"""The Barlow Twins loss.

Reference:
    Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from barlowtwins.distributed import global_count, global_sum

# Same epsilon as torch.nn.BatchNorm1d, which the paper's released code uses to standardise.
_BATCHNORM_EPS = 1e-5


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class BarlowTwinsLoss(nn.Module):
    """Redundancy-reduction loss of Barlow Twins (paper Eq. 1 and Algorithm 1).

    Each view's embeddings are standardised over the batch, their cross-correlation matrix
    ``c = z_a^T z_b / N`` is pushed towards the identity::

        loss = sum_i (1 - c_ii)^2 + lambda_param * sum_{i != j} c_ij^2

    The loss is computed in float32 (float64 for float64 input) even under autocast: the
    cross-correlation of thousands of features loses the loss in bfloat16.

    With ``gather_distributed=True`` under an initialised process group, the statistics, ``N``
    and ``c`` cover the *global* batch of all ranks, every rank returns the global loss, and
    after DDP averages parameter gradients they equal those of one process on the concatenated
    global batch — also when the ranks' shards differ in content or size. Only per-feature sums
    and the ``D x D`` matrix ``c`` cross the network, with differentiable collectives (see
    :mod:`barlowtwins.distributed`).

    Args:
        lambda_param: Weight of the redundancy-reduction (off-diagonal) term. The paper's text
            gives 5e-3; its released code uses 0.0051.
        gather_distributed: Use global-batch statistics across all processes.

    Examples:
        >>> loss_fn = BarlowTwinsLoss()
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(z_a, z_b)
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        if lambda_param < 0:
            raise ValueError(f"lambda_param must be >= 0, got {lambda_param}")
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Compute the loss of two batches of embeddings of shape (batch, features)."""
        _check_embeddings(z_a, z_b)
        dtype = torch.float64 if torch.float64 in (z_a.dtype, z_b.dtype) else torch.float32
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = z_a.to(dtype), z_b.to(dtype)
            c = cross_correlation(z_a, z_b, gather_distributed=self.gather_distributed)
            on_diag = (1 - c.diagonal()).square().sum()
            # ||c||^2 - ||diag(c)||^2: no D x D mask or temporary beyond c itself.
            off_diag = _squared_norm(c) - c.diagonal().square().sum()
            return on_diag + self.lambda_param * off_diag


def cross_correlation(z_a: Tensor, z_b: Tensor, *, gather_distributed: bool = False) -> Tensor:
    """Cross-correlation matrix ``c = z_a^T z_b / N`` of batch-standardised embeddings.

    Args:
        z_a: Embeddings of the first view, (batch, features).
        z_b: Embeddings of the second view, same shape.
        gather_distributed: Statistics and ``N`` over the global batch of all ranks.

    Returns:
        The (features x features) matrix; the identity is the Barlow Twins optimum.
    """
    total = global_sum if gather_distributed else _identity
    n = global_count(z_a.size(0), z_a.device) if gather_distributed else z_a.size(0)
    if n < 2:
        raise ValueError(f"batch size must be >= 2 to standardise over it, got {n}")
    return total(_standardize(z_a, n, total).T @ _standardize(z_b, n, total)) / n


def _standardize(z: Tensor, n: int, total: Callable[[Tensor], Tensor]) -> Tensor:
    """Zero mean, unit (biased) variance per feature over a batch of ``n`` samples.

    ``total`` sums a per-rank quantity over the batch's shards (identity for one process).
    """
    mean = total(z.sum(dim=0)) / n
    centred = z - mean
    var = total(centred.square().sum(dim=0)) / n
    return centred * torch.rsqrt(var + _BATCHNORM_EPS)


def _squared_norm(c: Tensor) -> Tensor:
    flat = c.reshape(-1)
    return flat.dot(flat)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _check_embeddings(z_a: Tensor, z_b: Tensor) -> None:
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if z.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D (batch, features), got shape {tuple(z.shape)}; "
                "flatten or project the embeddings first"
            )
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
