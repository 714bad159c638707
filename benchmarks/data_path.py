"""JPEG folder data path: images per second that barlowtwins' own loading delivers for training.

A folder too large to decode into memory is read as ``fit`` reads it: a
:class:`~barlowtwins.data.LazyImageFolder` (``load_image_folder(..., cache_limit_bytes=0)``)
whose every access decodes one file and resizes the whole image onto an ``--image-size``
square canvas (recording its source size), in a ``DataLoader`` of uint8 batches in random
order as the training loader
draws them. For each ``--workers`` count the benchmark skips one batch per worker (their
start-up), then times ``--batches`` batches, all in one epoch that repeats the files as needed
(an epoch boundary, where the workers wait for the next epoch's first batches, comes once per
pass over a large folder in training, but every few batches over a small test folder). The
JPEGs sit in the page cache (just written or read), so this measures decoding and resizing,
not the disk.

Without ``--folder`` it writes ``--count`` JPEGs of ``--size`` to a temporary folder and
deletes them afterwards; ``--folder`` reuses the JPEGs there, or writes them there and keeps
them. The images are colour gradients and blobs under pixel noise, which compress at quality
90 to about the size of photos (about 70 KB at 500x375, 4.4 MB at 4000x3000).

Run ``python benchmarks/data_path.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import DataLoader, RandomSampler

from barlowtwins.data import ImageDataset, load_image_folder
from barlowtwins.precision import cpu_name

# Pixel noise amplitude (+-) that gives photo-like file sizes at JPEG quality 90.
_NOISE = 20
_NOISE_TILE = 256
# Side of the cells whose random colours are smoothly interpolated into blobs.
_BLOB_CELL = 32


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="reuse the JPEGs in this folder, or write them there and keep them "
        "(default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument("--count", type=int, default=4096, help="JPEGs to write (default: 4096)")
    parser.add_argument(
        "--size",
        type=_size,
        default=(500, 375),
        metavar="WxH",
        help="pixels of each JPEG written, e.g. 500x375 or 4000x3000 (default: 500x375)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    parser.add_argument(
        "--image-size", type=int, default=224, help="side of the loaded images (default: 224)"
    )
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[os.cpu_count() or 1],
        metavar="N",
        help="DataLoader worker counts to time, in turn (default: one per core)",
    )
    parser.add_argument(
        "--batches", type=int, default=20, help="timed batches per worker count (default: 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    args = parser.parse_args()
    if min(args.count, args.batch, args.batches, args.image_size) < 1:
        parser.error("--count, --batch, --batches and --image-size must be positive")
    if min(args.workers) < 0:
        parser.error("--workers must be >= 0")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    return args


def _size(text: str) -> tuple[int, int]:
    """``"WxH"`` as ``(W, H)``."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 500x375, got {text!r}") from None
    if min(width, height) < 1:
        raise argparse.ArgumentTypeError(f"sides must be positive, got {text!r}")
    return width, height


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 image that JPEG-compresses about as well as a photo.

    Smooth content (two colour ramps and interpolated blobs) compresses to almost nothing,
    uniform noise far worse than a photo; moderate noise on smooth content lands in between.
    The noise is one tile repeated, since drawing 36 M random numbers would dominate the time
    of a 12-MP image; JPEG's 8x8 blocks cannot tell.
    """
    rng = np.random.default_rng(seed)
    ramp_x = (np.linspace(0, 1, width)[:, None] * rng.uniform(-100, 100, 3)).astype(np.int16)
    ramp_y = np.linspace(0, 1, height)[:, None] * rng.uniform(-100, 100, 3)
    ramp_y = (ramp_y + rng.uniform(60, 190, 3)).astype(np.int16)
    cells = rng.integers(0, 256, (height // _BLOB_CELL + 2, width // _BLOB_CELL + 2, 3), np.uint8)
    blobs = Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)
    image = ramp_y[:, None] + ramp_x[None]
    # Blobs span +-32 around the ramps.
    image += np.asarray(blobs) >> 2
    image -= 32
    tile = rng.integers(-_NOISE, _NOISE + 1, (_NOISE_TILE, _NOISE_TILE, 3), dtype=np.int16)
    for top in range(0, height, _NOISE_TILE):
        for left in range(0, width, _NOISE_TILE):
            block = image[top : top + _NOISE_TILE, left : left + _NOISE_TILE]
            block += tile[: block.shape[0], : block.shape[1]]
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_jpegs(
    folder: Path, indices: range, size: tuple[int, int], quality: int, seed: int
) -> None:
    for index in indices:
        pixels = synthetic_image(*size, seed=seed * 1_000_003 + index)
        Image.fromarray(pixels).save(folder / f"{index:07d}.jpg", quality=quality)


def write_folder(folder: Path, count: int, size: tuple[int, int], quality: int, seed: int) -> None:
    """Write ``count`` JPEGs of ``size`` into ``folder``, in one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    processes = min(os.cpu_count() or 1, count)
    # Contiguous chunks, a few per process, balance the load without per-image overhead.
    chunk = max(1, count // (processes * 4))
    with ProcessPoolExecutor(processes) as pool:
        jobs = [
            pool.submit(
                _write_jpegs, folder, range(start, min(start + chunk, count)), size, quality, seed
            )
            for start in range(0, count, chunk)
        ]
        for job in jobs:
            job.result()


def _jpegs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def images_per_second(dataset: ImageDataset, workers: int, args: argparse.Namespace) -> float:
    """Images per second the loader delivers with ``workers`` processes, after their start-up."""
    warmup = max(1, workers)
    # One long epoch (the files in random order, repeated as needed): training pauses at an
    # epoch boundary once per pass over a large folder, a small test folder every few batches.
    sampler = RandomSampler(dataset, num_samples=(warmup + args.batches) * args.batch)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=workers)
    batches = iter(loader)
    for _ in range(warmup):
        images, _labels, _indices, _sizes = next(batches)
    expected = (args.batch, 3, args.image_size, args.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape) != expected:
        raise SystemExit(f"expected uint8 batches of {expected}, got {images.dtype} {images.shape}")
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    return args.batches * args.batch / (time.perf_counter() - start)


def main() -> None:
    """Write or reuse the JPEG folder, then print images per second for each worker count."""
    args = _parse_args()
    torch.manual_seed(args.seed)
    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, "
        f"{len(os.sched_getaffinity(0))} usable); Pillow {PIL.__version__}, libjpeg-turbo "
        f"{features.check_feature('libjpeg_turbo')}; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="data_path_") as scratch:
        folder = Path(scratch) if args.folder is None else args.folder
        files = _jpegs(folder) if folder.is_dir() else []
        if files:
            print(f"reusing {len(files)} JPEGs in {folder}")
        else:
            width, height = args.size
            start = time.perf_counter()
            write_folder(folder, args.count, args.size, args.quality, args.seed)
            files = _jpegs(folder)
            print(
                f"wrote {len(files)} JPEGs of {width}x{height} (quality {args.quality}) to "
                f"{folder} in {time.perf_counter() - start:.1f} s"
            )
        mean_kb = sum(path.stat().st_size for path in files) / len(files) / 1e3
        with Image.open(files[0]) as first:
            width, height = first.size
        dataset = load_image_folder(folder, image_size=args.image_size, cache_limit_bytes=0)
        if len(dataset) < args.batch:
            raise SystemExit(f"{len(dataset)} images make no full batch of {args.batch}")
        print(
            f"data path: {len(dataset)} JPEGs of {width}x{height} ({mean_kb:.0f} KB on average) "
            f"-> {type(dataset).__name__} -> uint8 batches of {args.batch} at {args.image_size} "
            f"px; {args.batches} timed batches after one per worker"
        )
        for workers in args.workers:
            rate = images_per_second(dataset, workers, args)
            print(f"{workers} workers: {rate:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
