"""The ``barlowtwins`` command, paused at a known training step, for tests that act on a run
(kill it, signal it) at a known point instead of guessing how long training takes.

    python tests/_paused_fit.py STEP MARKER fit [OPTIONS...]

runs ``barlowtwins fit [OPTIONS...]`` through :func:`barlowtwins.app.cli.main`, so its output and
errors are the command's, with one more Lightning callback: on global rank 0, at the end of
the training step that makes ``trainer.global_step == STEP``, it writes the file MARKER (which
holds the step) and then waits until a line or the end of its standard input arrives. The
other ranks do not pause; they wait for rank 0 in their next collective. Lightning restarts
this script with the same arguments for ranks 1.. of a one-node DDP run. ``STEP`` -1 never
pauses.

With the environment variable ``VIEW_LOG`` set to a folder, every rank also appends one line
per training step to ``VIEW_LOG/rank-R.txt``: the step and a SHA-256 of the augmented views
it trains on (what the tests of per-rank augmentation streams compare).

With ``BATCH_LOG`` set to a folder, every rank appends one line per training step to
``BATCH_LOG/rank-R.txt``: the step, the epoch, the indices of the images of its batch
(comma-separated) and the step's loss (``float.hex``); rank 0 also saves the model's weights
before the first step to ``BATCH_LOG/initial.pt`` (what the tests of streamed data compare).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

import barlowtwins.app.fit
from barlowtwins.app.cli import main


class PauseAtStep(Callback):
    """On rank 0, announce ``step`` in ``marker``, then block on standard input."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_rank != 0 or trainer.global_step != self.step:
            return
        # Written under another name and renamed, so the test never reads half a marker.
        partial = self.marker.with_name(self.marker.name + ".partial")
        partial.write_text(f"{trainer.global_step}\n")
        partial.replace(self.marker)
        sys.stdin.readline()


class ViewLog(Callback):
    """Appends ``STEP SHA256`` of each training step's views to ``folder/rank-R.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        views = batch[0]  # after the module's transfer hook: (views, labels, indices)
        digest = hashlib.sha256()
        for view in views:
            digest.update(view.detach().cpu().contiguous().numpy().tobytes())
        with open(self.folder / f"rank-{trainer.global_rank}.txt", "a") as log:
            log.write(f"{trainer.global_step} {digest.hexdigest()}\n")


class BatchLog(Callback):
    """Appends ``STEP EPOCH INDICES LOSS`` of each training step to ``folder/rank-R.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 0:
            torch.save(pl_module.model.state_dict(), self.folder / "initial.pt")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        indices = ",".join(str(i) for i in batch[2].tolist())
        loss = float(outputs["loss"]).hex()
        step = trainer.global_step - 1  # the optimiser has stepped
        with open(self.folder / f"rank-{trainer.global_rank}.txt", "a") as log:
            log.write(f"{step} {trainer.current_epoch} {indices} {loss}\n")


if __name__ == "__main__":
    step, marker, *command = sys.argv[1:]
    callbacks: list[Callback] = [PauseAtStep(int(step), Path(marker))]
    if os.environ.get("VIEW_LOG"):
        callbacks.append(ViewLog(Path(os.environ["VIEW_LOG"])))
    if os.environ.get("BATCH_LOG"):
        # Before the pause, so that the step rank 0 pauses after is logged too.
        callbacks.insert(0, BatchLog(Path(os.environ["BATCH_LOG"])))
    # The command looks fit() up in barlowtwins.app.fit when it runs; it has no option of its own
    # for extra callbacks, fit() has.
    barlowtwins.app.fit.fit = functools.partial(barlowtwins.app.fit.fit, callbacks=callbacks)
    sys.exit(main(command))
