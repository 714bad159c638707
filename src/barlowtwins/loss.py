"""The Barlow Twins loss.

Reference:
    Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from barlowtwins.distributed import global_count, global_sum, world_size

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

    After each call, ``last_terms`` holds the two detached terms of that loss,
    ``(sum_i (1 - c_ii)^2, sum_{i != j} c_ij^2)`` (see :mod:`barlowtwins.health`).

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
        self.last_terms: tuple[Tensor, Tensor] | None = None

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Compute the loss of two batches of embeddings of shape (batch, features)."""
        _check_embeddings(z_a, z_b)
        dtype = torch.float64 if torch.float64 in (z_a.dtype, z_b.dtype) else torch.float32
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = z_a.to(dtype), z_b.to(dtype)
            ranks = world_size() if self.gather_distributed else 1
            total = global_sum if ranks > 1 else _identity
            n = global_count(z_a.size(0), z_a.device) if ranks > 1 else z_a.size(0)
            _check_batch(n)
            a, b = _standardize(z_a, n, total), _standardize(z_b, n, total)
            terms: dict[str, Tensor] = {}
            loss = _RedundancyReduction.apply(a, b, n, self.lambda_param, ranks, terms)
            self.last_terms = (terms["on_diag"], terms["off_diag"])
            return loss


class _RedundancyReduction(torch.autograd.Function):
    """The loss of standardised embeddings ``a``, ``b``, with the D x D work done in place.

    Autograd through ``c = a.T @ b / n`` and the loss would keep ``c``, the unscaled product
    and two D x D gradients alive together (256 MiB each at the paper's D = 8192). Here the
    backward pass writes ``dL/dc`` into ``c``'s own storage, so ``c`` is the only D x D tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: Tensor,
        b: Tensor,
        n: int,
        lambda_param: float,
        ranks: int,
        terms: dict[str, Tensor],
    ) -> Tensor:
        c = a.T @ b
        if ranks > 1:
            dist.all_reduce(c)  # the global batch's c: the sum of every rank's a.T @ b
        c.div_(n)
        on_diag = (1 - c.diagonal()).square().sum()
        # ||c||^2 - ||diag(c)||^2: no D x D mask or temporary beyond c itself.
        off_diag = _squared_norm(c) - c.diagonal().square().sum()
        ctx.save_for_backward(a, b)
        ctx.c, ctx.n, ctx.lambda_param, ctx.ranks = c, n, lambda_param, ranks
        # The terms of this very loss, for health monitoring (no second evaluation).
        terms["on_diag"], terms["off_diag"] = on_diag.detach(), off_diag.detach()
        return on_diag + lambda_param * off_diag

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        a, b = ctx.saved_tensors
        grad_c, ctx.c = ctx.c, None
        if grad_c is None:
            raise RuntimeError(
                "BarlowTwinsLoss supports one backward pass per forward pass (its backward "
                "reuses the memory of c); compute the loss again instead of retain_graph=True"
            )
        # dL/dc is 2 lambda c_ij off the diagonal and 2 (c_ii - 1) on it. Every rank holds the
        # same global loss; like an autograd all-reduce, the gradient of this rank's share of
        # c sums all ranks' (equal) gradients: `ranks` times one of them.
        scale = grad_loss * (2.0 * ctx.ranks / ctx.n)
        diagonal = grad_c.diagonal().clone()
        grad_c.mul_(scale * ctx.lambda_param)
        grad_c.diagonal().copy_((diagonal - 1) * scale)
        grad_a = b @ grad_c.T if ctx.needs_input_grad[0] else None
        grad_b = a @ grad_c if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None


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
    _check_batch(n)
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


def _check_batch(n: int) -> None:
    if n < 2:
        raise ValueError(f"batch size must be >= 2 to standardise over it, got {n}")


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
