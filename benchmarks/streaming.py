"""Shards read with LitData against a folder of JPEGs: images/s to the training step, and memory.

Two measurements, both run by hand (``python benchmarks/streaming.py --help``):

* **Throughput** (``--part throughput``). ``--count`` photo-like JPEGs of ``--size`` (written
  as ``benchmarks/data_path.py`` writes them, or reused from ``--folder``) are written as shards
  by ``barlowtwins shards`` (shorter side 256, JPEG quality 90: the defaults), timed. Then both
  are read exactly as ``fit`` reads them for ``--image-size`` views, through
  :class:`~barlowtwins.training.datamodule.BarlowTwinsDataModule`'s ``train_dataloader``: the
  folder as a :class:`~barlowtwins.data.LazyImageFolder` in a shuffled ``DataLoader``, the
  shards through LitData's ``StreamingDataLoader``; both decode each image whole onto the
  canvas ``fit`` uses (the view size x 8/7) with PIL. For each ``--workers`` count it skips one
  batch per worker (their start-up) and times ``--batches`` batches of ``--batch`` images, over
  as many epochs as that takes. The files sit in the page cache: this measures reading and
  decoding, not the disk. With 0 workers the rate is what one core decodes.
* **Memory** (``--part memory``). For each of ``--counts`` (10 000 and 100 000 by default)
  small JPEGs (``--memory-size``) are written as shards of ``--memory-chunk-bytes`` (small,
  so that both counts fill many shards: 10 000 tiny JPEGs fill a fraction of one 64 MB shard),
  and ``barlowtwins fit`` trains
  ``--steps`` steps on them (1 process, ``--workers`` DataLoader workers, ResNet-10 at 32 px);
  the peak of the proportional set size (PSS: shared pages divided among the processes that
  share them) summed over the run's processes, sampled every 0.1 s with psutil, and the
  peak resident set of the main process are printed. Memory that grew with the dataset would
  show as a difference between the counts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from data_path import write_folder
from PIL import features

from barlowtwins.app.fit import _FOLDER_LOAD_SCALE
from barlowtwins.app.shards import DEFAULT_QUALITY, DEFAULT_SIDE, write_shards
from barlowtwins.data import ImageDataset, load_data, load_image_folder
from barlowtwins.precision import cpu_name
from barlowtwins.training.datamodule import BarlowTwinsDataModule

_SAMPLE_S = 0.1


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("throughput", "memory", "both"), default="both")
    parser.add_argument(
        "--folder",
        type=Path,
        help="throughput: reuse the JPEGs here, or write them here and keep them (default: a "
        "temporary folder)",
    )
    parser.add_argument("--count", type=int, default=4096, help="throughput: JPEGs (4096)")
    parser.add_argument(
        "--size", default="500x375", help="throughput: pixels of each JPEG (500x375)"
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="throughput: view size; canvas x 8/7 (224)"
    )
    parser.add_argument("--batch", type=int, default=64, help="throughput: batch (64)")
    parser.add_argument("--batches", type=int, default=20, help="throughput: timed batches (20)")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="DataLoader workers: each count timed in turn; memory uses the last (0 2)",
    )
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="memory: images in each set of shards (10000 100000)",
    )
    parser.add_argument(
        "--memory-size", default="64x48", help="memory: pixels of each small JPEG (64x48)"
    )
    parser.add_argument(
        "--memory-chunk-bytes",
        default="4MB",
        help="memory: bytes per shard (4MB), so that both sets have many full shards",
    )
    parser.add_argument("--steps", type=int, default=20, help="memory: training steps (20)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="memory: runs of each count, alternating (2)"
    )
    parser.add_argument(
        "--keep", type=Path, help="memory: keep its folders and shards here (default: temporary)"
    )
    args = parser.parse_args()
    for name in ("size", "memory_size"):
        width, height = (int(part) for part in getattr(args, name).lower().split("x"))
        setattr(args, name, (width, height))
    return args


def _delivered(dataset: ImageDataset, workers: int, args: argparse.Namespace) -> float:
    """Images/s that ``fit``'s training loader delivers with ``workers`` processes."""
    datamodule = BarlowTwinsDataModule(dataset, args.batch, num_workers=workers, seed=0)
    loader = datamodule.train_dataloader()
    warmup, seen, start = max(1, workers), 0, 0.0
    while seen < warmup + args.batches:
        for batch in loader:
            images = batch[0]
            seen += 1
            if seen == warmup:
                start = time.perf_counter()
            if seen == warmup + args.batches:
                break
    assert images.dtype == torch.uint8
    return args.batches * args.batch / (time.perf_counter() - start)


def _shard_bytes(shards: Path) -> int:
    return sum(path.stat().st_size for path in shards.glob("chunk-*.bin"))


def throughput(args: argparse.Namespace, scratch: Path) -> None:
    folder = args.folder or scratch / "jpegs"
    if not any(folder.glob("*.jpg")):
        write_folder(folder, args.count, args.size, DEFAULT_QUALITY, 0)
    files = sorted(folder.glob("*.jpg"))
    source_kb = sum(path.stat().st_size for path in files) / len(files) / 1e3
    shards = scratch / "shards"
    start = time.perf_counter()
    manifest = write_shards(folder, shards)
    seconds = time.perf_counter() - start
    stored_kb = _shard_bytes(shards) / manifest.count / 1e3
    print(
        f"shards: {manifest.count} JPEGs of {args.size[0]}x{args.size[1]} ({source_kb:.1f} KB "
        f"each) -> shorter side {DEFAULT_SIDE}, quality {DEFAULT_QUALITY}: {stored_kb:.1f} KB "
        f"each; written in {seconds:.1f} s ({manifest.count / seconds:.0f} images/s, "
        f"{os.cpu_count()} processes)"
    )
    canvas = round(args.image_size * _FOLDER_LOAD_SCALE)
    sources = {
        "folder (LazyImageFolder)": load_image_folder(
            folder, image_size=canvas, cache_limit_bytes=0
        ),
        "shards (LitData)": load_data(str(shards), image_size=canvas),
    }
    print(
        f"delivered to the training step: uint8 batches of {args.batch} on {canvas} px canvases "
        f"({args.image_size} px views), {args.batches} timed batches after one per worker"
    )
    for workers in args.workers:
        for name, dataset in sources.items():
            rate = _delivered(dataset, workers, args)
            print(f"{name}, {workers} workers: {rate:.0f} images/s", flush=True)


def _peak_memory(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``command``; returns (peak PSS of its process tree, peak RSS of its main process,
    seconds), in MB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main = psutil.Process(process.pid)
    peak_pss = peak_rss = 0.0
    while process.poll() is None:
        try:
            tree = [main, *main.children(recursive=True)]
            pss = 0
            for member in tree:
                try:
                    pss += member.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak_pss = max(peak_pss, pss / 1e6)
            peak_rss = max(peak_rss, main.memory_info().rss / 1e6)
        except psutil.NoSuchProcess:
            break
        time.sleep(_SAMPLE_S)
    _, errors = process.communicate()
    if process.returncode:
        raise SystemExit(errors.decode()[-3000:])
    return peak_pss, peak_rss, time.perf_counter() - start


def memory(args: argparse.Namespace, scratch: Path) -> None:
    root = args.keep or scratch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for count in args.counts:
        folder = root / f"small-{count}"
        if not any(folder.glob("*.jpg")):
            write_folder(folder, count, args.memory_size, DEFAULT_QUALITY, 0)
        write_shards(
            folder,
            root / f"shards-{count}",
            side=max(args.memory_size),
            chunk_bytes=args.memory_chunk_bytes,
        )
    # Alternating the counts, so that a change in the machine's load hits both alike.
    for repeat, count in ((r, c) for r in range(args.repeats) for c in args.counts):
        shards, output = root / f"shards-{count}", root / f"run-{count}-{repeat}"
        command = [sys.executable, "-m", "barlowtwins", "fit", "--data", str(shards)]
        command += ["--accelerator", "cpu", "--backbone", "resnet10", "--projector-dims", "64"]
        command += ["64", "--image-size", "32", "--batch-size", "64", "--epochs", "1"]
        command += ["--steps-per-epoch", str(args.steps), "--num-workers", str(args.workers[-1])]
        command += ["--no-plots", "--output", str(output)]
        pss, rss, seconds = _peak_memory(command, env)
        print(
            f"fit on {count} images in {len(list(shards.glob('chunk-*.bin')))} shards "
            f"({_shard_bytes(shards) / 1e6:.0f} MB), {args.steps} steps of 64, "
            f"{args.workers[-1]} workers: peak PSS of all processes {pss:.0f} MB, peak RSS of "
            f"the main process {rss:.0f} MB ({seconds:.0f} s)",
            flush=True,
        )


def main() -> None:
    args = _parse_args()
    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); libjpeg-turbo "
        f"{features.check_feature('libjpeg_turbo')}; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="streaming_") as scratch:
        if args.part in ("throughput", "both"):
            throughput(args, Path(scratch))
        if args.part in ("memory", "both"):
            memory(args, Path(scratch))


if __name__ == "__main__":
    main()
