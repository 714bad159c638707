"""Size a run to a wall-clock budget: as many steps as the measured step time allows.

``barlowtwins fit --time-budget MINUTES`` times a few training steps of the run's own model,
augmentation, loss and optimiser on its own data and precision, adds the per-epoch kNN
monitor's forward passes, and sets the epochs and the steps in each (and with them the
warm-up and cosine schedule) so that training ends within the budget. A faster machine thus
trains longer in the same minutes instead of finishing early. The final scoring and plots come
on top of the budget.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from barlowtwins.nn.convolution import use_small_output_convolutions
from barlowtwins.optim import build_optimizer
from barlowtwins.precision import autocast
from barlowtwins.training.module import BarlowTwinsModule

# Untimed steps first (allocator, oneDNN kernel selection), then the timed ones.
_WARMUP_STEPS = 2
_TIMED_STEPS = 6
# Lightning's loop, the per-step health metrics and logging, and checkpoints on top of the
# bare step: measured 1.19x on Fashion-MNIST defaults (0.419 s bare step, 61 s an epoch of 117
# steps with a 3 s monitor; session 6), where 1.05 had made a 13 min budget run 14.3 min.
_LOOP_OVERHEAD = 1.2
# A forward pass is about a third of a forward + backward pass.
_FORWARD_SHARE = 1 / 3


def measure_step_seconds(
    module: BarlowTwinsModule, images: torch.Tensor, *, precision: str, cpu_convolutions: bool
) -> float:
    """Seconds of one training step (the views, loss, backward, optimiser) on ``images``.

    Runs on a copy of the module, so the run itself starts from its untouched initial state.
    """
    probe = copy.deepcopy(module).train()
    if cpu_convolutions:
        use_small_output_convolutions(probe.backbone)
    probe.model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        probe.model, name=str(probe.hparams["optimizer"]), batch_size=len(images)
    )
    generator = torch.Generator().manual_seed(0)
    timings = []
    for step in range(_WARMUP_STEPS + _TIMED_STEPS):
        started = time.perf_counter()
        views = [
            v.contiguous(memory_format=torch.channels_last)
            for v in probe.make_views(images, generator)
        ]
        with autocast("cpu", precision):
            loss = probe.step_loss(views, step)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= _WARMUP_STEPS:
            timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


def schedule_for_budget(
    minutes: float,
    *,
    step_seconds: float,
    steps_per_epoch: int,
    batch_size: int,
    monitor_images: int,
    views: int = 2,
) -> tuple[int, int]:
    """Epochs, and steps in each, that fill ``minutes`` with training and the kNN monitor.

    Either the whole epochs that fit, or one epoch more with every epoch shortened to the
    same number of steps so that the last one ends within the budget, whichever trains more
    steps: a budget of 4.7 full epochs trains 5 epochs of 94 % of the data (each drawn from a
    fresh shuffle of all of it) rather than 4, one of 9.02 trains 9 full epochs (a tenth
    monitor would cost more than the shortening gains). Every epoch ends with the monitor
    and a checkpoint.

    Args:
        minutes: Training budget.
        step_seconds: Measured time of one training step of ``batch_size`` images.
        steps_per_epoch: Optimiser steps of a full epoch.
        batch_size: Images per step (per process).
        monitor_images: Images the per-epoch kNN monitor embeds (bank and queries).
        views: Batches embedded in a training step
            (:attr:`~barlowtwins.training.module.BarlowTwinsModule.batches_per_step`).

    Returns:
        ``(epochs, steps per epoch)``, each at least 1, the steps at most ``steps_per_epoch``.
    """
    step = step_seconds * _LOOP_OVERHEAD
    monitor = monitor_images * step_seconds * _FORWARD_SHARE / (views * batch_size)
    budget = minutes * 60
    whole = math.floor(budget / (steps_per_epoch * step + monitor))
    options = [(whole, steps_per_epoch)] if whole >= 1 else []
    shortened = math.floor((budget / (whole + 1) - monitor) / step)
    options.append((whole + 1, min(steps_per_epoch, max(1, shortened))))
    return max(options, key=lambda option: option[0] * option[1])
