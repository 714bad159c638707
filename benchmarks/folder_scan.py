"""Big folders start fast, once: indexing an image folder and starting a run on it.

Writes a folder of ``--count`` tiny valid images (one encoded PNG copied into every file, in
``--classes`` class subfolders) and a small one of ``--small-count``, then measures, each in a
fresh process so that nothing is remembered in memory:

1. **scan**: :func:`barlowtwins.data.folder_index` with no index file (cold) and with the
   index of an earlier scan (warm, reused), timed inside the process;
2. **a rank's folder work**: what every rank of a run does with the folder (the folder
   recipe's ``summarize_folder``, ``fits_in_memory`` for the worker count, then a lazy
   ``load_image_folder``), warm, timed inside the process, big and small folder: the part of
   a start that grows with the folder;
3. **print-config**: ``barlowtwins fit --print-config --data FOLDER``, the whole command from
   its start (Python, imports, config resolution with the folder recipe), cold and warm;
4. **2-process start-up**: ``barlowtwins fit --devices 2 --accelerator cpu --no-in-memory``
   from its launch to the start of the first training step on each rank (a callback that
   records the time, injected as ``tests/_paused_fit.py`` injects its own; the run then trains
   that one step and ends); cold and warm on the big folder, warm on the small one.

Big and small folder are measured in turns, so that a change in the machine's load hits both;
each figure is the median, followed by every run. ``--no-in-memory`` makes the big folder
read the way a folder of a million images is read (lazily, per batch); decoding a whole
folder into memory at the start is another cost. The scan is also given per 100 000 files,
and the 1 M figures extrapolate linearly. The index
goes to a temporary cache directory (``BARLOWTWINS_CACHE``), never the user's. The folder's
directory entries are in the page cache (just written), so "cold" means no index, not a cold
disk. Before the first scan the script waits until the folder's directories are
``RACY_SECONDS`` old, as a folder written earlier would be (an index of a folder modified in
the seconds before its scan is scanned again by the next process).

Run ``python benchmarks/folder_scan.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

# The mode in which this script is the ``barlowtwins`` command with the first-step callback
# (Lightning starts ranks 1.. by running the same command line again).
_FIRST_STEP = "first-step-fit"
_SCAN = (
    "import json, sys, time\n"
    "from barlowtwins.data import folder_index\n"
    "start = time.perf_counter()\n"
    "index = folder_index(sys.argv[1])\n"
    "print(json.dumps({'seconds': time.perf_counter() - start, 'files': len(index)}))\n"
)
# What every rank of a run does with the folder: the recipe's summary, the worker count, then
# the data, read lazily (at the view size 32 of these images, loaded at 8/7 of it as fit does).
_LOAD = (
    "import json, sys, time\n"
    "from barlowtwins.data import fits_in_memory, load_image_folder, summarize_folder\n"
    "start = time.perf_counter()\n"
    "summarize_folder(sys.argv[1])\n"
    "fits_in_memory(sys.argv[1], image_size=37, channels=3)\n"
    "data = load_image_folder(sys.argv[1], image_size=37, cache_limit_bytes=0)\n"
    "print(json.dumps({'seconds': time.perf_counter() - start, 'files': len(data)}))\n"
)
_PER = 100_000


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=200_000, help="files in the big folder")
    parser.add_argument("--classes", type=int, default=100, help="class subfolders")
    parser.add_argument("--small-count", type=int, default=1000, help="files in the small one")
    parser.add_argument("--size", type=int, default=32, help="side of the images (pixels)")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each figure")
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="where to write the folders and runs (default: a temporary folder, deleted "
        "afterwards; the disk it is on is what is measured)",
    )
    parser.add_argument("--no-fit", action="store_true", help="skip the 2-process start-ups")
    return parser.parse_args()


def _write_folder(root: Path, count: int, classes: int, size: int) -> float:
    """``count`` copies of one tiny PNG in ``classes`` subfolders; returns the seconds taken."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 40)).save(buffer, "PNG")
    data = buffer.getvalue()
    start = time.perf_counter()
    folders = [root / f"class{c:04d}" for c in range(classes)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(count):
        handle = os.open(folders[i % classes] / f"{i:08d}.png", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(handle, data)
        os.close(handle)
    return time.perf_counter() - start


def _wait_until_not_racy(root: Path) -> float:
    """Waits until ``root`` and its class folders are RACY_SECONDS old; returns the seconds
    waited."""
    from barlowtwins.data.index import RACY_SECONDS

    newest = max(
        os.stat(root).st_mtime_ns,
        *(entry.stat().st_mtime_ns for entry in os.scandir(root) if entry.is_dir()),
    )
    wait = max(0.0, newest / 1e9 + RACY_SECONDS + 0.1 - time.time())
    time.sleep(wait)
    return wait


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(
            f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    return result


def _in_process_seconds(code: str, root: Path, env: dict[str, str], *, cold: bool) -> float:
    """``code`` timed inside a fresh process; cold removes the folder's index first."""
    from barlowtwins.data import index_file

    if cold:
        index_file(root).unlink(missing_ok=True)
    result = _run([sys.executable, "-c", code, str(root)], env)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def _print_config_seconds(root: Path, env: dict[str, str], *, cold: bool) -> float:
    """The wall time of ``barlowtwins fit --print-config --data root``."""
    from barlowtwins.data import index_file

    if cold:
        index_file(root).unlink(missing_ok=True)
    start = time.perf_counter()
    _run([sys.executable, "-m", "barlowtwins", "fit", "--print-config", "--data", str(root)], env)
    return time.perf_counter() - start


def _startup_seconds(
    root: Path, output: Path, env: dict[str, str], *, cold: bool
) -> tuple[float, float]:
    """Launch to first training step of a 2-process run on ``root``: (rank 0, rank 1)."""
    from barlowtwins.data import index_file

    if cold:
        index_file(root).unlink(missing_ok=True)
    shutil.rmtree(output, ignore_errors=True)
    marks = output.with_name(output.name + "-first-step")
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir(parents=True)
    command = [sys.executable, str(Path(__file__).resolve()), _FIRST_STEP, str(marks), "fit"]
    command += ["--data", str(root), "--output", str(output), "--devices", "2"]
    command += ["--accelerator", "cpu", "--no-in-memory", "--epochs", "1"]
    command += ["--steps-per-epoch", "1", "--warmup-epochs", "0", "--no-plots"]
    start = time.time()
    _run(command, env)
    first = [float((marks / f"rank-{rank}.txt").read_text()) - start for rank in (0, 1)]
    return first[0], first[1]


def _first_step_fit(marks: Path, command: list[str]) -> int:
    """``barlowtwins COMMAND`` with a callback that writes, on every rank, the time at which
    its first training step starts to ``marks/rank-R.txt``."""
    import functools

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    import barlowtwins.app.fit
    from barlowtwins.app.cli import main

    class FirstStep(Callback):
        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
        ) -> None:
            if trainer.global_step == 0:
                (marks / f"rank-{trainer.global_rank}.txt").write_text(repr(time.time()))

    # The command looks fit() up in barlowtwins.app.fit when it runs.
    barlowtwins.app.fit.fit = functools.partial(barlowtwins.app.fit.fit, callbacks=[FirstStep()])
    return main(command)


def _seconds(values: list[float]) -> str:
    """The median, then every run in the order measured."""
    return f"{statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    """Write the folders, then print each figure: big and small folder measured in turns, so
    that a change in the machine's load hits both."""
    args = _parse_args()
    import PIL
    import torch

    from barlowtwins.precision import cpu_name

    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, load average "
        f"{os.getloadavg()[0]:.1f}); Python {platform.python_version()}, torch "
        f"{torch.__version__}, Pillow {PIL.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="folder_scan_") as scratch:
        base = Path(scratch) if args.folder is None else args.folder
        base.mkdir(parents=True, exist_ok=True)
        # This process too: it finds the index files to remove through the variable.
        os.environ["BARLOWTWINS_CACHE"] = str(base / "cache")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        big, small = base / "big", base / "small"
        for root, count, classes in (
            (big, args.count, args.classes),
            (small, args.small_count, 10),
        ):
            if not root.is_dir():
                seconds = _write_folder(root, count, classes, args.size)
                print(f"wrote {count} {args.size}x{args.size} PNGs to {root} in {seconds:.1f} s")
        waited = _wait_until_not_racy(big)
        print(f"waited {waited:.1f} s for the folder to be older than the racy window")
        per = _PER / args.count
        cold, warm = [], []
        for _ in range(args.repeats):
            cold.append(_in_process_seconds(_SCAN, big, env, cold=True))
            warm.append(_in_process_seconds(_SCAN, big, env, cold=False))
        print(f"scan of {args.count} files, cold (no index): {_seconds(cold)}", flush=True)
        print(f"scan of {args.count} files, warm (index reused): {_seconds(warm)}", flush=True)
        print(
            f"per 100 000 files: cold {statistics.median(cold) * per:.3f} s, warm "
            f"{statistics.median(warm) * per:.3f} s; 1 M files by extrapolation: indexed in "
            f"{statistics.median(cold) * per * 10:.1f} s (goal < 10 s)"
        )
        loads: dict[str, list[float]] = {"big": [], "small": []}
        for _ in range(args.repeats):
            loads["big"].append(_in_process_seconds(_LOAD, big, env, cold=False))
            loads["small"].append(_in_process_seconds(_LOAD, small, env, cold=False))
        for what, values in loads.items():
            print(
                f"a rank's folder work (summary, worker count, lazy load), {what}, warm: "
                f"{_seconds(values)}",
                flush=True,
            )
        _later("a rank's folder work", loads["big"], loads["small"], args)

        configs: dict[str, list[float]] = {"big, cold": [], "big, warm": [], "small, warm": []}
        for _ in range(args.repeats):
            configs["big, cold"].append(_print_config_seconds(big, env, cold=True))
            configs["big, warm"].append(_print_config_seconds(big, env, cold=False))
            configs["small, warm"].append(_print_config_seconds(small, env, cold=False))
        for what, values in configs.items():
            print(f"fit --print-config, {what}: {_seconds(values)}", flush=True)
        _later("fit --print-config", configs["big, warm"], configs["small, warm"], args)
        if args.no_fit:
            return
        runs = base / "runs"
        starts: dict[str, list[float]] = {"big, cold": [], "big, warm": [], "small, warm": []}
        for repeat in range(args.repeats):
            # The first start on the big folder lists it; the later ones reuse its index.
            for what, root, cold_start in (
                ("big, cold", big, True),
                ("big, warm", big, False),
                ("small, warm", small, False),
            ):
                if cold_start and repeat:
                    continue
                ranks = _startup_seconds(root, runs / root.name, env, cold=cold_start)
                print(
                    f"2-process start-up to the first step, {what}: rank 0 {ranks[0]:.2f} s, "
                    f"rank 1 {ranks[1]:.2f} s",
                    flush=True,
                )
                starts[what].append(max(ranks))
        for what, values in starts.items():
            print(f"2-process start-up (both ranks at step 1), {what}: {_seconds(values)}")
        _later("2-process start-up", starts["big, warm"], starts["small, warm"], args)


def _later(what: str, big: list[float], small: list[float], args: argparse.Namespace) -> None:
    """The goal's line: how much later a warm start on the big folder is than on the small."""
    later = statistics.median(big) - statistics.median(small)
    pairs = ", ".join(f"{b - s:+.2f}" for b, s in zip(big, small, strict=True))
    print(
        f"{what}, later start on {args.count} files than on {args.small_count}: {later:+.2f} s "
        f"(difference of the medians; in turns: {pairs}); 1 M by extrapolation "
        f"{later * 1e6 / args.count:+.1f} s (goal < 1 s)",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == _FIRST_STEP:
        sys.exit(_first_step_fit(Path(sys.argv[2]), sys.argv[3:]))
    main()
