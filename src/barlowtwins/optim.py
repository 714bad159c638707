"""Optimisation of Barlow Twins: LARS, parameter groups, learning-rate scaling and schedule.

The paper (§4, "Optimization") trains with LARS for 1000 epochs at batch size 2048, learning
rates 0.2 for the weights and 0.0048 for the biases and batch-normalisation parameters (both
multiplied by ``batch_size / 256``), weight decay 1.5e-6, biases and normalisation parameters
excluded from LARS adaptation and weight decay, 10 warm-up epochs and a cosine decay to 1/1000
of the learning rate.

Reference:
    Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS: tuple[str, ...] = ("lars", "sgd", "adamw")

# The paper states its learning rates for a reference batch of 256 images.
_REFERENCE_BATCH_SIZE = 256


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by Barlow Twins.

    For every parameter ``p`` with gradient ``g`` in a group without ``lars_exclude``::

        g = g + weight_decay * p
        g = eta * ||p|| / ||g|| * g      (trust ratio; 1 when either norm is 0)

    and then, for all parameters::

        mu = momentum * mu + g
        p = p - lr * mu

    With ``clip_lr=True`` the trust ratio is clipped so that its effective learning rate
    ``lr * ratio`` never exceeds ``lr``: the ratio becomes ``min(ratio / lr, 1)`` (LARC's
    clipping, You et al. 2017 / NVIDIA apex; solo-learn's Barlow Twins recipes use it with
    ``eta=0.02``).

    Groups with ``lars_exclude=True`` (the paper excludes biases and normalisation parameters)
    get neither weight decay nor the trust ratio: plain momentum SGD. The step uses
    multi-tensor ``torch._foreach_*`` kernels per (device, dtype) bucket and does not
    synchronise with the host; gradients are not modified in place.

    Args:
        params: Parameters or parameter groups (dicts may override any option below).
        lr: Learning rate.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        momentum: Momentum factor.
        eta: LARS trust coefficient.
        clip_lr: Clip the trust ratio at ``1 / lr`` (see above).
        lars_exclude: Skip weight decay and the trust ratio for this group.

    Examples:
        >>> model = nn.Linear(4, 2)
        >>> opt = LARS(model.parameters(), lr=0.1, weight_decay=1.5e-6)
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        clip_lr: bool = False,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "clip_lr": clip_lr,
            "lars_exclude": lars_exclude,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None without closure.

        Raises:
            ValueError: If a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self._buckets(group):
                _lars_update(
                    bucket,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    eta=group["eta"],
                    clip_lr=group.get("clip_lr", False),
                    exclude=group["lars_exclude"],
                )
        return loss

    def _buckets(self, group: dict[str, Any]) -> list[_Bucket]:
        """Gather a group's parameters with gradients into one bucket per (device, dtype).

        Foreach kernels need each list on one device with one dtype. Parameters without a
        gradient are skipped, as in torch's own optimisers.
        """
        buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("LARS does not support sparse gradients; use dense gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bucket = buckets.setdefault((p.device, p.dtype), _Bucket())
            bucket.params.append(p)
            bucket.grads.append(p.grad)
            bucket.buffers.append(state["momentum_buffer"])
        return list(buckets.values())


@dataclass
class _Bucket:
    """Parameters, gradients and momentum buffers sharing one device and dtype."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    buffers: list[Tensor] = field(default_factory=list)


def _lars_update(
    bucket: _Bucket,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    eta: float,
    clip_lr: bool,
    exclude: bool,
) -> None:
    """Apply one LARS step to a bucket with multi-tensor kernels."""
    grads: list[Tensor] | tuple[Tensor, ...] = bucket.grads
    if not exclude:
        # Out-of-place ops leave ``p.grad`` untouched, so callers may still read it.
        if weight_decay != 0:
            grads = torch._foreach_add(grads, bucket.params, alpha=weight_decay)
        ratios = _trust_ratios(bucket.params, grads, eta)
        if clip_lr and lr > 0:
            ratios = ratios.div(lr).clamp_(max=1.0)
        grads = torch._foreach_mul(grads, ratios.unbind())
    torch._foreach_mul_(bucket.buffers, momentum)
    torch._foreach_add_(bucket.buffers, grads)
    torch._foreach_add_(bucket.params, bucket.buffers, alpha=-lr)


def _trust_ratios(params: Sequence[Tensor], grads: Sequence[Tensor], eta: float) -> Tensor:
    """Per-parameter ``eta * ||p|| / ||g||`` in one tensor, 1 where either norm is 0.

    The ratios stay on the device (no ``.item()``), so the step never waits for the GPU.
    """
    param_norms = torch.stack(torch._foreach_norm(list(params)))
    grad_norms = torch.stack(torch._foreach_norm(list(grads)))
    # ``where`` discards the inf/nan of a zero denominator before it can reach a parameter.
    ratios = torch.where(
        (param_norms > 0) & (grad_norms > 0),
        eta * param_norms / grad_norms,
        torch.ones_like(param_norms),
    )
    return ratios


def split_parameters(module: nn.Module) -> tuple[list[Parameter], list[Parameter]]:
    """Split a module's parameters into (weights, biases and normalisation parameters).

    Frozen parameters (``requires_grad=False``) are left out. Parameters with at most one
    dimension are biases or the affine parameters of batch/layer
    normalisation; the paper's released code ("exclude_bias_and_norm") uses the same test to
    exclude them from weight decay and LARS adaptation.

    Args:
        module: Module whose (deduplicated) parameters are split.

    Returns:
        ``(weights, biases_and_norms)`` in ``module.parameters()`` order.
    """
    weights: list[Parameter] = []
    biases_and_norms: list[Parameter] = []
    for p in module.parameters():
        if p.requires_grad:
            (biases_and_norms if p.ndim <= 1 else weights).append(p)
    return weights, biases_and_norms


def scale_lr(base_lr: float, batch_size: int) -> float:
    """Scale a learning rate linearly with the batch size: ``base_lr * batch_size / 256``.

    This is the paper's rule (§4); ``batch_size`` is the *global* batch, i.e. the per-process
    batch times the number of processes (times gradient-accumulation steps), because that is
    the number of images one optimiser step averages over.

    Args:
        base_lr: Learning rate for a batch of 256 images.
        batch_size: Global batch size.

    Returns:
        The scaled learning rate.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive global batch size, got {batch_size}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    return base_lr * batch_size / _REFERENCE_BATCH_SIZE


def scaled_learning_rates(
    name: str, batch_size: int, lr_weights: float, lr_biases: float
) -> tuple[float, float]:
    """The learning rates of weights and of biases and norms that ``name`` trains with at a
    global batch of ``batch_size``: scaled by :func:`scale_lr` for "lars" and "sgd", as given
    for "adamw" (see :func:`build_optimizer`).

    Raises:
        ValueError: If ``name`` is unknown or ``batch_size`` is not positive.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive global batch size, got {batch_size}")
        return lr_weights, lr_biases
    return scale_lr(lr_weights, batch_size), scale_lr(lr_biases, batch_size)


def build_optimizer(
    module: nn.Module,
    *,
    name: str = "lars",
    batch_size: int,
    lr_weights: float = 0.2,
    lr_biases: float = 0.0048,
    weight_decay: float = 1.5e-6,
    momentum: float = 0.9,
    lars_eta: float = 0.001,
    lars_clip_lr: bool = False,
) -> torch.optim.Optimizer:
    """Build the paper's optimiser with two parameter groups.

    Group 0 holds the weights (learning rate ``lr_weights``, ``weight_decay``); group 1 the
    biases and normalisation parameters (learning rate ``lr_biases``, no weight decay and, for
    LARS, ``lars_exclude=True``), as in the paper (§4). An empty group is left out.

    For "lars" and "sgd" the learning rates are multiplied by ``batch_size / 256``
    (:func:`scale_lr`). For "adamw" they are used as given: the linear scaling rule is derived
    for SGD-like updates whose step grows with the gradient, while Adam's update is normalised
    per coordinate, so the paper's LARS values do not carry over. ``momentum`` is Adam's
    ``beta1`` there. Each group also stores its learning rate as ``initial_lr``, which
    :class:`torch.optim.lr_scheduler.LambdaLR` multiplies by its factor, so a scheduler can
    also be rebuilt with ``last_epoch`` when resuming.

    Args:
        module: Module to optimise.
        name: One of "lars", "sgd", "adamw".
        batch_size: Global batch size over all processes (see :func:`scale_lr`).
        lr_weights: Base learning rate of the weights (per 256 images for LARS/SGD).
        lr_biases: Base learning rate of biases and normalisation parameters.
        weight_decay: Weight decay of the weights.
        momentum: Momentum (Adam's ``beta1`` for "adamw").
        lars_eta: LARS trust coefficient (the paper's 0.001; solo-learn's 0.02).
        lars_clip_lr: Clip LARS's trust ratio at ``1 / lr`` (solo-learn's ``clip_lr``).

    Returns:
        The optimiser.

    Raises:
        ValueError: If ``name`` is unknown or the module has no parameters.

    Examples:
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        >>> opt = build_optimizer(model, batch_size=512)
        >>> [g["lr"] for g in opt.param_groups]
        [0.4, 0.0096]
    """
    lrs = scaled_learning_rates(name, batch_size, lr_weights, lr_biases)
    weights, biases_and_norms = split_parameters(module)
    groups: list[dict[str, Any]] = []
    for params, lr, decay, exclude in (
        (weights, lrs[0], weight_decay, False),
        (biases_and_norms, lrs[1], 0.0, True),
    ):
        if not params:
            continue
        group: dict[str, Any] = {
            "params": params,
            "lr": lr,
            "initial_lr": lr,
            "weight_decay": decay,
        }
        if name == "lars":
            group["lars_exclude"] = exclude
        groups.append(group)
    if not groups:
        raise ValueError("module has no parameters to optimise")

    if name == "lars":
        return LARS(
            groups,
            lr=lrs[0],
            weight_decay=weight_decay,
            momentum=momentum,
            eta=lars_eta,
            clip_lr=lars_clip_lr,
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, foreach=True)
    # Fused AdamW is a single kernel per step, but only where every parameter is on CUDA.
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(
        groups,
        lr=lrs[0],
        betas=(momentum, 0.999),
        fused=fused or None,
        foreach=None if fused else True,
    )


class WarmupCosine:
    """Learning-rate factor of a linear warm-up and a cosine decay (paper §4), per step.

    During warm-up the factor is ``(step + 1) / warmup_steps``, so the first step already
    moves the weights (the released code's ``step / warmup_steps`` spends it at 0) and the
    last warm-up step reaches 1. Afterwards, as in the released code::

        q = 0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))
        factor = q + final_factor * (1 - q)

    which falls from 1 to ``final_factor`` at ``total_steps`` and stays there.

    The end of the decay can move during a run: after :meth:`end_at` the cosine continues
    from the factor it had reached, so the learning rate never jumps, and falls to
    ``final_factor`` at the new end. The steps before a move keep their factors.
    :class:`WarmupCosineLR` saves a moved schedule in its ``state_dict``, so a resumed run
    continues on it.

    Args:
        warmup_steps: Number of warm-up steps (0 disables warm-up).
        total_steps: Step at which the factor reaches ``final_factor``.
        final_factor: Final factor; the paper decays to 1/1000.
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, final_factor: float = 0.001):
        _check_schedule(warmup_steps, total_steps, final_factor)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_factor = final_factor
        # (step, progress of the cosine there): progress is linear in the step between knots
        # and reaches 1 at total_steps; end_at adds a knot where it moves the end.
        self.knots: list[tuple[int, float]] = [(warmup_steps, 0.0)]
        self.moved = False

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.final_factor
        q = 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))
        return q + self.final_factor * (1.0 - q)

    def _progress(self, step: int) -> float:
        ends = [*self.knots[1:], (self.total_steps, 1.0)]
        for (start, begin), (stop, end) in zip(self.knots, ends, strict=True):
            if step < stop:
                return begin + (end - begin) * (step - start) / (stop - start)
        return 1.0

    def end_at(self, total_steps: int, *, step: int) -> None:
        """Let the decay end at ``total_steps``, continuing from its factor at ``step``.

        Args:
            total_steps: The new end of the decay.
            step: The next step to take; it and the steps before it keep their factors. A
                warm-up not yet finished is kept, unless ``total_steps`` comes first: the
                warm-up is then shortened to end there, and the decay has no steps.

        Raises:
            ValueError: If ``total_steps`` is not after ``step``, ``step`` is before an
                earlier move, or the decay has already ended at ``step``.
        """
        if total_steps <= step:
            raise ValueError(f"total_steps must be > step={step}, got {total_steps}")
        if step >= self.total_steps:
            raise ValueError(f"the decay ended at step {self.total_steps}, before step {step}")
        last_knot = self.knots[-1][0]
        if step < last_knot and len(self.knots) > 1:
            raise ValueError(f"step {step} is before the last move, at step {last_knot}")
        if step > last_knot:
            self.knots.append((step, self._progress(step)))
        elif total_steps < self.warmup_steps:
            self.warmup_steps = total_steps
            self.knots = [(total_steps, 0.0)]
        self.total_steps = total_steps
        self.moved = True


class WarmupCosineLR(LambdaLR):
    """A LambdaLR of one :class:`WarmupCosine`: a resume restores it only where it was moved.

    Loading a ``state_dict`` restores the step count and, if :meth:`WarmupCosine.end_at` had
    moved the saved schedule, that moved schedule. An unmoved one is not restored: the
    schedule this scheduler was built with stays, so a rerun with more epochs follows the
    longer schedule (as if planned from the start) rather than the one it was saved with.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("lr_lambdas") or []
        if not any(isinstance(s, dict) and s.get("moved") for s in saved):
            state_dict = {**state_dict, "lr_lambdas": [None] * len(saved)}
        super().load_state_dict(state_dict)


def build_warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    final_factor: float = 0.001,
) -> LambdaLR:
    """Wrap :class:`WarmupCosine` in a scheduler to step once per step.

    Args:
        optimizer: Optimiser whose groups' ``initial_lr`` (or ``lr``) is the peak rate.
        warmup_steps: Number of warm-up steps.
        total_steps: Total number of optimiser steps of the run.
        final_factor: Final factor of the peak learning rate.

    Returns:
        A :class:`WarmupCosineLR`; call ``scheduler.step()`` after every ``optimizer.step()``.
        Its ``lr_lambdas`` hold the :class:`WarmupCosine` (one object for every group), whose
        :meth:`WarmupCosine.end_at` moves the end of the decay.
    """
    factor = WarmupCosine(
        warmup_steps=warmup_steps, total_steps=total_steps, final_factor=final_factor
    )
    return WarmupCosineLR(optimizer, lr_lambda=factor)


def _check_schedule(warmup_steps: int, total_steps: int, final_factor: float) -> None:
    """Reject schedule settings that cannot describe a warm-up followed by a decay."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0 <= final_factor <= 1:
        raise ValueError(f"final_factor must be in [0, 1], got {final_factor}")
