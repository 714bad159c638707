"""Running ``trainer.fit`` as a job: signals, exit codes and the ranks Lightning launched.

* SIGTERM or SIGUSR1 (preemption) checkpoint after the current step and exit with 143;
  Ctrl-C checkpoints and exits with 130 (Lightning's SIGTERM handling plus our callbacks).
* When one rank of a single-node job dies, rank 0 kills the ranks it launched and names the
  one that failed, instead of waiting in a collective until the 30-minute timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from barlowtwins.nn.distributed import DistributedJobError

# Exit codes of a stopped run: 128 + the signal, as shells report them.
EXIT_SIGTERM = 143
EXIT_INTERRUPTED = 130
# How long rank 0 waits for a launched rank's exit status after a collective failed.
_EXIT_STATUS_WAIT_S = 2.0


def run_training(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    checkpoint: Path,
) -> None:
    """``trainer.fit``, resuming from ``checkpoint`` when it exists, as a well-behaved job.

    Raises:
        SystemExit: 143 after SIGTERM/SIGUSR1, 130 after Ctrl-C (the checkpoint is saved).
        DistributedJobError: When a rank launched by this process died.
    """
    _treat_sigusr1_as_sigterm()
    resume = checkpoint if checkpoint.is_file() else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        print(
            f"stopped by SIGTERM/SIGUSR1 at step {trainer.global_step}: saved {checkpoint}; "
            "rerun the same command to resume"
        )
        raise SystemExit(EXIT_SIGTERM) from None
    except SystemExit:
        if not trainer.interrupted:
            raise
        # Lightning turns Ctrl-C into sys.exit(1) after PreemptionCheckpoint saved.
        print(
            f"interrupted at step {trainer.global_step}: saved {checkpoint}; "
            "rerun the same command to resume"
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception:
        failure = _stop_launched_ranks(trainer)
        if failure is not None:
            raise DistributedJobError(failure) from None
        raise


def _treat_sigusr1_as_sigterm() -> None:
    """Let SIGUSR1, which clusters also send before preemption, checkpoint and stop like SIGTERM.

    Under SLURM, Lightning installs its own SIGUSR1 handler when training starts (checkpoint
    and requeue) if none is installed yet, so this one is left out there.
    """
    if SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def _stop_launched_ranks(trainer: L.Trainer) -> str | None:
    """Kill the ranks that Lightning launched from this process; describe one that failed.

    On one node, Lightning starts ranks 1..N-1 as child processes of rank 0. When one of them
    dies, rank 0's next collective fails with a connection error that does not say why, so the
    message names the child's exit status instead.
    """
    launcher = trainer.strategy.launcher
    children = list(getattr(launcher, "procs", []))
    if launcher is None or not children:
        return None
    deadline = time.monotonic() + _EXIT_STATUS_WAIT_S
    while True:
        failed = [(rank, child) for rank, child in enumerate(children, 1) if child.poll()]
        if failed or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    launcher.kill(signal.SIGKILL)
    if not failed:
        return None
    rank, child = failed[0]
    code = child.returncode
    if code < 0:
        cause = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            cause += ", e.g. from the out-of-memory killer"
    else:
        cause = "its error is printed above"
    return f"local rank {rank} (pid {child.pid}) ended with code {code} ({cause}); job stopped"
