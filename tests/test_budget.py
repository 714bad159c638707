"""Tests for barlowtwins.app.budget: a wall-clock budget sets the epochs from a measured step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from barlowtwins.app.budget import epochs_for_budget
from barlowtwins.app.cli import main
from barlowtwins.app.config import ConfigError, load_fit_config
from barlowtwins.app.fit import prepare

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


def test_epochs_fill_the_budget_with_the_monitor_included() -> None:
    # 100 steps of 0.5 s (x1.2 loop overhead) plus 20 000 monitor images at a sixth of
    # 0.5 s / 512 each: 66.5 s an epoch; 10 minutes hold 9 of them.
    epochs = epochs_for_budget(
        10, step_seconds=0.5, steps_per_epoch=100, batch_size=256, monitor_images=20_000
    )
    assert epochs == 9
    assert (
        epochs_for_budget(
            0.01, step_seconds=0.5, steps_per_epoch=100, batch_size=256, monitor_images=0
        )
        == 1
    )


def test_prepare_sizes_the_schedule_and_a_rerun_keeps_it(tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = load_fit_config(None, {**_TINY, "time_budget": 600, "output": str(output)})
    run = prepare(config)
    # Four steps of 16 tiny images take well under a second anywhere: 10 hours hold many.
    assert run.config.epochs > 1 and run.trainer.max_epochs == run.config.epochs
    assert yaml.safe_load((output / "config.yaml").read_text())["epochs"] == run.config.epochs


def test_a_budget_trains_and_records_its_epochs(tmp_path: Path) -> None:
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
    assert yaml.safe_load((output / "config.yaml").read_text())["epochs"] == 1


def test_a_budget_needs_a_single_process(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="time_budget sizes single-process runs"):
        load_fit_config(None, {**_TINY, "time_budget": 5, "devices": 2, "output": str(tmp_path)})
