"""Lightning plugins and callbacks: exact batch norm sync on any device, crash-safe and
safe-to-load checkpoints, a checkpoint on preemption."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from barlowtwins.nn.distributed import revert_global_batchnorm, sync_batchnorm
from barlowtwins.training.checkpoint import atomic_write, safe_load


class GlobalBatchNormSync(LayerSync):
    """Batch norms over the global batch on any device.

    Lightning's built-in ``sync_batchnorm=True`` uses ``torch.nn.SyncBatchNorm``, which only
    runs on CUDA. This plugin uses it on CUDA and :class:`GlobalBatchNorm` elsewhere (gloo on
    CPU), so a W-process run normalises exactly like one process on the global batch.
    Pass it as ``Trainer(plugins=[GlobalBatchNormSync()])`` with a DDP strategy.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        return sync_batchnorm(model, device)

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


class RngStateCheckpoint(Callback):
    """Keep torch's and Python's random state in checkpoints, so the epochs after a resume
    draw the same shuffles and augmentations as an uninterrupted run.

    Only plain tensors and tuples are stored (loadable with ``weights_only=True``); numpy's
    state is left out because the augmentation draws from torch. Under DDP rank 0's state is
    saved.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num``.

    ``fit`` logs each invocation as ``logs/run-NNN``, which the default bar would show as the
    meaningless ``v_num=-000``.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
