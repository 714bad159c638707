"""Size a run to a wall-clock budget: as many steps as the measured step time allows.

``barlowtwins fit --time-budget MINUTES`` times a few training steps of the run's own model,
augmentation, loss and optimiser on its own data, on the device that trains and in its
precision, with the batch each process trains on and, under DDP, the collectives of the
global batch (batch norms, loss, gradients). It adds the per-epoch kNN monitor's forward
passes and sets the epochs and the steps in each (and with them the warm-up and cosine
schedule) so that training ends within the budget; an epoch is the training data divided by
the *global* batch. After every epoch, :class:`TimeBudget` corrects the number of epochs from
the minutes the run itself has taken. A faster machine thus trains longer in the same minutes
instead of finishing early. The final scoring and plots come on top of the budget.

Every process of a DDP run times its steps together with the others (they meet in the same
collectives), and rank 0's plan is broadcast, so all ranks train the same schedule.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from barlowtwins.data import first_images
from barlowtwins.nn.distributed import sync_batchnorm, world_size
from barlowtwins.optim import WarmupCosine, build_optimizer
from barlowtwins.training.callbacks import TrainingClock
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

_log = logging.getLogger(__name__)

# Untimed steps first (allocator, oneDNN kernel selection, cuDNN autotuning), then the timed
# ones.
_WARMUP_STEPS = 2
_TIMED_STEPS = 6
# Lightning's loop, the per-step health metrics and logging, and checkpoints on top of the
# bare step: measured 1.19x on Fashion-MNIST defaults (0.419 s bare step, 61 s an epoch of 117
# steps with a 3 s monitor; benchmarks/README.md), where 1.05 had made a 13 min budget run
# 14.3 min.
_LOOP_OVERHEAD = 1.2
# A forward pass is about a third of a forward + backward pass.
_FORWARD_SHARE = 1 / 3


def measure_step_seconds(
    module: BarlowTwinsModule,
    images: torch.Tensor,
    sizes: torch.Tensor,
    *,
    device: torch.device,
    precision_context: Callable[[], AbstractContextManager[Any]],
) -> float:
    """Seconds of one training step (the views, loss, backward, optimiser) on ``images``.

    Runs on a copy of the module on ``device``, so the run itself starts from its untouched
    initial state. In a process group (DDP) every rank must call it at once: the copy's
    batch norms are synchronised as in training
    (:func:`~barlowtwins.nn.distributed.sync_batchnorm`), the loss takes its statistics over
    the global batch, and the gradients are all-reduced (in one flat buffer, where DDP
    overlaps buckets with the backward pass: an upper bound).

    Args:
        module: The run's module, before training.
        images: One process's batch of uint8 images.
        sizes: Their source sizes.
        device: The device that trains.
        precision_context: Enters the run's autocast (the Trainer's
            ``precision_plugin.forward_context``).

    Returns:
        The median time of the timed steps.
    """
    probe = copy.deepcopy(module).train()
    probe.prepare_for(device)
    probe.to(device)
    processes = world_size()
    if processes > 1:
        sync_batchnorm(probe.model, device)
    optimizer = build_optimizer(
        probe.model,
        name=probe.hyperparameters.optimizer,
        batch_size=len(images) * processes,
    )
    images, sizes = images.to(device), sizes.to(device)
    generator = torch.Generator(device).manual_seed(0)
    timings = []
    for step in range(_WARMUP_STEPS + _TIMED_STEPS):
        _synchronize(device)
        started = time.perf_counter()
        views = [
            v.contiguous(memory_format=torch.channels_last)
            for v in probe.make_views(images, generator, sizes)
        ]
        with precision_context():
            loss = probe.step_loss(views, step)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if processes > 1:
            _all_reduce_gradients(probe.model)
        optimizer.step()
        _synchronize(device)
        if step >= _WARMUP_STEPS:
            timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce_gradients(model: torch.nn.Module) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


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
        step_seconds: Measured time of one training step of the global batch (each process
            on its share).
        steps_per_epoch: Optimiser steps of a full epoch.
        batch_size: The global batch: images per step over all processes.
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


def epochs_within_budget(minutes: float, *, elapsed_minutes: float, epochs_done: int) -> int:
    """Epochs in all that end within ``minutes`` if each further one takes the mean so far.

    Args:
        minutes: Training budget.
        elapsed_minutes: Minutes the first ``epochs_done`` epochs took, monitor included.
        epochs_done: Epochs trained so far (at least 1).

    Returns:
        At least ``epochs_done``.
    """
    if epochs_done < 1:
        raise ValueError(f"epochs_done must be >= 1, got {epochs_done}")
    per_epoch = elapsed_minutes / epochs_done
    if per_epoch <= 0:
        raise ValueError(f"elapsed_minutes must be > 0, got {elapsed_minutes}")
    # A float tolerance: 3 epochs of exactly a third of the budget still fit.
    return epochs_done + max(0, math.floor((minutes - elapsed_minutes) / per_epoch + 1e-9))


class TimeBudget(Callback):
    """Plan a budget run's epochs and steps from a timed step, and re-plan its epochs after
    each one from the minutes it has taken.

    When training starts (Lightning's ``setup``, where the process group and the device
    exist but the optimiser and schedule are not built yet) it times the step
    (:func:`measure_step_seconds`) on the strategy's root device with the run's precision,
    sizes the schedule (:func:`schedule_for_budget`) with an epoch of the training data over
    the global batch, and sets the Trainer's epochs and steps per epoch; the learning-rate
    schedule is then built for that plan. A resumed run passes the plan it started with.

    The first plan comes from a few steps timed outside Lightning's loop, and those are only
    as good as the moment they run in: a probe 25 % slower than the run's own steps once made
    a 12.5-minute budget train 9.4 minutes (benchmarks/README.md). After every
    epoch, its kNN monitor included, this callback divides the minutes so far by the epochs
    done, sets the number of epochs that still fit, and moves the end of the learning-rate
    decay with it (:meth:`~barlowtwins.optim.WarmupCosine.end_at`), so the rate never jumps
    and reaches its final factor at the last step. Epochs are kept whole, with the steps per
    epoch the run started with; once the planned epochs are done, none are added (the decay
    has ended). Under DDP rank 0 decides and every rank follows.

    Args:
        minutes: Training budget.
        plan: ``(epochs, steps per epoch)`` of a run that was planned before (a resume), or
            None to plan when training starts.
        on_plan: Called on rank 0 with ``(epochs, steps per epoch)`` once they are planned
            (``fit`` records them in ``config.yaml``).
        clock: Minutes of training so far; by default the run's
            :class:`~barlowtwins.training.callbacks.TrainingClock`, which counts the minutes
            before a resume too.
    """

    def __init__(
        self,
        minutes: float,
        *,
        plan: tuple[int, int] | None = None,
        on_plan: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.minutes = minutes
        self.plan = plan
        self.on_plan = on_plan
        self.clock = clock
        self.epochs: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = state_dict["epochs"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        assert isinstance(datamodule, BarlowTwinsDataModule)
        assert isinstance(pl_module, BarlowTwinsModule)
        plan = _plan(self.minutes, trainer, pl_module, datamodule)
        epochs, steps = trainer.strategy.broadcast(plan, src=0)
        self.plan = (epochs, steps)
        trainer.fit_loop.max_epochs = epochs
        trainer.limit_train_batches = steps
        if trainer.is_global_zero and self.on_plan is not None:
            self.on_plan(epochs, steps)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed: the checkpoint's plan, set before Lightning decides whether epochs remain.
        if self.epochs is not None:
            trainer.fit_loop.max_epochs = self.epochs

    # Lightning runs the checkpoint callbacks last in this hook (fit saves there), after the
    # epoch's kNN monitor: the minutes include it and the checkpoint holds the new plan.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done, planned = trainer.current_epoch + 1, trainer.max_epochs
        if planned is None or done >= planned:
            return
        elapsed = self._elapsed(trainer)
        epochs = trainer.strategy.broadcast(
            epochs_within_budget(self.minutes, elapsed_minutes=elapsed, epochs_done=done), src=0
        )
        if epochs != planned:
            _log.info(
                "time budget %.1f min: %d epoch(s) took %.2f min, %d epochs fit (planned %d)",
                self.minutes,
                done,
                elapsed,
                epochs,
                planned,
            )
            if epochs > done:
                steps_per_epoch = trainer.global_step // done
                for schedule in self._schedules(trainer):
                    schedule.end_at(epochs * steps_per_epoch, step=trainer.global_step)
            trainer.fit_loop.max_epochs = epochs
        self.epochs = epochs

    def _elapsed(self, trainer: L.Trainer) -> float:
        if self.clock is not None:
            return self.clock()
        clock = next(c for c in trainer.callbacks if isinstance(c, TrainingClock))  # type: ignore[attr-defined]
        return clock.minutes()

    @staticmethod
    def _schedules(trainer: L.Trainer) -> list[WarmupCosine]:
        """Every schedule of the run's optimisers, once each (LambdaLR repeats it per group)."""
        found: dict[int, WarmupCosine] = {}
        for config in trainer.lr_scheduler_configs:
            for factor in getattr(config.scheduler, "lr_lambdas", ()):
                if isinstance(factor, WarmupCosine):
                    found[id(factor)] = factor
        return list(found.values())


def _plan(
    minutes: float,
    trainer: L.Trainer,
    module: BarlowTwinsModule,
    datamodule: BarlowTwinsDataModule,
) -> tuple[int, int]:
    """This process's plan for ``minutes`` (rank 0's is the one every rank trains)."""
    train, per_device = datamodule.train, datamodule.batch_size_per_device
    images, sizes = first_images(train, per_device)
    device = trainer.strategy.root_device
    step_seconds = measure_step_seconds(
        module,
        images,
        sizes,
        device=device,
        precision_context=trainer.precision_plugin.forward_context,
    )
    monitor = (
        sum(len(data) for data in (datamodule.knn_bank, datamodule.knn_query) if data is not None)
        if datamodule.has_knn_monitor
        else 0
    )
    full_epoch = len(train) // datamodule.batch_size
    epochs, steps = schedule_for_budget(
        minutes,
        step_seconds=step_seconds,
        steps_per_epoch=full_epoch,
        batch_size=datamodule.batch_size,
        monitor_images=monitor,
        views=module.batches_per_step,
    )
    if trainer.is_global_zero:
        _log.info(
            "time budget %.1f min: %.3f s per step of %d images (%d process(es) on %s) -> %d "
            "epochs of %d steps (%.2f epochs of all the data)",
            minutes,
            step_seconds,
            datamodule.batch_size,
            trainer.world_size,
            device.type,
            epochs,
            steps,
            epochs * steps / full_epoch,
        )
    return epochs, steps
