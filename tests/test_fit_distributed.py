"""``barlowtwins fit`` on 2 real gloo processes (``--devices 2 --accelerator cpu``): every rank
draws its own augmentations, reproducibly and across a kill and resume; the batch, the time
budget and the kNN monitor follow the global batch and the whole dataset, as one process would.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from _fit_process import (
    ENV,
    TWO_CPU_PROCESSES,
    WAIT_S,
    children,
    logged_fit,
    paused_fit,
    tail,
    wait_for_pause,
)
from barlowtwins.runs.files import safe_load
from conftest import ImageFolderFactory

# 64 images in global batches of 16 (8 per process): 4 steps an epoch.
_IMAGES, _BATCH, _EPOCHS = 64, 16, 2
_STEPS = _IMAGES // _BATCH
# One step past the first epoch's checkpoint.
_KILL_STEP = _STEPS + 1


def _identical_images(folder: Path) -> Path:
    """A flat (unlabelled) folder of ``_IMAGES`` copies of one image."""
    folder.mkdir(parents=True)
    image = Image.linear_gradient("L").resize((40, 40)).convert("RGB")
    for i in range(_IMAGES):
        image.save(folder / f"{i:03d}.png")
    return folder


def _fit_arguments(data: Path, output: Path) -> list[str]:
    return [
        "fit",
        *TWO_CPU_PROCESSES,
        "--data",
        str(data),
        "--image-size",
        "16",
        "--batch-size",
        str(_BATCH),
        "--epochs",
        str(_EPOCHS),
        "--output",
        str(output),
    ]


def _view_logs(folder: Path) -> dict[int, dict[int, str]]:
    """``{rank: {step: digest of that step's views}}`` from ``_paused_fit.py``'s VIEW_LOG."""
    logs: dict[int, dict[int, str]] = {}
    for rank in (0, 1):
        lines = (folder / f"rank-{rank}.txt").read_text().split("\n")
        logs[rank] = {
            int(step): digest for step, digest in (line.split() for line in lines if line)
        }
    return logs


@dataclass(frozen=True)
class _Runs:
    """One uninterrupted run; the same command killed (SIGKILL to both ranks) in its second
    epoch; and the rerun that resumed it."""

    unbroken: dict[int, dict[int, str]]
    unbroken_output: Path
    killed: dict[int, dict[int, str]]
    resumed: dict[int, dict[int, str]]
    resumed_from_step: int


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    root = tmp_path_factory.mktemp("ranks")
    data = _identical_images(root / "same")
    unbroken = root / "unbroken"
    logged_fit(
        _fit_arguments(data, unbroken), root / "views-unbroken", root / "unbroken.log", "VIEW_LOG"
    )

    killed_output, killed_views = root / "killed", root / "views-killed"
    killed_views.mkdir()
    arguments, log, marker = _fit_arguments(data, killed_output), root / "killed.log", root / "p"
    with paused_fit(arguments, _KILL_STEP, marker, log, {"VIEW_LOG": str(killed_views)}) as run:
        assert wait_for_pause(run, marker, log) == _KILL_STEP
        rank1 = children(run.pid)
        assert len(rank1) == 1, tail(log)
        for pid in (*rank1, run.pid):
            os.kill(pid, signal.SIGKILL)
    resumed_from = safe_load(killed_output / "checkpoints" / "last.ckpt")["global_step"]
    logged_fit(
        _fit_arguments(data, killed_output),
        root / "views-resumed",
        root / "resumed.log",
        "VIEW_LOG",
    )
    return _Runs(
        _view_logs(root / "views-unbroken"),
        unbroken,
        _view_logs(killed_views),
        _view_logs(root / "views-resumed"),
        resumed_from,
    )


@pytest.mark.slow
def test_two_ranks_draw_different_views_of_identical_images(runs: _Runs) -> None:
    steps = list(range(_EPOCHS * _STEPS))
    assert sorted(runs.unbroken[0]) == sorted(runs.unbroken[1]) == steps
    for step in steps:
        # Same images on both ranks: only independent augmentation streams tell them apart.
        assert runs.unbroken[0][step] != runs.unbroken[1][step], f"step {step}"
    assert len(set(runs.unbroken[0].values())) == len(steps)
    hardware = json.loads((runs.unbroken_output / "results.json").read_text())["hardware"]
    assert (hardware["devices"], hardware["batch_norm"]) == (2, "GlobalBatchNorm")


@pytest.mark.slow
def test_a_rerun_with_the_same_seed_draws_each_ranks_views_again(runs: _Runs) -> None:
    for rank in (0, 1):
        before_kill = sorted(runs.killed[rank])
        assert before_kill[:_KILL_STEP] == list(range(_KILL_STEP))
        for step in before_kill:
            assert runs.killed[rank][step] == runs.unbroken[rank][step], (rank, step)


@pytest.mark.slow
def test_a_kill_and_resume_continues_each_ranks_stream(runs: _Runs) -> None:
    # The kill came one step after the first epoch's checkpoint.
    assert runs.resumed_from_step == _STEPS
    for rank in (0, 1):
        assert sorted(runs.resumed[rank]) == list(range(_STEPS, _EPOCHS * _STEPS))
        for step, digest in runs.resumed[rank].items():
            assert digest == runs.unbroken[rank][step], (rank, step)


def _metrics(output: Path, column: str) -> list[float]:
    with open(output / "metrics.csv", newline="") as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


@pytest.mark.slow
def test_a_two_process_time_budget_plans_steps_of_the_global_batch(tmp_path: Path) -> None:
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "barlowtwins",
        "fit",
        *TWO_CPU_PROCESSES,
        "--max-samples",
        str(_IMAGES),
        "--val-max-samples",
        "50",
        "--knn-bank-size",
        "32",
        "--knn-k",
        "5",
        "--batch-size",
        str(_BATCH),
        "--time-budget",
        "0.05",
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    # Timed on the 2 processes together, planned for steps of the global batch of 16.
    assert f"per step of {_BATCH} images (2 process(es) on cpu)" in result.stderr
    saved = yaml.safe_load((output / "config.yaml").read_text())
    epochs, steps = saved["epochs"], saved["steps_per_epoch"]
    # An epoch of 64 images is 4 steps of the global batch (8 of a process's batch).
    assert 1 <= steps <= _STEPS and epochs >= 1
    last = safe_load(output / "checkpoints" / "last.ckpt")
    assert (last["epoch"] + 1, last["global_step"]) == (epochs, epochs * steps)
    assert (saved["batch_size"], saved["batch_size_per_device"]) == (_BATCH, _BATCH // 2)


@pytest.mark.slow
def test_the_monitor_bank_of_a_lazily_loaded_folder_is_knn_bank_size_images(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    # 63 labelled images: the distributed sampler pads both the 25-image bank and the queries
    # to an even count; the monitor counts every image once.
    data = image_folder("labelled", count=63, classes=3)
    output = tmp_path / "run"
    arguments = [
        *_fit_arguments(data, output)[:-4],
        "--epochs",
        "1",
        "--output",
        str(output),
        "--val-data",
        str(data),
        "--no-in-memory",
        "--knn-bank-size",
        "25",
        "--knn-k",
        "5",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "barlowtwins", *arguments],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _metrics(output, "knn_bank_images") == [25.0]
    assert _metrics(output, "knn_query_images") == [63.0]
    (share,) = _metrics(output, "knn_monitor_share")
    assert 0 < share < 1
    config = yaml.safe_load((output / "config.yaml").read_text())
    assert config["num_workers"] > 0  # decoded per batch in workers, not in memory
