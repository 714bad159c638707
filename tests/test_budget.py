"""Tests for barlowtwins.app.budget: a wall-clock budget sets the schedule from a measured step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from barlowtwins.app.budget import TimeBudget, epochs_within_budget, schedule_for_budget
from barlowtwins.app.cli import main
from barlowtwins.app.config import ConfigError, load_fit_config
from barlowtwins.app.fit import fit, prepare

_TINY = {
    "accelerator": "cpu",
    "backbone": "resnet10",
    "projector_dims": (32, 32),
    "max_samples": 64,
    "val_max_samples": 64,
    "knn_bank_size": 64,
    "knn_k": 5,
    "batch_size": 16,
    "precision": "32",
    "plots": False,
}


# Full epochs of 100 steps of 0.5 s (x1.2 loop overhead) plus 20 000 monitor images at a sixth
# of 0.5 s / 512 each take 66.5 s.
@pytest.mark.parametrize(
    ("minutes", "monitor_images", "schedule"),
    [
        # 9.02 epochs: 9 full ones (900 steps) beat 10 of the 89 that fit beside a tenth
        # monitor (890).
        (10, 20_000, (9, 100)),
        # 4.51 epochs: 5 of 89 steps (445) beat 4 full ones (400).
        (5, 20_000, (5, 89)),
        # 4.96 epochs: 5 of 99 steps.
        (5.5, 20_000, (5, 99)),
        # Less than a step: one step.
        (0.01, 0, (1, 1)),
    ],
)
def test_the_schedule_fills_the_budget_with_the_monitor_included(
    minutes: float, monitor_images: int, schedule: tuple[int, int]
) -> None:
    assert (
        schedule_for_budget(
            minutes,
            step_seconds=0.5,
            steps_per_epoch=100,
            batch_size=256,
            monitor_images=monitor_images,
        )
        == schedule
    )


@pytest.mark.parametrize("minutes", [0.3, 1.3, 2.0, 4.7, 9.9, 30.0])
def test_the_schedule_fits_and_beats_whole_epochs_and_one_epoch_more(minutes: float) -> None:
    step, overhead, monitor, full = 0.4, 1.2, 1000 * 0.4 / 3 / (2 * 128), 50
    budget = minutes * 60

    def seconds(epochs: int, steps: int) -> float:
        return epochs * (steps * step * overhead + monitor)

    def most_steps(epochs: int) -> int:
        return epochs * max(
            (n for n in range(1, full + 1) if seconds(epochs, n) <= budget), default=0
        )

    epochs, steps = schedule_for_budget(
        minutes, step_seconds=step, steps_per_epoch=full, batch_size=128, monitor_images=1000
    )
    assert 1 <= steps <= full
    assert seconds(epochs, steps) <= budget
    assert steps == full or seconds(epochs, steps + 1) > budget
    whole = max(e for e in range(1, 1000) if seconds(e, full) <= budget or e == 1)
    assert epochs * steps >= max(most_steps(whole), most_steps(whole + 1))


def test_shortened_epochs_train_their_steps_and_end_the_cosine(tmp_path: Path) -> None:
    output = tmp_path / "run"
    # 64 images in batches of 16 are 4 steps an epoch; 3 of them, twice.
    config = load_fit_config(
        None, {**_TINY, "epochs": 2, "steps_per_epoch": 3, "output": str(output)}
    )
    run = prepare(config)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    checkpoint = torch.load(
        output / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["global_step"] == 6
    schedule = checkpoint["lr_schedulers"][0]
    assert schedule["last_epoch"] == 6
    for last, base in zip(schedule["_last_lr"], schedule["base_lrs"], strict=True):
        assert last == pytest.approx(base * config.hparams.final_lr_factor)


class _StopAtStart(Callback):
    """Ends the fit before its first step: the plan is made by then."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_the_schedule_is_sized_when_training_starts_and_recorded_at_once(tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = load_fit_config(None, {**_TINY, "time_budget": 600, "output": str(output)})
    run = prepare(config, callbacks=[_StopAtStart()])
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # Four steps of 16 tiny images take well under a second anywhere: 10 hours hold many.
    epochs, steps = run.trainer.max_epochs, run.trainer.limit_train_batches
    assert epochs is not None and epochs > 1 and isinstance(steps, int) and 1 <= steps <= 4
    # The learning-rate schedule was built for the plan.
    (schedule,) = run.trainer.lr_scheduler_configs
    assert schedule.scheduler.lr_lambdas[0].total_steps == epochs * steps  # type: ignore[attr-defined]
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert (saved["epochs"], saved["steps_per_epoch"]) == (epochs, steps)


def test_a_budget_trains_records_its_schedule_and_a_rerun_keeps_it(tmp_path: Path) -> None:
    output = tmp_path / "run"
    args = ["fit", "--output", str(output), "--time-budget", "0.0001"]
    for key, value in _TINY.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    assert main(args) == 0
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert (saved["epochs"], saved["steps_per_epoch"]) == (1, 1)
    # A rerun resumes the schedule it started with instead of timing the step again.
    rerun = prepare(load_fit_config(None, {**saved, "time_budget": 0.0001}))
    assert (rerun.config.hparams.epochs, rerun.config.steps_per_epoch) == (1, 1)
    # Under another budget, or none, the schedule would not match the run's: refused.
    for budget in (0.5, None):
        with pytest.raises(ConfigError, match=r"trains to a time budget of 0\.0001 min"):
            prepare(load_fit_config(None, {**saved, "time_budget": budget}))


@pytest.mark.parametrize(
    ("elapsed", "done", "epochs"),
    [(1.0, 1, 10), (2.5, 1, 4), (3.3, 3, 9), (10 / 3, 1, 3), (9.5, 5, 5), (12.0, 4, 4)],
)
def test_epochs_within_budget_extrapolate_the_mean_epoch(
    elapsed: float, done: int, epochs: int
) -> None:
    assert epochs_within_budget(10.0, elapsed_minutes=elapsed, epochs_done=done) == epochs


def _last_checkpoint(output: Path) -> dict:
    return torch.load(output / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _ends_at_the_final_rate(checkpoint: dict, final_factor: float) -> bool:
    schedule = checkpoint["lr_schedulers"][0]
    return all(
        last == pytest.approx(base * final_factor)
        for last, base in zip(schedule["_last_lr"], schedule["base_lrs"], strict=True)
    )


class _EpochsTake(Callback):
    """Gives the run's TimeBudget a clock on which every epoch takes ``minutes``."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = next(c for c in trainer.callbacks if isinstance(c, TimeBudget))
        budget.clock = lambda: (trainer.current_epoch + 1) * self.minutes


def test_a_budget_run_shortens_its_plan_to_the_minutes_its_epochs_take(tmp_path: Path) -> None:
    output = tmp_path / "run"
    # Timed, 4 tiny steps take well under a second anywhere: the plan is many epochs.
    config = load_fit_config(None, {**_TINY, "time_budget": 1.0, "output": str(output)})
    fit(config, callbacks=[_EpochsTake(0.3)])
    checkpoint = _last_checkpoint(output)
    # 0.3 min an epoch: 3 fit in 1 min, of the steps per epoch the first plan chose.
    steps = yaml.safe_load((output / "config.yaml").read_text())["steps_per_epoch"]
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 3 * steps
    assert checkpoint["callbacks"]["TimeBudget"] == {"epochs": 3}
    assert yaml.safe_load((output / "config.yaml").read_text())["epochs"] == 3
    assert _ends_at_the_final_rate(checkpoint, config.hparams.final_lr_factor)


class _StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_a_plan_lengthened_after_the_first_epoch_survives_a_resume(tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = load_fit_config(
        None, {**_TINY, "epochs": 2, "warmup_epochs": 0.5, "output": str(output)}
    )

    def budget_of_5_epochs(run_callbacks: list[Callback]) -> None:
        run = prepare(
            config, callbacks=[TimeBudget(1.0, plan=(2, 4)), _EpochsTake(0.2), *run_callbacks]
        )
        last = run.folder.last_checkpoint
        resume = last if last.is_file() else None
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resume)

    # Planned 2 epochs; 0.2 min each lets 5 fit in 1 min. Stopped after 3, then resumed.
    budget_of_5_epochs([_StopAfter(3)])
    interrupted = _last_checkpoint(output)
    assert interrupted["epoch"] == 2 and interrupted["callbacks"]["TimeBudget"] == {"epochs": 5}
    assert interrupted["lr_schedulers"][0]["lr_lambdas"][0]["total_steps"] == 5 * 4
    budget_of_5_epochs([])
    resumed = _last_checkpoint(output)
    assert resumed["epoch"] == 4 and resumed["global_step"] == 5 * 4
    assert _ends_at_the_final_rate(resumed, config.hparams.final_lr_factor)
