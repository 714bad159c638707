"""The Barlow Twins loss.

Reference:
    Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from barlowtwins.nn.distributed import global_count, sum_over_ranks_if, world_size

# Same epsilon as torch.nn.BatchNorm1d, which the paper's released code uses to standardise.
_BATCHNORM_EPS = 1e-5
# Blocks of c in accurate_sum_of_squares: about 2**18 values (a 1 MiB temporary that stays in
# cache), but no more than 32 blocks, since each costs a kernel launch on a GPU and an OpenMP
# parallel region on a CPU, which waits for a time slice when other processes share the cores.
# Measured on 2 CPU threads, loss fwd+bwd at B = 256, against one BLAS sdot over all of c: with
# 256 blocks of 2**18 it was 4 % slower at D = 8192; with blocks of 2**20 (out of cache), 7 %
# slower at D = 2048.
_BLOCK_ELEMENTS = 2**18
_MAX_BLOCKS = 32


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class BarlowTwinsLoss(nn.Module):
    """Redundancy-reduction loss of Barlow Twins (paper Eq. 1 and Algorithm 1).

    Each view's embeddings are standardised over the batch (a batch norm without affine
    parameters) and their cross-correlation matrix is pushed towards the identity. In the form
    of the paper's Algorithm 1 and its released code (``facebookresearch/barlowtwins``,
    ``main.py``), for ``N`` samples of ``D`` features::

        c = bn(z_a).T @ bn(z_b) / N                  # D x D cross-correlation
        on_diag = ((1 - diagonal(c)) ** 2).sum()     # invariance
        off_diag = (off_diagonal(c) ** 2).sum()      # redundancy reduction
        loss = on_diag + lambda_param * off_diag

    The loss computes in float32 (float64 for float64 input), also under autocast: the
    cross-correlation of thousands of features loses the loss in bfloat16. In float32 it is
    the float64 loss of the same inputs to 1e-6 relative or better (measured 1e-9..2e-7 for
    B = 32..2048, D = 512..8192), also when the views nearly agree: the sum over the
    ``D**2`` squares of ``c`` is taken pairwise in blocks, not by one running sum (off by
    ~1e-3 at D = 8192), and ``1 - c_ii`` is computed without cancelling (see
    :class:`RedundancyReduction`).

    With ``gather_distributed=True`` under an initialised process group, the statistics, ``N``
    and ``c`` cover the *global* batch of all ranks, every rank returns the global loss, and
    after DDP averages parameter gradients they equal those of one process on the concatenated
    global batch — also when the ranks' shards differ in content or size. Only per-feature sums
    and the ``D x D`` matrix ``c`` cross the network, with differentiable collectives (see
    :mod:`barlowtwins.nn.distributed`).

    After each call, ``last_terms`` holds the two detached terms of that loss,
    ``(sum_i (1 - c_ii)^2, sum_{i != j} c_ij^2)`` (see :mod:`barlowtwins.health`).

    Args:
        lambda_param: Weight of the redundancy-reduction (off-diagonal) term. The paper's text
            gives 5e-3; its released code uses 0.0051.
        gather_distributed: Use global-batch statistics across all processes.
        scale_loss: Factor of the whole loss (solo-learn's ``scale_loss``; 1 in the paper).

    Raises:
        ValueError: If ``lambda_param`` is negative, ``scale_loss`` is not positive, or
            ``gather_distributed`` is set but this build of torch has no
            ``torch.distributed``.

    Examples:
        >>> loss_fn = BarlowTwinsLoss()
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(z_a, z_b)
    """

    def __init__(
        self, lambda_param: float = 5e-3, gather_distributed: bool = False, scale_loss: float = 1.0
    ) -> None:
        super().__init__()
        if lambda_param < 0:
            raise ValueError(f"lambda_param must be >= 0, got {lambda_param}")
        if scale_loss <= 0:
            raise ValueError(f"scale_loss must be > 0, got {scale_loss}")
        if gather_distributed and not dist.is_available():
            raise ValueError(
                "gather_distributed=True needs torch.distributed, which this build of torch "
                "lacks; use gather_distributed=False"
            )
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed
        self.scale_loss = scale_loss
        self.last_terms: tuple[Tensor, Tensor] | None = None

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Compute the loss of two batches of embeddings of shape (batch, features)."""
        check_embedding_pair(z_a, z_b)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = _compute_dtype(z_a, z_b)
            ranks = world_size() if self.gather_distributed else 1
            total = sum_over_ranks_if(ranks > 1)
            n = global_count(z_a.size(0), z_a.device) if ranks > 1 else z_a.size(0)
            check_batch_size(n)
            a, var_a = standardize_over_batch(z_a, n, total)
            b, var_b = standardize_over_batch(z_b, n, total)
            terms: dict[str, Tensor] = {}
            loss = RedundancyReduction.apply(
                a, b, var_a.detach(), var_b.detach(), n, self.lambda_param, ranks, terms
            )
            self.last_terms = (terms["on_diag"], terms["off_diag"])
            return loss if self.scale_loss == 1 else loss * self.scale_loss


class RedundancyReduction(torch.autograd.Function):
    """The Barlow Twins loss of standardised embeddings ``a``, ``b``, with the D x D work in place.

    The step of :class:`BarlowTwinsLoss` after standardising (also the Barlow Twins term of
    :class:`~barlowtwins.mixed_loss.MixedBarlowTwinsLoss`); call it as
    ``RedundancyReduction.apply(a, b, var_a, var_b, n, lambda_param, ranks, terms)``. It
    supports one backward pass per forward pass.

    Autograd through ``c = a.T @ b / n`` and the loss would keep ``c``, the unscaled product
    and two D x D gradients alive together (256 MiB each at the paper's D = 8192). Here the
    backward pass writes ``dL/dc`` into ``c``'s own storage, so ``c`` is the only D x D tensor.

    ``1 - c_ii`` is not taken from ``c``: when the views nearly agree, ``c_ii`` is within
    1e-4 of 1 and its float32 rounding (~1e-7) would be 1e-3 of the difference. Since
    ``||a_i||^2 / n = var_i / (var_i + eps)`` for a standardised feature,

        1 - c_ii = (eps / (var_a_i + eps) + eps / (var_b_i + eps) + ||a_i - b_i||^2 / n) / 2,

    a sum of positive terms, each accurate to float32's relative precision.

    Args:
        a: This rank's standardised first-view embeddings (:func:`standardize_over_batch`),
            (batch, features), float32 or float64.
        b: The same for the second view, same shape and dtype.
        var_a: Each feature's (biased) variance of the first view before standardising,
            detached, shape (features,).
        var_b: The same for the second view.
        n: Number of samples the statistics cover (the global batch when ``ranks > 1``).
        lambda_param: Weight of the off-diagonal term.
        ranks: Number of processes whose shards ``a`` and ``b`` are (1 without distribution);
            with more, ``c`` and the distances are all-reduced over the default group.
        terms: If given, receives the detached terms as ``"on_diag"`` and ``"off_diag"``, in
            the dtype of the loss.

    Returns:
        The scalar loss ``on_diag + lambda_param * off_diag`` in the dtype of ``a``, the same
        on every rank.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: Tensor,
        b: Tensor,
        var_a: Tensor,
        var_b: Tensor,
        n: int,
        lambda_param: float,
        ranks: int,
        terms: dict[str, Tensor] | None = None,
    ) -> Tensor:
        # torch's float32 sum over the batch is accurate here (1.9e-7 per feature at most, at
        # B = 256..2048); a float64 sum would cast a B x D copy and take 4-14x as long.
        distance = (a - b).square_().sum(dim=0).to(torch.float64)
        if ranks > 1:
            dist.all_reduce(distance)  # over the global batch, like c
        # 1 - ||a_i||^2 / n = eps / (var_a_i + eps), likewise for b (see the class docstring).
        eps_a, eps_b = (_BATCHNORM_EPS / (var + _BATCHNORM_EPS) for var in (var_a, var_b))
        one_minus_diagonal = ((eps_a + eps_b).to(torch.float64) + distance / n) / 2
        c = _scaled_product(a, b, n)
        if ranks > 1:
            dist.all_reduce(c)  # the global batch's c: the sum of every rank's a.T @ b / n
        # Both terms are summed in float64 or pairwise: see accurate_sum_of_squares.
        on_diag = one_minus_diagonal.square().sum()
        # ||c||^2 - ||diag(c)||^2: no D x D mask or temporary beyond c itself.
        off_diag = accurate_sum_of_squares(c) - c.diagonal().to(torch.float64).square().sum()
        if terms is not None:
            # In the dtype of the loss, like the value returned.
            terms["on_diag"], terms["off_diag"] = (
                t.detach().to(c.dtype) for t in (on_diag, off_diag)
            )
        ctx.save_for_backward(a, b)
        ctx.c, ctx.one_minus_diagonal = c, one_minus_diagonal.to(c.dtype)
        ctx.n, ctx.lambda_param, ctx.ranks = n, lambda_param, ranks
        return (on_diag + lambda_param * off_diag).to(c.dtype)

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
        if ctx.lambda_param > 0:
            # dL/dc = scale * lambda * G with G = c off the diagonal and (c_ii - 1) / lambda
            # on it: only the diagonal is rewritten, and the factor scales the B x D products
            # instead of the D x D matrix.
            grad_c.diagonal().copy_(ctx.one_minus_diagonal / -ctx.lambda_param)
            factor = scale * ctx.lambda_param
        else:
            grad_c.zero_().diagonal().copy_(-ctx.one_minus_diagonal)
            factor = scale
        grad_a = (b @ grad_c.T).mul_(factor) if ctx.needs_input_grad[0] else None
        grad_b = (a @ grad_c).mul_(factor) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None, None, None


def multi_view_loss(
    criterion: Callable[[Tensor, Tensor], Tensor], embeddings: Sequence[Tensor]
) -> Tensor:
    """Mean of a two-view loss over every pair of views of the same images.

    With more than two augmented views per image the Barlow Twins objective is estimated from
    more of the augmentation distribution per step (Agrawal, Ghosh, Oberman, Richards,
    "Addressing Sample Inefficiency in Multi-View Representation Learning", arXiv
    2312.10725). For two views this is ``criterion(z_0, z_1)``. Each pair is one call of
    ``criterion``, so a :class:`BarlowTwinsLoss` stays exact under distribution.

    Args:
        criterion: A loss of two views' embeddings, e.g. :class:`BarlowTwinsLoss`.
        embeddings: The views' embeddings, each of shape (N, D), row i from image i.

    Raises:
        ValueError: With fewer than two views.
    """
    pairs = list(itertools.combinations(embeddings, 2))
    if not pairs:
        raise ValueError(f"need at least two views, got {len(embeddings)}")
    total = criterion(*pairs[0])
    for z_a, z_b in pairs[1:]:
        total = total + criterion(z_a, z_b)
    return total / len(pairs)


def cross_correlation(z_a: Tensor, z_b: Tensor, *, gather_distributed: bool = False) -> Tensor:
    """Cross-correlation matrix ``c = bn(z_a).T @ bn(z_b) / N`` that the loss pushes to identity.

    Computed like :class:`BarlowTwinsLoss` computes it: in float32 (float64 for float64
    input), also under autocast.

    Args:
        z_a: Embeddings of the first view, (batch, features).
        z_b: Embeddings of the second view, same shape.
        gather_distributed: Statistics and ``N`` over the global batch of all ranks.

    Returns:
        The (features x features) matrix; the identity is the Barlow Twins optimum.
    """
    check_embedding_pair(z_a, z_b)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = _compute_dtype(z_a, z_b)
        total = sum_over_ranks_if(gather_distributed)
        n = global_count(z_a.size(0), z_a.device) if gather_distributed else z_a.size(0)
        check_batch_size(n)
        a, _ = standardize_over_batch(z_a, n, total)
        b, _ = standardize_over_batch(z_b, n, total)
        return total(_scaled_product(a, b, n))


def _compute_dtype(z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs in float64 if either is float64, else in float32 (bf16/fp16 widened)."""
    dtype = torch.float64 if torch.float64 in (z_a.dtype, z_b.dtype) else torch.float32
    return z_a.to(dtype), z_b.to(dtype)


def _scaled_product(a: Tensor, b: Tensor, n: int) -> Tensor:
    """``a.T @ b / n``, the division folded into the GEMM (no extra pass over D x D)."""
    return torch.addmm(a.new_zeros(()), a.T, b, beta=0, alpha=1 / n)


def standardize_over_batch(
    z: Tensor, n: int, total: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Zero mean, unit (biased) variance per feature over a batch of ``n`` samples.

    A batch norm without affine parameters, with batch norm's epsilon (as the paper's released
    code standardises the embeddings); its statistics may cover the shards of several ranks.

    Args:
        z: This rank's embeddings, (batch, features).
        n: Number of samples the statistics cover: ``z.size(0)``, or the global batch size.
        total: Sums a per-rank tensor over the batch's shards, e.g.
            :func:`~barlowtwins.nn.distributed.sum_over_ranks_if` (the identity for one
            process).

    Returns:
        The standardised batch and each feature's (biased) variance.
    """
    mean = total(z.sum(dim=0)) / n
    centred = z - mean
    var = total(centred.square().sum(dim=0)) / n
    return centred * torch.rsqrt(var + _BATCHNORM_EPS), var


def accurate_sum_of_squares(matrix: Tensor) -> Tensor:
    """``sum(matrix**2)`` as a float64 scalar, to better than 1e-6 relative for float32 input.

    BLAS ``sdot`` over the paper's 8192 x 8192 entries, which this loss used before, is off by
    ~1e-3 (and ``vector_norm`` by ~1e-2): each SIMD lane's running sum grows until the
    squares added to it lose their low bits. Here each block of rows is squared into a
    temporary (at most a quarter of the matrix; 8 MiB at D = 8192) and summed by torch's own
    reduction, which sums pairwise (cascade summation on CPUs, a tree on GPUs); the block
    sums add up in float64. Measured at D = 8192: 1e-8 relative error on random ``c``, 3.5e-7
    on a constant one (the worst case for running sums), as fast as ``sdot`` per loss call.
    Casting blocks to float64 instead was as exact (1e-12) but 3 % slower per loss call at
    D = 2048; one float64 cast of the whole matrix would hold a copy twice the size of ``c``.

    Args:
        matrix: A 2-D tensor, e.g. a cross-correlation matrix ``c``.

    Returns:
        The sum of the squares of its entries, a 0-d float64 tensor.
    """
    rows_for_size = _BLOCK_ELEMENTS // matrix.size(1)
    rows_for_count = -(-matrix.size(0) // _MAX_BLOCKS)  # ceil
    rows = max(1, min(matrix.size(0) // 4, max(rows_for_size, rows_for_count)))
    blocks = matrix.split(rows)
    partials = matrix.new_empty(len(blocks))
    for block, partial in zip(blocks, partials, strict=True):
        torch.sum(block.square(), dim=(0, 1), out=partial)
    return partials.to(torch.float64).sum()


def check_batch_size(n: int) -> None:
    """Reject a batch too small to standardise over.

    Args:
        n: Number of samples the statistics cover (the global batch under distribution).

    Raises:
        ValueError: If ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"batch size must be >= 2 to standardise over it, got {n}")


def check_embedding_pair(z_a: Tensor, z_b: Tensor) -> None:
    """Reject two views' embeddings that are not (batch, features) of the same shape.

    Args:
        z_a: Embeddings of the first view.
        z_b: Embeddings of the second view.

    Raises:
        ValueError: If either is not 2-D, or their shapes differ.
    """
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
