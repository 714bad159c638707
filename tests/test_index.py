"""Tests for barlowtwins.data.index: a folder is listed once, its index cached on disk, reused
by later loads and processes while the folder is unchanged, and scanned once by processes that
load it together (a 2-process ``fit`` included)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from _fit_process import ENV, WAIT_S
from barlowtwins.data import (
    INDEX_CACHE_ENV,
    fits_in_memory,
    folder_index,
    index_file,
    load_image_folder,
    summarize_folder,
)
from conftest import ImageFolderFactory

# Loads each folder named on the command line in a fresh process (nothing remembered).
_INDEX_IN_A_NEW_PROCESS = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
    "from barlowtwins.data import folder_index\n"
    "for root in sys.argv[1:]:\n"
    "    print(len(folder_index(root)), flush=True)\n"
)
# In scan order: depth first, each folder's entries sorted by name ("3.png" before "deep").
_FILES = ("a/0.png", "a/1.png", "b/3.png", "b/deep/2.png", "c/4.png")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every index of a test goes to its own cache directory (subprocesses inherit it)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(INDEX_CACHE_ENV, str(folder))
    return folder


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (len(path.name) * 40 % 256, 90, 30)).save(path)


def _tree(root: Path) -> Path:
    """Five images in class folders a, b (one of them a level deeper) and c."""
    for name in _FILES:
        _png(root / name)
    return root


def _age(root: Path, seconds: float = 3600) -> Path:
    """Sets every directory's mtime ``seconds`` back, as for a folder written earlier: an index
    of a folder modified in the seconds before its scan is not trusted by another process."""
    then = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (then, then))
    return root


def _relative(root: Path, paths: list[str] | None) -> list[str]:
    assert paths is not None
    return [Path(path).relative_to(root).as_posix() for path in paths]


def _in_new_processes(*roots: Path) -> str:
    """Indexes ``roots`` in a fresh Python process; returns its log and output."""
    result = subprocess.run(
        [sys.executable, "-c", _INDEX_IN_A_NEW_PROCESS, *map(str, roots)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**ENV, INDEX_CACHE_ENV: os.environ[INDEX_CACHE_ENV]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr + result.stdout


def test_a_run_lists_its_folder_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _age(_tree(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="barlowtwins.data"):
        # What fit does: the recipe's summary, the worker count, then the data.
        summary = summarize_folder(root)
        stamp = index_file(root).stat().st_mtime_ns
        assert fits_in_memory(root, image_size=8, channels=3)
        dataset = load_image_folder(root, image_size=8)
    assert caplog.text.count("indexed 5 image files") == 1
    assert index_file(root).stat().st_mtime_ns == stamp
    assert summary.count == len(dataset) == 5
    assert _relative(root, dataset.paths) == list(_FILES)
    assert dataset.classes == ["a", "b", "c"]
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 0, 1, 1, 2]


def _add(root: Path) -> None:
    _png(root / "b" / "deep" / "new.png")


def _remove(root: Path) -> None:
    (root / "a" / "0.png").unlink()


def _rename(root: Path) -> None:
    (root / "c" / "4.png").rename(root / "c" / "5.png")


def _new_folder(root: Path) -> None:
    _png(root / "d" / "6.png")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_add, ["a/0.png", "a/1.png", "b/3.png", "b/deep/2.png", "b/deep/new.png", "c/4.png"]),
        (_remove, ["a/1.png", "b/3.png", "b/deep/2.png", "c/4.png"]),
        (_rename, ["a/0.png", "a/1.png", "b/3.png", "b/deep/2.png", "c/5.png"]),
        (_new_folder, [*_FILES, "d/6.png"]),
    ],
)
def test_a_change_in_any_folder_is_seen_by_the_next_load(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[Path], None],
    expected: list[str],
) -> None:
    root = _age(_tree(tmp_path / "data"))
    load_image_folder(root, image_size=8)
    change(root)
    with caplog.at_level(logging.INFO, logger="barlowtwins.data"):
        dataset = load_image_folder(root, image_size=8)
    assert caplog.text.count(f"indexed {len(expected)} image files") == 1
    assert _relative(root, dataset.paths) == expected


@pytest.mark.slow
def test_other_processes_reuse_an_index_until_its_folder_changes(tmp_path: Path) -> None:
    same, grown, torn = (_age(_tree(tmp_path / name)) for name in ("same", "grown", "torn"))
    log = _in_new_processes(same, grown, torn)
    assert log.count("indexed 5 image files") == 3
    stamp = index_file(same).stat().st_mtime_ns
    _add(grown)
    # A file cut short (a crash before it reached the disk) is scanned again.
    data = index_file(torn).read_bytes()
    index_file(torn).write_bytes(data[:-3])

    log = _in_new_processes(same, grown, torn)
    assert f"{same.resolve()}: reusing its index of 5 files" in log
    assert index_file(same).stat().st_mtime_ns == stamp
    assert f"{grown.resolve()}: indexed 6 image files" in log
    assert f"{torn.resolve()}: indexed 5 image files" in log
    assert log.count("indexed") == 2


@pytest.mark.slow
def test_a_folder_modified_just_before_its_scan_is_scanned_again_by_the_next_process(
    tmp_path: Path,
) -> None:
    # An entry added right after the scan, within the same timestamp tick, would not change
    # the directory's mtime, so another process does not trust an index of directories
    # modified less than RACY_SECONDS before they were listed. Here the mtime is an hour
    # ahead (as a file server's clock may be), so that no timing of this test matters.
    root = _age(_tree(tmp_path / "data"), seconds=-3600)
    assert folder_index(root).racy
    assert "indexed 5 image files" in _in_new_processes(root)
    _age(root)
    assert not folder_index(root).racy
    assert "reusing its index of 5 files" in _in_new_processes(root)


@pytest.mark.slow
def test_processes_loading_a_folder_at_once_scan_it_once(tmp_path: Path) -> None:
    root = _age(_tree(tmp_path / "data"))
    lock = index_file(root).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    logs = [tmp_path / f"process-{k}.log" for k in range(2)]
    # This test holds the folder's lock as a scanning process would, so both processes are
    # inside their load, waiting, at the same time.
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        processes = []
        for log in logs:
            with open(log, "wb") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _INDEX_IN_A_NEW_PROCESS, str(root)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**ENV, INDEX_CACHE_ENV: os.environ[INDEX_CACHE_ENV]},
                    )
                )
        try:
            deadline = time.monotonic() + WAIT_S
            while not all("waiting for another process" in log.read_text() for log in logs):
                for process, log in zip(processes, logs, strict=True):
                    if process.poll() is not None:
                        pytest.fail(f"exited before waiting for the lock:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail("the processes did not wait for the lock")
                time.sleep(0.05)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            for process in processes:
                process.wait(timeout=WAIT_S)
    text = "".join(log.read_text() for log in logs)
    assert [process.returncode for process in processes] == [0, 0], text
    assert text.count("indexed 5 image files") == 1, text
    assert text.count("reusing the index of 5 files another process just wrote") == 1, text


@pytest.mark.slow
def test_a_two_process_fit_lists_its_folder_once(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    # Written just now, so only the index rank 0 names to its child explains rank 1 not
    # scanning it again.
    data = image_folder("fresh", count=16, classes=2)
    arguments = ["fit", "--data", str(data), "--output", str(tmp_path / "run")]
    arguments += ["--accelerator", "cpu", "--devices", "2", "--backbone", "resnet10"]
    arguments += ["--projector-dims", "32", "32", "--precision", "32", "--image-size", "16"]
    arguments += ["--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "1", "--no-plots"]
    result = subprocess.run(
        [sys.executable, "-m", "barlowtwins", *arguments],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**ENV, INDEX_CACHE_ENV: os.environ[INDEX_CACHE_ENV]},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert log.count("indexed 16 image files") == 1, log[-3000:]
    assert log.count("using the index of 16 files of the process that launched this one") == 1


def test_without_a_writable_cache_each_process_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(INDEX_CACHE_ENV, str(blocker / "cache"))
    root = _age(_tree(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="barlowtwins.data"):
        assert len(load_image_folder(root, image_size=8)) == 5
        assert summarize_folder(root).count == 5
    assert caplog.text.count("cannot write folder indexes") == 1
    assert caplog.text.count("indexed 5 image files in") == 1
    assert "not cached" in caplog.text


def test_the_index_of_a_folder_that_is_gone_is_removed(tmp_path: Path) -> None:
    gone, kept = _tree(tmp_path / "gone"), _tree(tmp_path / "kept")
    folder_index(gone)
    assert index_file(gone).is_file()
    shutil.rmtree(gone)
    folder_index(kept)  # writing an index tidies the cache
    assert not index_file(gone).exists() and not index_file(gone).with_suffix(".lock").exists()
    assert index_file(kept).is_file()
