"""Mixed Barlow Twins: the Barlow Twins loss plus a MixUp regulariser on cross-correlations.

Reference:
    Bandara, De Melo, Patel. "Guarding Barlow Twins Against Overfitting with Mixed Samples",
    2023. https://arxiv.org/abs/2312.02151 — code: https://github.com/wgcban/mix-bt

A batch of mixed images ``x_m = alpha * x_a + (1 - alpha) * x_b[perm]`` (one ``alpha`` drawn
from Beta(1, 1) and one permutation of the batch per step) is embedded by the same network. If
the network mapped input mixtures to feature mixtures, the cross-correlations of the
standardised mixed embeddings ``m`` with the two views ``a``, ``b`` would be the same mixture
of the views' own cross-correlations (``C(x, y) = x^T y / N``)::

    C(m, a) = alpha * C(a, a) + (1 - alpha) * C(b[perm], a)
    C(m, b) = alpha * C(a, b) + (1 - alpha) * C(b[perm], b)

The regulariser is the squared Frobenius distance of both sides, weighted like the reference.
Use :class:`MixUp` to draw ``alpha`` and ``perm`` and make the mixed images, then
:class:`MixedBarlowTwinsLoss` on the three embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from barlowtwins.loss import (
    RedundancyReduction,
    accurate_sum_of_squares,
    check_batch_size,
    check_embedding_pair,
    standardize_over_batch,
)
from barlowtwins.nn.distributed import gather_rows, global_rank, shard_sizes, sum_over_ranks_if
from barlowtwins.seeding import derived_seed


@dataclass(frozen=True)
class MixedImages:
    """Mixed images of a step and how they were mixed.

    Attributes:
        images: This rank's mixed images ``alpha * x_a + (1 - alpha) * x_b[perm]``.
        alpha: Weight of the first view, drawn from Beta(1, 1).
        permutation: Permutation of the *global* batch (all ranks' shards in rank order):
            sample ``g`` is mixed with sample ``permutation[g]`` of the second view.
    """

    images: Tensor
    alpha: float
    permutation: Tensor


@dataclass(frozen=True)
class MixedLossTerms:
    """The two terms of :class:`MixedBarlowTwinsLoss`, each already multiplied by ``scale_loss``.

    Attributes:
        barlow_twins: The Barlow Twins loss of the two views.
        mixed: The weighted MixUp regulariser.
    """

    barlow_twins: Tensor
    mixed: Tensor


class MixUp:
    """Draws the mixing of a step and mixes the two views' images (reference ``main.py`` 64-66).

    ``alpha`` and the permutation come from a generator seeded by ``(seed, step)`` alone, so every
    rank of a data-parallel run draws the same ones without communicating, and a resumed run
    draws the same ones again. With ``gather_distributed=True`` the permutation covers the global
    batch: a rank's sample may be mixed with a sample that another rank holds, as on one process
    with the concatenated batch.

    Args:
        seed: Seed shared by all ranks.
        gather_distributed: Permute and mix over the global batch of all processes.

    Examples:
        >>> mixup = MixUp(seed=0)
        >>> x_a, x_b = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
        >>> mixed = mixup(x_a, x_b, step=0)
        >>> mixed.images.shape
        torch.Size([8, 1, 28, 28])
    """

    def __init__(self, seed: int = 0, gather_distributed: bool = False) -> None:
        self.seed = seed
        self.gather_distributed = gather_distributed

    def draw(self, global_batch_size: int, step: int) -> tuple[float, Tensor]:
        """``alpha`` and the permutation of a step, identical on every rank.

        Beta(1, 1) is the uniform distribution on [0, 1], which ``torch.rand`` draws with an
        explicit generator (``torch.distributions.Beta`` cannot take one).

        Args:
            global_batch_size: Number of samples over all ranks.
            step: Index of the training step (>= 0).

        Returns:
            ``alpha`` and a CPU permutation of ``range(global_batch_size)``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        check_batch_size(global_batch_size)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step))
        alpha = float(torch.rand((), generator=generator, dtype=torch.float64))
        return alpha, torch.randperm(global_batch_size, generator=generator)

    def __call__(self, x_a: Tensor, x_b: Tensor, step: int) -> MixedImages:
        """Mix this rank's first-view images with the permuted second-view images of a step.

        Args:
            x_a: This rank's images of the first view, (batch, ...).
            x_b: This rank's images of the second view, same shape.
            step: Index of the training step; every rank must pass the same.

        Returns:
            The mixed images with their ``alpha`` and global permutation.
        """
        _check_images(x_a, x_b)
        sizes, _ = _shards(x_a.size(0), x_a.device, self.gather_distributed)
        alpha, permutation = self.draw(sum(sizes), step)
        permutation = permutation.to(x_a.device)
        images = mix_images(
            x_a, x_b, alpha, permutation, gather_distributed=self.gather_distributed
        )
        return MixedImages(images, alpha, permutation)


def mix_images(
    x_a: Tensor, x_b: Tensor, alpha: float, permutation: Tensor, *, gather_distributed: bool = False
) -> Tensor:
    """This rank's mixed images ``alpha * x_a + (1 - alpha) * x_b[permutation]``.

    Images are inputs: no gradient flows through the mixing. Under distribution
    ``x_b[permutation]`` indexes the global batch: the second-view images of all ranks are
    gathered, so every rank holds the global ``x_b`` for a moment (``N`` images, e.g. 1.6 MB for
    512 Fashion-MNIST views in float32).

    Args:
        x_a: This rank's images of the first view, (batch, ...).
        x_b: This rank's images of the second view, same shape.
        alpha: Weight of ``x_a``, in [0, 1].
        permutation: Permutation of the global batch, the same on every rank.
        gather_distributed: ``permutation`` indexes the global batch of all processes.

    Returns:
        The mixed images, shaped like ``x_a``.
    """
    _check_images(x_a, x_b)
    _check_alpha(alpha)
    sizes, rank = _shards(x_a.size(0), x_a.device, gather_distributed)
    rows = _local_rows(permutation, sizes, rank)
    with torch.no_grad():
        partners = gather_rows(x_b, sizes)[rows] if len(sizes) > 1 else x_b[rows]
        return alpha * x_a + (1 - alpha) * partners


class MixedBarlowTwinsLoss(nn.Module):
    """Barlow Twins loss plus the MixUp regulariser of Mixed Barlow Twins (Bandara et al. 2023).

    With ``a``, ``b``, ``m`` the batch-standardised embeddings of the two views and the mixed
    images, ``p = b[perm]`` and ``C(x, y) = x^T y / N``::

        loss = BT(a, b) + mix_weight * lambda_param * (
            ||C(m, a) - alpha C(a, a) - (1 - alpha) C(p, a)||_F^2
          + ||C(m, b) - alpha C(a, b) - (1 - alpha) C(p, b)||_F^2)

    which is ``loss_bt + loss_mix`` of the reference's ``main.py`` (commit f915e4e, ``train``,
    lines 62-84: ``loss_mix = args.mixup_loss_scale * lmbda * (...)``), with ``mix_weight`` its
    ``mixup_loss_scale``. Its released CIFAR-10/100 and TinyImageNet models used 4.0 (README,
    ``scripts-pretrain-resnet18/cifar10.sh``), STL-10 2.0; the argparse default is 5.0. The
    ImageNet script (``main_imagenet.py``, ``BarlowTwins.forward``) writes ``0.5 * lambd``
    times ``lambda_mixup`` warmed up linearly over 10 epochs (``adjust_mixup_scale``):
    ``mix_weight = 0.5 * lambda_mixup`` here; its ``cc_m_2_gt`` uses ``C(b, b)`` where the
    paper's README and ``main.py`` use ``C(a, b)``; this class follows the latter.

    Both differences are linear in ``m - alpha a - (1 - alpha) p``, so the regulariser is
    computed as ``(||e^T a||_F^2 + ||e^T b||_F^2) / N^2`` with ``e = m - alpha a - (1 - alpha)
    p``: two ``D x D`` products instead of the reference's six, with the same value. The whole
    loss is multiplied by ``scale_loss`` (1 in the reference).

    Standardisation: like :class:`~barlowtwins.loss.BarlowTwinsLoss`, the biased variance plus
    batch norm's epsilon (Barlow Twins' released code); the reference's ``main.py`` divides by
    the unbiased ``std`` without epsilon, which scales every ``C`` by ``(N - 1) / N``.

    Memory: at most one ``D x D`` matrix is alive at any time. The regulariser forms its two
    ``D x D`` products one after the other and turns each into its ``N x D`` input gradients at
    once, keeping no ``D x D`` for the backward pass; the Barlow Twins term keeps only its
    ``c``, created after the regulariser's matrices are freed (see ``BarlowTwinsLoss``).

    With ``gather_distributed=True`` under an initialised process group the statistics, ``N``,
    the ``C`` matrices and the permutation cover the global batch: every rank returns the global
    loss, and after DDP averages gradients they equal those of one process on the concatenated
    global batch, also for shards of different sizes. The standardised second-view embeddings
    are all-gathered differentiably (``N x D`` per rank) so that a sample's permuted partner may
    live on another rank; the ``D x D`` products are all-reduced. (The reference's multi-GPU
    script permutes within each GPU's shard and all-reduces without autograd, which drops a
    factor ``W`` from the gradients under DDP's averaging.)

    Args:
        lambda_param: Off-diagonal weight of the Barlow Twins term, also a factor of the
            regulariser (the reference's ``lmbda``).
        mix_weight: Weight of the regulariser relative to ``lambda_param`` (the reference's
            ``mixup_loss_scale``); 0 gives the Barlow Twins loss.
        gather_distributed: Use global-batch statistics and the global permutation.
        scale_loss: Factor of the whole loss, as in ``BarlowTwinsLoss``.

    Examples:
        >>> loss_fn = MixedBarlowTwinsLoss()
        >>> z_a, z_b, z_m = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(z_a, z_b, z_m, alpha=0.3, permutation=torch.randperm(8))
    """

    def __init__(
        self,
        lambda_param: float = 5e-3,
        mix_weight: float = 4.0,
        gather_distributed: bool = False,
        scale_loss: float = 1.0,
    ) -> None:
        super().__init__()
        if lambda_param < 0:
            raise ValueError(f"lambda_param must be >= 0, got {lambda_param}")
        if mix_weight < 0:
            raise ValueError(f"mix_weight must be >= 0, got {mix_weight}")
        if scale_loss <= 0:
            raise ValueError(f"scale_loss must be > 0, got {scale_loss}")
        self.lambda_param = lambda_param
        self.mix_weight = mix_weight
        self.gather_distributed = gather_distributed
        self.scale_loss = scale_loss
        # The Barlow Twins terms of the last call, as BarlowTwinsLoss keeps them (health).
        self.last_terms: tuple[Tensor, Tensor] | None = None

    def forward(
        self, z_a: Tensor, z_b: Tensor, z_mixed: Tensor, alpha: float, permutation: Tensor
    ) -> Tensor:
        """The loss of three batches of embeddings of shape (batch, features).

        Args:
            z_a: This rank's embeddings of the first view.
            z_b: This rank's embeddings of the second view.
            z_mixed: This rank's embeddings of the mixed images (see :class:`MixUp`).
            alpha: The mixing weight of the first view, in [0, 1].
            permutation: The permutation of the global batch the images were mixed with.

        Returns:
            The scalar loss, the same on every rank.
        """
        terms = self.terms(z_a, z_b, z_mixed, alpha, permutation)
        return terms.barlow_twins + terms.mixed

    def terms(
        self, z_a: Tensor, z_b: Tensor, z_mixed: Tensor, alpha: float, permutation: Tensor
    ) -> MixedLossTerms:
        """The Barlow Twins term and the regulariser separately (arguments as :meth:`forward`)."""
        check_embedding_pair(z_a, z_b)
        if z_mixed.shape != z_a.shape:
            raise ValueError(
                f"z_mixed must have the shape of z_a, got {tuple(z_mixed.shape)} and "
                f"{tuple(z_a.shape)}"
            )
        _check_alpha(alpha)
        float64 = torch.float64 in (z_a.dtype, z_b.dtype, z_mixed.dtype)
        dtype = torch.float64 if float64 else torch.float32
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b, z_mixed = z_a.to(dtype), z_b.to(dtype), z_mixed.to(dtype)
            sizes, rank = _shards(z_a.size(0), z_a.device, self.gather_distributed)
            ranks, n = len(sizes), sum(sizes)
            check_batch_size(n)
            rows = _local_rows(permutation, sizes, rank)
            total = sum_over_ranks_if(ranks > 1)
            a, var_a = standardize_over_batch(z_a, n, total)
            b, var_b = standardize_over_batch(z_b, n, total)
            m, _ = standardize_over_batch(z_mixed, n, total)
            partners = gather_rows(b, sizes)[rows] if ranks > 1 else b[rows]
            residual = m - alpha * a - (1 - alpha) * partners
            weight = self.mix_weight * self.lambda_param
            # The regulariser first: its D x D products are freed before the BT term's c exists.
            keep_grads = torch.is_grad_enabled() and residual.requires_grad
            mixed = _LinearityResidual.apply(residual, a, b, n, ranks, keep_grads)
            mixed = mixed * (weight * self.scale_loss)
            terms: dict[str, Tensor] = {}
            barlow_twins = RedundancyReduction.apply(
                a, b, var_a.detach(), var_b.detach(), n, self.lambda_param, ranks, terms
            )
            self.last_terms = (terms["on_diag"], terms["off_diag"])
            if self.scale_loss != 1:
                barlow_twins = barlow_twins * self.scale_loss
            return MixedLossTerms(barlow_twins, mixed)


class _LinearityResidual(torch.autograd.Function):
    """``||e^T a / n||_F^2 + ||e^T b / n||_F^2`` with the ``e^T x`` summed over ranks.

    Each ``D x D`` product becomes its input gradients (``N x D``) in the forward pass and is
    freed, so the backward pass only scales them: one ``D x D`` alive at a time, none kept.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, e: Tensor, a: Tensor, b: Tensor, n: int, ranks: int, keep_grads: bool
    ) -> Tensor:
        value = e.new_zeros(())
        grads: list[Tensor] = []
        grad_e = torch.zeros_like(e) if keep_grads else None
        for x in (a, b):
            product = e.T @ x
            if ranks > 1:
                dist.all_reduce(product)  # the global batch's e^T x: the sum over ranks
            product.div_(n)
            # Exact in float32 too: a plain dot over D x D products loses ~1e-3 at D = 8192.
            value += accurate_sum_of_squares(product).to(value.dtype)
            if grad_e is not None:
                grad_e.addmm_(x, product.T)
                grads.append(e @ product)
            del product
        ctx.grads = (grad_e, *grads) if grad_e is not None else None
        # d||P||^2/dP = 2P, P = sum_ranks(e^T x) / n; every rank holds the same global value,
        # so its share of P gets the sum of all ranks' equal gradients: `ranks` times one.
        ctx.scale = 2.0 * ranks / n
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "MixedBarlowTwinsLoss supports one backward pass per forward pass, with "
                "gradients enabled during the forward pass"
            )
        scale = grad_value * ctx.scale
        grad_e, grad_a, grad_b = (grad.mul_(scale) for grad in grads)
        return grad_e, grad_a, grad_b, None, None, None


def _shards(local: int, device: torch.device, gather_distributed: bool) -> tuple[list[int], int]:
    """Every rank's batch size in rank order, and this rank's index (``[local], 0`` alone)."""
    if not gather_distributed:
        return [local], 0
    return shard_sizes(local, device), global_rank()


def _local_rows(permutation: Tensor, sizes: list[int], rank: int) -> Tensor:
    """Checked global permutation, sliced to this rank's samples."""
    n = sum(sizes)
    if permutation.dim() != 1 or permutation.numel() != n:
        raise ValueError(
            f"permutation must be 1-D with one entry per sample of the global batch ({n}), got "
            f"shape {tuple(permutation.shape)}"
        )
    if permutation.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"permutation must hold integers, got {permutation.dtype}")
    if not torch.equal(permutation.sort().values.cpu(), torch.arange(n, dtype=permutation.dtype)):
        raise ValueError(f"permutation must contain each index 0..{n - 1} exactly once")
    start = sum(sizes[:rank])
    return permutation[start : start + sizes[rank]]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _check_images(x_a: Tensor, x_b: Tensor) -> None:
    if x_a.dim() < 1 or x_a.shape != x_b.shape:
        raise ValueError(
            f"x_a and x_b must have the same shape (batch, ...), got {tuple(x_a.shape)} and "
            f"{tuple(x_b.shape)}"
        )


__all__ = ["MixUp", "MixedBarlowTwinsLoss", "MixedImages", "MixedLossTerms", "mix_images"]
