"""``barlowtwins`` in subprocesses that tests act on: paused at a known step, signalled,
killed, with their child ranks found through ``/proc``.

Every wait ends at an event (a marker file, a process exit); the timeouts only guard against a
hang.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Runs fit with a callback that stops at a given step until the test lets it go on.
PAUSED_FIT = Path(__file__).with_name("_paused_fit.py")
# A failure guard, not a wait for a state: every wait below ends at an event.
WAIT_S = 300
# One intra-op thread in every subprocess: on shared cores, threads that wait for each other
# cost more than they gain, and runs compared float for float must add in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A small 2-process gloo run of `barlowtwins fit` on the CPU, seeded, without pictures.
TWO_CPU_PROCESSES = [
    "--accelerator",
    "cpu",
    "--devices",
    "2",
    "--backbone",
    "resnet10",
    "--projector-dims",
    "32",
    "32",
    "--precision",
    "32",
    "--seed",
    "0",
    "--no-plots",
]


@contextmanager
def paused_fit(
    arguments: list[str],
    pause_step: int,
    marker: Path,
    log: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """``barlowtwins ARGUMENTS`` in a subprocess whose rank 0 writes ``marker`` after training
    step ``pause_step`` and then waits for :func:`go_on`; killed on the way out. ``env`` adds
    to :data:`ENV` (``VIEW_LOG``, say: see ``_paused_fit.py``); ``new_session`` puts the job in
    a process group of its own."""
    command = [sys.executable, str(PAUSED_FIT), str(pause_step), str(marker), *arguments]
    # A file, not a pipe: nobody reads while the run trains, and a full pipe would stall it.
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})},
            # Its own process group, for a test that signals all of the job's processes.
            start_new_session=new_session,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdin is not None
        process.stdin.close()


def go_on(process: subprocess.Popen[bytes]) -> None:
    """Let a run paused by :func:`paused_fit` continue."""
    assert process.stdin is not None
    process.stdin.write(b"\n")
    process.stdin.flush()


def logged_fit(arguments: list[str], log_folder: Path, log: Path, log_variable: str) -> None:
    """``barlowtwins`` with ``arguments`` run to its end through ``tests/_paused_fit.py``, which
    logs every rank's steps into ``log_folder`` (named to it by ``log_variable``); its output
    goes to ``log``."""
    log_folder.mkdir()
    command = [sys.executable, "tests/_paused_fit.py", "-1", str(log_folder / "unused"), *arguments]
    with open(log, "wb") as handle:
        result = subprocess.run(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**ENV, log_variable: str(log_folder)},
            timeout=WAIT_S,
        )
    assert result.returncode == 0, tail(log)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def wait_for(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll until ``condition()``; fail with the run's log if the run exits or hangs first."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"fit exited ({process.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {WAIT_S} s:\n{tail(log)}")
        time.sleep(0.05)


def wait_for_pause(process: subprocess.Popen[bytes], marker: Path, log: Path) -> int:
    """Wait until the run is paused; returns the step it paused at."""
    wait_for(marker.is_file, f"pause ({marker.name})", process, log)
    return int(marker.read_text())


def children(pid: int) -> list[int]:
    """PIDs of the live child processes of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split() if alive(int(child))]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has finished: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s:\n{tail(log)}")
        time.sleep(0.1)


_ERROR_LINE = re.compile(r"^barlowtwins: error: .+$", re.MULTILINE)


def only_error_line(stderr: str) -> str:
    """The single ``barlowtwins: error:`` line of ``stderr``; no traceback may come with it."""
    assert "Traceback" not in stderr
    lines = _ERROR_LINE.findall(stderr)
    assert len(lines) == 1, stderr
    return lines[0]
