"""Lightning plugins and callbacks: exact batch norm sync on any device, crash-safe and
safe-to-load checkpoints, a checkpoint on preemption, training health, a training clock."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, TQDMProgressBar
from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from barlowtwins.data import first_images
from barlowtwins.health import (
    EFFECTIVE_RANK,
    EMBEDDING_STD,
    INITIAL_STEPS,
    INVARIANCE,
    REDUNDANCY,
    EpochHealth,
    diagnose,
    effective_rank,
)
from barlowtwins.hparams import Hyperparameters
from barlowtwins.nn.distributed import (
    global_rank,
    revert_global_batchnorm,
    sync_batchnorm,
    world_size,
)
from barlowtwins.runs.files import atomic_write, safe_load

_log = logging.getLogger("barlowtwins")


class GlobalBatchNormSync(LayerSync):
    """Batch norms over the global batch on any device.

    Lightning's built-in ``sync_batchnorm=True`` uses ``torch.nn.SyncBatchNorm``, which only
    runs on CUDA. This plugin uses it on CUDA and :class:`GlobalBatchNorm` elsewhere (gloo on
    CPU), so a W-process run normalises exactly like one process on the global batch.
    Pass it as ``Trainer(plugins=[GlobalBatchNormSync()])`` with a DDP strategy.

    The choice follows the device the strategy trains on (its root device): Lightning applies
    the plugin while the parameters are still on the CPU, before it moves them to the GPU.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return sync_batchnorm(model, training_device(model))

    def revert(self, model: nn.Module) -> nn.Module:
        return TorchSyncBatchNorm().revert(revert_global_batchnorm(model))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (temporary file, fsync, rename) and read with
    ``weights_only=True``, so a kill never leaves a half-written ``last.ckpt`` and a
    checkpoint from elsewhere cannot run code when loaded."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return safe_load(path)


class WeightEMA(EMAWeightAveraging):
    """An exponential moving average of the weights, kept on the training device; the kNN
    monitor, the final scores, the checkpoints' ``state_dict`` and the export all use it.

    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`, whose average lives
    where the module is when fit begins: that is the CPU before the strategy moves it, so on
    a GPU each step would copy the weights to the host. The average of the supervised CIFAR-10
    speedruns (Jordan 2024, arXiv 2404.00498) and of BYOL's target network (Grill et al. 2020,
    arXiv 2006.07733), here only an estimate: it never feeds the loss.
    """

    def __init__(self, decay: float) -> None:
        super().__init__(decay=decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The constructor's ``device`` argument, set once the trainer knows its device.
        self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` when training is stopped by SIGTERM (cluster preemption) or Ctrl-C.

    Lightning stops after the current step on SIGTERM; this writes the state of that step, so
    rerunning the same command resumes there. Other exceptions (such as a non-finite loss)
    save nothing: the weights may be corrupt, and the last good checkpoint must stay.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException | KeyboardInterrupt):
            # The full training state (optimiser, loops, callbacks), so a rerun resumes here.
            trainer.save_checkpoint(self.path, weights_only=False)


class SignalStop(Callback):
    """Stop every rank after the same step when any rank gets SIGTERM, SIGUSR1 or SIGINT, so
    that :class:`PreemptionCheckpoint` saves that step on all of them together.

    The handlers only note the signal: a collective inside a signal handler (what Lightning's
    own SIGTERM handler does under DDP) waits for ranks that never join it, and a
    ``KeyboardInterrupt`` raised in mid-step leaves one rank saving a checkpoint while another
    waits in the step's all-reduce. Before every training step the ranks all-reduce the signal
    they noted (the largest wins) and all raise Lightning's ``SIGTERMException`` at once, before
    the next step, with the state of the step the signal came in. Under
    SLURM, SIGUSR1 is left to Lightning's requeue handler.

    Attributes:
        signal: The signal that stopped training, or None.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has registered its handlers (it restores the ones before it on
        # teardown), and in the main thread only, where Python delivers signals.
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM, signal.SIGINT]
        if not SLURMEnvironment.detect():
            signals.append(signal.SIGUSR1)
        for signum in signals:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            _log.info("received %s: stopping after this step", signal.Signals(signum).name)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Before the next step rather than after this one: a signal noted during the step's
        # last callbacks still stops the run with that step's state.
        noted = self.signal or 0
        if world_size() > 1:
            # One process alone needs no tensor: on a GPU, reading one back each step would
            # wait for the step's kernels.
            flag = torch.tensor([noted], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            noted = int(flag.item())
        if noted:
            self.signal = noted
            raise SIGTERMException


def training_device(model: nn.Module) -> torch.device:
    """The device ``model`` trains on: its trainer's root device when it is a LightningModule
    attached to one, else the device of its parameters."""
    trainer = getattr(model, "_trainer", None)
    if trainer is not None:
        return trainer.strategy.root_device
    return next(model.parameters()).device


class RngStateCheckpoint(Callback):
    """Keep every rank's torch and Python random state in checkpoints, so the epochs after a
    resume draw the same shuffles as an uninterrupted run.

    The views draw from their own per-rank, per-step streams
    (:func:`barlowtwins.training.module.view_seed`), which need no saved state; this covers
    what still draws from the global generators (the single-process shuffle, the DataLoader
    workers' base seeds). Under DDP the states of all ranks are gathered into the checkpoint
    and each rank restores its own; a checkpoint from a run with fewer ranks gives the others
    rank 0's. Only plain tensors and tuples are stored (loadable with ``weights_only=True``);
    numpy's state is left out because nothing here draws from it.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if world_size() == 1:
            return state
        # Every rank builds the checkpoint (Lightning's save is collective); rank 0 writes it.
        states: list[Any] = [None] * world_size()
        dist.all_gather_object(states, state)
        return {**states[0], "ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or [state_dict]
        rank = global_rank()
        state = ranks[rank] if rank < len(ranks) else ranks[0]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num``.

    ``fit`` logs each invocation as ``logs/run-NNN``, which the default bar would show as the
    meaningless ``v_num=-000``.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


TRAIN_MINUTES = "train_minutes"
KNN_MONITOR_SHARE = "knn_monitor_share"


class TrainingClock(Callback):
    """Wall-clock minutes since training started, logged after every epoch as ``train_minutes``,
    and the share of each epoch that the kNN monitor took, as ``knn_monitor_share``.

    The minutes include the epoch's kNN monitor and checkpoints: they are what a user waits,
    which time-to-accuracy plots need. A resumed run continues from the minutes its checkpoint
    holds (the time between the crash and the resume is not counted). The monitor's share is
    the seconds of the epoch's validation loop over the seconds of the whole epoch.
    """

    def __init__(self) -> None:
        self.minutes_before_start = 0.0
        self._started: float | None = None
        self._epoch_started = 0.0
        self._monitor_started = 0.0
        self._monitor_seconds = 0.0

    def minutes(self) -> float:
        """Minutes of training so far, this process's and those before its checkpoint."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.minutes_before_start + running / 60

    def state_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.minutes_before_start = float(state_dict["minutes"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started, self._monitor_seconds = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._monitor_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._monitor_seconds += time.perf_counter() - self._monitor_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log(TRAIN_MINUTES, self.minutes(), rank_zero_only=True)
        if self._monitor_seconds > 0:
            epoch = time.perf_counter() - self._epoch_started
            pl_module.log(KNN_MONITOR_SHARE, self._monitor_seconds / epoch, rank_zero_only=True)


class TrainingHealth(Callback):
    """Effective rank of held-out features per epoch, and a warning if the run looks broken.

    At the start of training and after every epoch, the backbone features of the first
    ``held_out_images`` images of the kNN monitor's query data (held out from training; the
    training data when there is none) give :func:`barlowtwins.health.effective_rank`, logged
    as ``effective_rank``. With the epoch's mean loss terms and embedding spread, which the
    module's ``training_step`` returns under ``"health"``, they go through
    :func:`barlowtwins.health.diagnose`; each kind of problem it finds is logged once per run,
    as a warning with advice (what was warned is kept in checkpoints). Only rank 0 measures
    and warns: every rank holds the same global loss.

    Works with :class:`barlowtwins.training.module.BarlowTwinsModule` (which adds it by itself)
    and its :class:`~barlowtwins.training.datamodule.BarlowTwinsDataModule`.

    Args:
        held_out_images: Images whose features give the effective rank (at most ``min(N, F)``).
    """

    def __init__(self, held_out_images: int = 512) -> None:
        self.held_out_images = held_out_images
        self.initial_invariance: float | None = None
        self.initial_effective_rank: float | None = None
        self.warned: list[str] = []
        self._initial_sum = 0.0
        self._held_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: torch.Tensor | None = None
        self._steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_invariance": self.initial_invariance,
            "initial_effective_rank": self.initial_effective_rank,
            "warned": list(self.warned),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_invariance = state_dict["initial_invariance"]
        self.initial_effective_rank = state_dict["initial_effective_rank"]
        self.warned = list(state_dict["warned"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._held_out = self._held_out_images(trainer)
        if self._held_out is None:
            _log.info("training health: no held-out images found, effective rank not measured")
            return
        if self.initial_effective_rank is None:
            self.initial_effective_rank = self._rank(trainer, pl_module)
            # Logged straight to the loggers (Lightning's self.log is not open at train start),
            # with the epoch column that Lightning's own rows carry.
            metrics = {EFFECTIVE_RANK: self.initial_effective_rank, "epoch": trainer.current_epoch}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums, self._steps = None, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        health = outputs.get("health") if isinstance(outputs, Mapping) else None
        if health is None or not trainer.is_global_zero:
            return
        # Summed on the device: no host synchronisation per step.
        names = (INVARIANCE, REDUNDANCY, EMBEDDING_STD)
        values = torch.stack([health[name].float() for name in names])
        self._sums = values if self._sums is None else self._sums + values
        self._steps += 1
        # The reference of the stall rule: the run's first steps (a resumed run keeps its own).
        if self.initial_invariance is None and trainer.global_step <= INITIAL_STEPS:
            self._initial_sum += float(health[INVARIANCE])
            if trainer.global_step == INITIAL_STEPS:
                self.initial_invariance = self._initial_sum / INITIAL_STEPS

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._sums is None:
            return
        invariance, redundancy, spread = (self._sums / self._steps).tolist()
        rank = None
        if self._held_out is not None:
            rank = self._rank(trainer, pl_module)
            pl_module.log(EFFECTIVE_RANK, rank, prog_bar=True, rank_zero_only=True)
        method: Hyperparameters = getattr(pl_module, "hyperparameters")  # noqa: B009
        problems = diagnose(
            EpochHealth(
                num_features=int(method.projector_dims[-1]),
                lambda_param=float(method.lambda_param),
                steps=trainer.global_step,
                initial_invariance=self.initial_invariance,
                invariance=invariance,
                redundancy=redundancy,
                embedding_std=spread,
                effective_rank=rank,
                initial_effective_rank=self.initial_effective_rank,
            )
        )
        for problem in problems:
            if problem.kind in self.warned:
                continue
            self.warned.append(problem.kind)
            _log.warning(
                "barlowtwins: warning: after epoch %d the run looks broken: %s "
                "(see docs/is_it_working.md)",
                trainer.current_epoch,
                problem.message,
            )

    def _held_out_images(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        datamodule = getattr(trainer, "datamodule", None)
        for name in ("knn_query", "train"):
            data = getattr(datamodule, name, None)
            if data is not None and len(data) >= 2:
                return first_images(data, self.held_out_images)
        return None

    def _rank(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        assert self._held_out is not None
        features = getattr(pl_module, "held_out_features")  # noqa: B009 (BarlowTwinsModule's)
        # In the run's precision, like the kNN monitor's features.
        with trainer.precision_plugin.forward_context():
            held_out = features(*self._held_out)
        return effective_rank(held_out.float())
