"""Exact cross-process statistics: differentiable sums and gathers, a batch norm over the global
batch.

Every rank of a data-parallel run computes the *same* global loss ``L``. An autograd-aware
``all_reduce`` sums the gradients of all ranks' copies in its backward pass, so each rank
receives ``W * dL/dx`` for its local inputs; DDP then averages parameter gradients over the
``W`` ranks, which yields exactly ``dL/dtheta`` of one process on the concatenated global batch.
A plain in-place ``torch.distributed.all_reduce`` is invisible to autograd: each rank keeps
only ``dL/dx`` and DDP's average silently divides the gradient by ``W``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def world_size() -> int:
    """Number of processes in the default group, or 1 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_rank() -> int:
    """Index of this process in the default group, or 0 when not running distributed."""
    return dist.get_rank() if world_size() > 1 else 0


def global_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, differentiably (identity when not distributed).

    Args:
        tensor: Any tensor with the same shape on every rank.

    Returns:
        The elementwise sum over ranks. Its backward pass sums the incoming gradients over
        ranks, which is what makes replicated global losses exact under DDP averaging.
    """
    if world_size() == 1:
        return tensor
    return _SumOverRanks.apply(tensor)


def sum_over_ranks_if(gather: bool) -> Callable[[Tensor], Tensor]:
    """:func:`global_sum` if ``gather``, else the identity: how a per-rank quantity is totalled.

    For code that takes statistics over the global batch only on request (a loss's
    ``gather_distributed``) and otherwise over this rank's shard alone, also when a process
    group exists.

    Args:
        gather: Sum over all ranks.

    Returns:
        :func:`global_sum`, or a function that returns its argument unchanged.
    """
    return global_sum if gather else _unchanged


def _unchanged(tensor: Tensor) -> Tensor:
    return tensor


class DistributedJobError(RuntimeError):
    """A process of a multi-process run failed; the other processes were stopped."""


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient too.

    Written here rather than taken from ``torch.distributed.nn`` (deprecated, warns on every
    call); the functional collectives have no differentiable all-reduce.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def global_count(local_count: int, device: torch.device) -> int:
    """Total of a per-rank count over all ranks (shards may have different sizes)."""
    if world_size() == 1:
        return local_count
    count = torch.tensor([local_count], device=device, dtype=torch.long)
    dist.all_reduce(count)
    return int(count.item())


def shard_sizes(local_size: int, device: torch.device) -> list[int]:
    """Every rank's size of a batch whose shards may differ in size, in rank order.

    Args:
        local_size: The size of this rank's shard.
        device: Where the collective's buffers live (the process group backend's device).

    Returns:
        One size per rank; ``[local_size]`` when not running distributed.
    """
    if world_size() == 1:
        return [local_size]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local_size], dtype=torch.long, device=device))
    return [int(count.item()) for count in counts]


def gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """All ranks' ``x`` concatenated along the first dimension in rank order, differentiably.

    Shards may differ in their first size (they are padded to the largest for the all-gather).
    Every rank holds the same global loss, so the backward pass gives each rank the sum over
    ranks of the gradients of its own rows, as :func:`global_sum` does.

    Args:
        x: This rank's shard, (sizes[rank], ...); the other dimensions equal on every rank.
        sizes: Every rank's first size, in rank order (:func:`shard_sizes`).

    Returns:
        The global batch, (sum(sizes), ...); ``x`` itself when not running distributed.
    """
    if world_size() == 1:
        return x
    return _GatherRows.apply(x, sizes)


class _GatherRows(torch.autograd.Function):
    """All-gather of shards of different sizes whose backward returns each rank its rows' sum."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.size(0)] = x
        shards = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shards, padded)
        return torch.cat([shard[:size] for shard, size in zip(shards, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None


class GlobalBatchNorm(_BatchNorm):
    """Batch normalisation whose statistics are taken over the global batch of all ranks.

    ``torch.nn.SyncBatchNorm`` only runs on CUDA. This layer computes the same thing with
    differentiable collectives, so it works with any backend (gloo on CPU included) and with
    shards of different sizes. Outside training or without a process group it is an ordinary
    batch norm. Use :func:`convert_to_global_batchnorm` to swap it into a model.
    """

    # The batch norm class this one replaced (convert_to_global_batchnorm), to revert to.
    _original_class: type[_BatchNorm]

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or world_size() == 1:
            return super().forward(input)

        reduce_dims = [0, *range(2, input.dim())]
        stat_shape = [1, input.size(1)] + [1] * (input.dim() - 2)
        count = global_count(input.numel() // input.size(1), input.device)
        if count < 2:
            raise ValueError("batch norm needs at least 2 values per channel over all ranks")

        # Two passes (mean, then centred squares) keep the variance accurate in float32.
        mean = global_sum(input.sum(reduce_dims)) / count
        centred = input - mean.view(stat_shape)
        var = global_sum(centred.square().sum(reduce_dims)) / count
        output = centred * torch.rsqrt(var + self.eps).view(stat_shape)
        if self.affine:
            output = output * self.weight.view(stat_shape) + self.bias.view(stat_shape)

        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        # Only called with track_running_stats, which allocates all three.
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_var = var * (count / (count - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`GlobalBatchNorm` with the same state.

    Args:
        module: A model; it is modified in place where possible.

    Returns:
        The converted module (a new object when ``module`` itself is a batch norm).
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = _rebuild_batchnorm(module, GlobalBatchNorm)
        assert isinstance(converted, GlobalBatchNorm)
        converted._original_class = type(module)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batchnorm(child))
    return module


def revert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_to_global_batchnorm`: each layer becomes its original class again."""
    if isinstance(module, GlobalBatchNorm):
        return _rebuild_batchnorm(module, getattr(module, "_original_class", nn.BatchNorm2d))
    for name, child in module.named_children():
        module.add_module(name, revert_global_batchnorm(child))
    return module


def _rebuild_batchnorm(source: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` batch norm sharing ``source``'s parameters and buffers.

    Sharing (not copying) keeps device, dtype and the optimizer's parameter references valid.
    """
    rebuilt = cls(
        source.num_features,
        eps=source.eps,
        momentum=source.momentum,
        affine=source.affine,
        track_running_stats=source.track_running_stats,
    )
    if source.affine:
        rebuilt.weight = source.weight
        rebuilt.bias = source.bias
    if source.track_running_stats:
        rebuilt.running_mean = source.running_mean
        rebuilt.running_var = source.running_var
        rebuilt.num_batches_tracked = source.num_batches_tracked
    rebuilt.train(source.training)
    return rebuilt


def sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Synchronise all batch norms of ``module`` over the process group.

    Uses the fused ``torch.nn.SyncBatchNorm`` on CUDA and :class:`GlobalBatchNorm` elsewhere.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_to_global_batchnorm(module)


__all__ = [
    "DistributedJobError",
    "GlobalBatchNorm",
    "convert_to_global_batchnorm",
    "gather_rows",
    "global_count",
    "global_rank",
    "global_sum",
    "revert_global_batchnorm",
    "shard_sizes",
    "sum_over_ranks_if",
    "sync_batchnorm",
    "world_size",
]
