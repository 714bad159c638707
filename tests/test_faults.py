"""Faults without damage: a full disk, torn or foreign files, hostile configs, two writers of one
run, signals and a killed rank under DDP. Each fault ends in one line (``barlowtwins: error:``)
and its exit code, never a traceback; the previous good file stays intact, and a rerun resumes
where a resume makes sense (docs/failure_behaviour.md lists what the user sees).

The full-disk tests mount a real tmpfs of a few hundred kilobytes, which needs root (CI runs as
root); elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from _fit_process import (
    ENV,
    WAIT_S,
    alive,
    children,
    go_on,
    only_error_line,
    paused_fit,
    tail,
    wait_for_pause,
    wait_until,
)
from barlowtwins.runs import RunFolder, safe_load

# A tiny run: timm's test_efficientnet (0.1 M parameters) keeps checkpoints near 1 MB, so a
# full disk can be a tmpfs of a few megabytes. 64 images in batches of 16: 4 steps an epoch.
_TINY = [
    "--accelerator",
    "cpu",
    "--backbone",
    "timm:test_efficientnet",
    "--projector-dims",
    "16",
    "16",
    "--max-samples",
    "64",
    "--val-max-samples",
    "50",
    "--knn-bank-size",
    "32",
    "--knn-k",
    "5",
    "--batch-size",
    "16",
    "--precision",
    "32",
    "--no-plots",
]
_STEPS = 4


def _barlowtwins(*arguments: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "barlowtwins", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def _fit(output: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return _barlowtwins("fit", *_TINY, "--epochs", str(epochs), "--output", str(output), *extra)


def _error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a command that failed as it should (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    return only_error_line(result.stderr)


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    """A finished one-epoch run, copied by the tests that change it."""
    pytest.importorskip("timm")
    output = tmp_path_factory.mktemp("finished") / "run"
    result = _fit(output, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return RunFolder(output)


def _copy(run: RunFolder, tmp_path: Path) -> RunFolder:
    target = tmp_path / "run"
    shutil.copytree(run.path, target)
    return RunFolder(target)


# A full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes; returns the filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_during_fit_is_one_line_and_keeps_the_last_checkpoint(
    finished: RunFolder, small_disk: Path
) -> None:
    run = RunFolder(small_disk / "run")
    shutil.copytree(finished.path, run.path)
    good = run.last_checkpoint.read_bytes()
    filler = _fill(small_disk, leave=100_000)
    # The second epoch's checkpoint no longer fits.
    error = _error(_fit(run.path, 2))
    assert "cannot write" in error and "last.ckpt" in error and "space" in error
    assert run.last_checkpoint.read_bytes() == good
    assert _no_temporary_files(run.path)
    # With space again, the same command resumes from the first epoch and finishes.
    filler.unlink()
    result = _fit(run.path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert safe_load(run.last_checkpoint)["epoch"] == 1


def test_a_full_disk_during_export_keeps_the_previous_export(
    finished: RunFolder, small_disk: Path
) -> None:
    target = small_disk / "encoder.safetensors"
    args = ["export", str(finished.path), "--format", "safetensors", "--output", str(target)]
    assert _barlowtwins(*args).returncode == 0
    good = target.read_bytes()
    _fill(small_disk, leave=20_000)
    error = _error(_barlowtwins(*args, "--force"))
    assert "cannot write" in error and "encoder.safetensors" in error and "space" in error
    assert target.read_bytes() == good
    assert _no_temporary_files(small_disk)


def test_a_full_disk_during_embed_leaves_no_broken_npz(
    finished: RunFolder, small_disk: Path
) -> None:
    target = small_disk / "features.npz"
    _fill(small_disk, leave=20_000)
    args = ["embed", str(finished.path), "--data", "fashion-mnist:test", "--max-samples", "500"]
    error = _error(_barlowtwins(*args, "--output", str(target)))
    assert "cannot write" in error and "features.npz" in error
    assert not target.exists() and _no_temporary_files(small_disk)


# Files of a run folder that are torn or foreign ------------------------------------------------


def test_a_foreign_last_checkpoint_is_one_line(finished: RunFolder, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    torch.save({"weights": torch.zeros(3)}, run.last_checkpoint)
    planted = run.last_checkpoint.read_bytes()
    error = _error(_fit(run.path, 2))
    assert "last.ckpt is not a checkpoint of barlowtwins fit" in error
    assert "move it away" in error
    assert run.last_checkpoint.read_bytes() == planted


def test_a_torn_config_yaml_is_one_line(finished: RunFolder, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    run.config.write_text("recipe: fashion-mnist-cpu\nprojector_dims: [16,\n")
    error = _error(_fit(run.path, 2))
    assert "config.yaml is not valid YAML" in error and "move it away" in error


def test_a_torn_metrics_log_does_not_block_finishing_the_run(
    finished: RunFolder, tmp_path: Path
) -> None:
    run = _copy(finished, tmp_path)
    log = run.logs / "run-000" / "metrics.csv"
    text = log.read_text()
    log.write_text(text[: len(text) - 7])  # a kill in mid-write cut its last row
    result = _fit(run.path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 torn row(s)" in result.stderr
    assert run.results.is_file() and "Traceback" not in result.stderr


def test_an_export_header_without_an_expected_key_is_one_line(
    finished: RunFolder, tmp_path: Path
) -> None:
    full = tmp_path / "full.safetensors"
    exported = _barlowtwins("export", str(finished.path), "--format", "full", "--output", str(full))
    assert exported.returncode == 0, exported.stderr[-3000:]
    with safe_open(full, framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    del metadata["projector_dims"]
    save_file(tensors, full, metadata=metadata)
    again = tmp_path / "again.safetensors"
    error = _error(_barlowtwins("export", str(full), "--format", "full", "--output", str(again)))
    assert "incomplete or invalid barlowtwins header" in error and "projector_dims" in error


def test_a_backbone_json_of_the_wrong_type_is_one_line(finished: RunFolder, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    info = json.loads(run.encoder_info.read_text())
    run.encoder_info.write_text(json.dumps({**info, "in_channels": "abc"}))
    args = ["embed", str(run.path), "--data", "fashion-mnist:test", "--max-samples", "8"]
    error = _error(_barlowtwins(*args, "--output", str(tmp_path / "x.npz")))
    assert "corrupt" in error and "backbone.json" in error and "in_channels" in error


def test_an_absurd_image_size_in_an_export_is_refused_up_front(
    finished: RunFolder, tmp_path: Path
) -> None:
    encoder = tmp_path / "encoder.safetensors"
    args = ["export", str(finished.path), "--format", "safetensors", "--output", str(encoder)]
    assert _barlowtwins(*args).returncode == 0
    with safe_open(encoder, framework="pt") as handle:
        metadata = {**handle.metadata(), "image_size": "200000"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, encoder, metadata=metadata)
    embed = ["embed", str(encoder), "--data", "fashion-mnist:test", "--max-samples", "8"]
    error = _error(_barlowtwins(*embed, "--output", str(tmp_path / "x.npz")))
    assert "image_size must be an integer in [1, 8192], got 200000" in error


# Two writers, hostile configs, small mistakes --------------------------------------------------


def test_a_second_fit_on_the_same_output_names_the_first(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    output, log, marker = tmp_path / "run", tmp_path / "first.log", tmp_path / "paused"
    arguments = ["fit", *_TINY, "--epochs", "2", "--output", str(output)]
    with paused_fit(arguments, 1, marker, log) as first:
        wait_for_pause(first, marker, log)
        error = _error(_fit(output, 2))
        assert f"in use by another barlowtwins fit (pid {first.pid})" in error
        # A lock left by a killed process does not block a rerun: the system releases it.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    result = _fit(output, 2)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            # "Billion laughs": 331 bytes that expand to a billion strings.
            "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
            + "".join(
                f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n"
                for a, b in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "nests deeper than 4 levels",
        ),
        (
            # Flat aliases: 1 000 x 1 000 values without nesting.
            "a: &a [" + ", ".join(["x"] * 1000) + "]\nb: [" + ", ".join(["*a"] * 1000) + "]\n",
            "expands to more than 10000 values (YAML aliases?)",
        ),
        ("epochs: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than 4 levels"),
        ("epochs: 1\n#" + "x" * 2_000_000 + "\n", "a config holds at most 1048576"),
    ],
    ids=["alias-bomb", "flat-aliases", "deep", "large"],
)
def test_a_hostile_config_is_refused_in_one_line(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(content)
    error = _error(_barlowtwins("fit", "--config", str(config), "--print-config", timeout=120))
    assert message in error and "hostile.yaml" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["embed", "RUN", "--data", "fashion-mnist", "--output", "x.npz", "--device", "tpu9"],
            "accelerator must be one of auto, cpu, gpu, cuda or cuda:N, got 'tpu9'",
        ),
        (
            ["fit", "--accelerator", "mps", "--print-config"],
            "accelerator mps is not available on this machine",
        ),
    ],
    ids=["embed-device", "fit-mps"],
)
def test_an_unknown_or_absent_accelerator_is_one_line(
    finished: RunFolder, tmp_path: Path, arguments: list[str], message: str
) -> None:
    arguments = [str(finished.path) if a == "RUN" else a for a in arguments]
    arguments = [str(tmp_path / a) if a.endswith(".npz") else a for a in arguments]
    assert message in _error(_barlowtwins(*arguments))


# Signals and a killed rank under DDP -----------------------------------------------------------


def _two_ranks(
    output: Path, log: Path, marker: Path, *, new_session: bool = False
) -> tuple[AbstractContextManager[subprocess.Popen[bytes]], list[str]]:
    # Paused one step past the first epoch's checkpoint, rank 1 waiting for rank 0.
    arguments = ["fit", *_TINY, "--epochs", "2", "--devices", "2", "--output", str(output)]
    return paused_fit(arguments, _STEPS + 1, marker, log, new_session=new_session), arguments


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_rank_stops_the_whole_job_with_a_checkpoint(
    tmp_path: Path, signum: signal.Signals
) -> None:
    pytest.importorskip("timm")
    output, log, marker = tmp_path / "run", tmp_path / "fit.log", tmp_path / "paused"
    job, arguments = _two_ranks(output, log, marker)
    with job as rank0:
        assert wait_for_pause(rank0, marker, log) == _STEPS + 1
        (rank1,) = children(rank0.pid)
        os.kill(rank1, signum)  # what a scheduler may do: one process only
        go_on(rank0)
        started = time.monotonic()
        code = rank0.wait(timeout=120)
        assert time.monotonic() - started < 60, tail(log)
        wait_until(lambda: not alive(rank1), 60, "rank 1's end", log)
    assert code == 128 + signum, tail(log)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    # Rank 1 notes the signal at once, or, when it waits in the next step's all-reduce (for the
    # paused rank 0), once that returns: the job stops after that step or the next.
    stopped = re.search(rf"stopped by {signum.name} at step (\d+)", text)
    assert stopped is not None, tail(log)
    step = int(stopped.group(1))
    assert step in (_STEPS + 1, _STEPS + 2)
    assert safe_load(RunFolder(output).last_checkpoint)["global_step"] == step
    result = _barlowtwins(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert safe_load(RunFolder(output).last_checkpoint)["global_step"] == 2 * _STEPS


@pytest.mark.slow
def test_ctrl_c_to_the_whole_job_stops_it_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    output, log, marker = tmp_path / "run", tmp_path / "fit.log", tmp_path / "paused"
    job, _ = _two_ranks(output, log, marker, new_session=True)
    with job as rank0:
        wait_for_pause(rank0, marker, log)
        (rank1,) = children(rank0.pid)
        os.killpg(os.getpgid(rank0.pid), signal.SIGINT)  # Ctrl-C in the job's terminal
        # Rank 0, paused in a read, notes it at once; rank 1 when its collective returns.
        wait_until(lambda: "received SIGINT" in log.read_text(), 60, "rank 0's note", log)
        go_on(rank0)
        assert rank0.wait(timeout=120) == 130, tail(log)
        wait_until(lambda: not alive(rank1), 60, "rank 1's end", log)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and f"stopped by SIGINT at step {_STEPS + 1}" in text
    assert safe_load(RunFolder(output).last_checkpoint)["global_step"] == _STEPS + 1


@pytest.mark.slow
def test_a_killed_rank_0_ends_rank_1_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    output, log, marker = tmp_path / "run", tmp_path / "fit.log", tmp_path / "paused"
    job, _ = _two_ranks(output, log, marker)
    with job as rank0:
        wait_for_pause(rank0, marker, log)
        (rank1,) = children(rank0.pid)
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(timeout=60)
        # Rank 1, waiting for rank 0 in a collective, ends by itself.
        wait_until(lambda: not alive(rank1), 120, "rank 1's end", log)
    text = log.read_text(errors="replace")
    # Rank 1's line may follow its progress bar on the same terminal line.
    assert "Traceback" not in text and text.count("barlowtwins: error:") == 1
    assert "barlowtwins: error: rank 1 lost contact with the other processes" in text
    # The first epoch's checkpoint stays for a rerun.
    assert safe_load(RunFolder(output).last_checkpoint)["global_step"] == _STEPS


def test_the_embed_output_is_written_whole(finished: RunFolder, tmp_path: Path) -> None:
    target = tmp_path / "features.npz"
    args = ["embed", str(finished.path), "--data", "fashion-mnist:test", "--max-samples", "20"]
    assert _barlowtwins(*args, "--output", str(target)).returncode == 0
    assert np.load(target)["embeddings"].shape[0] == 20
    assert _no_temporary_files(tmp_path)


# Data that changes under a run -----------------------------------------------------------------


@pytest.mark.slow
def test_a_folder_whose_files_vanish_stops_the_run_and_keeps_its_checkpoint(
    tmp_path: Path,
) -> None:
    pytest.importorskip("timm")
    data = tmp_path / "images"
    data.mkdir()
    # 256 images, 16 steps an epoch: more batches than the loader's workers prefetch.
    for i in range(256):
        Image.new("RGB", (40, 30), (i, 100, 255 - i)).save(data / f"{i:03d}.png")
    steps = 16
    output, log, marker = tmp_path / "run", tmp_path / "fit.log", tmp_path / "paused"
    arguments = ["fit", *_TINY, "--data", str(data), "--no-in-memory", "--image-size", "16"]
    arguments += ["--no-small-image"]  # a timm backbone keeps its own stem
    arguments += ["--max-samples", "256", "--epochs", "2", "--output", str(output)]
    # Paused one step into the second epoch, after the first epoch's checkpoint.
    with paused_fit(arguments, steps + 1, marker, log) as run:
        wait_for_pause(run, marker, log)
        moved = tmp_path / "moved"
        data.rename(moved)
        data.mkdir()
        go_on(run)
        assert run.wait(timeout=WAIT_S) == 2, tail(log)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "have vanished" in text and "the data changed under the run" in text
    last = RunFolder(output).last_checkpoint
    assert safe_load(last)["global_step"] == steps
    # With the images back, the same command resumes and finishes.
    data.rmdir()
    moved.rename(data)
    result = _barlowtwins(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert safe_load(last)["global_step"] == 2 * steps
