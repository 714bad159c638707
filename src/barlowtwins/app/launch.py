"""Running ``trainer.fit`` as a job: signals, exit codes and the ranks Lightning launched.

* SIGTERM, SIGUSR1 (preemption) or SIGINT (Ctrl-C) to any rank stops every rank at the end
  of the same step, saves that step in ``last.ckpt`` and exits with 128 + the signal (143,
  143 for SIGUSR1 as for SIGTERM, 130) (:class:`~barlowtwins.training.callbacks.SignalStop`).
* When one rank of a single-node job dies, rank 0 kills the ranks it launched and names the
  one that failed, instead of waiting in a collective until the process group's timeout; a
  rank that loses contact with the others (rank 0 died, a node went away) ends with one line
  too.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from barlowtwins.nn.distributed import DistributedJobError
from barlowtwins.training.callbacks import SignalStop

# Exit codes of a stopped run: 128 + the signal, as shells report them.
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT
# How long rank 0 waits for a launched rank's exit status after a collective failed.
_EXIT_STATUS_WAIT_S = 2.0
# Words of the errors a collective raises when another rank is gone (gloo's and NCCL's).
_LOST_CONTACT = (
    "gloo",
    "NCCL",
    "Connection closed",
    "Connection reset",
    "Broken pipe",
    "timed out",
)


def run_training(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    checkpoint: Path,
) -> None:
    """``trainer.fit``, resuming from ``checkpoint`` when it exists, as a well-behaved job.

    The trainer must hold a :class:`~barlowtwins.training.callbacks.SignalStop`.

    Raises:
        SystemExit: 143 after SIGTERM or SIGUSR1, 130 after SIGINT (the step is saved).
        DistributedJobError: When a rank launched by this process died, or this rank lost
            contact with the others.
    """
    stop = next(c for c in trainer.callbacks if isinstance(c, SignalStop))  # type: ignore[attr-defined]
    resume = checkpoint if checkpoint.is_file() else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        _exit_stopped(stop.signal or signal.SIGTERM, f"at step {trainer.global_step}", checkpoint)
    except SystemExit:
        if not trainer.interrupted:
            raise
        # Ctrl-C before training started: Lightning turns it into sys.exit(1).
        _exit_stopped(signal.SIGINT, "before training started", checkpoint)
    except Exception as error:
        failure = _stop_launched_ranks(trainer)
        if failure is not None:
            raise DistributedJobError(failure) from None
        if trainer.world_size > 1 and _lost_contact(error):
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise DistributedJobError(
                f"rank {trainer.global_rank} lost contact with the other processes ({first}); "
                "another rank stopped or died (see its output); rerun the command to resume"
            ) from None
        raise
    if stop.signal is not None:
        # The signal came after the last step, while the last epoch ended: its checkpoint is
        # saved; the scoring is left to the rerun.
        _exit_stopped(stop.signal, "after the last epoch", checkpoint)


def _exit_stopped(signum: int, when: str, checkpoint: Path) -> None:
    name = signal.Signals(signum).name
    saved = f"saved {checkpoint}" if checkpoint.is_file() else "nothing to save yet"
    print(f"stopped by {name} {when}: {saved}; rerun the same command to resume")
    raise SystemExit(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_SIGTERM)


def _lost_contact(error: Exception) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone."""
    if isinstance(error, dist.DistBackendError | dist.DistNetworkError):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in _LOST_CONTACT)


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
