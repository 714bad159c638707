"""``barlowtwins shards FOLDER OUTPUT``: an image folder written as LitData shards.

Data larger than a disk is trained on from shards in object storage (``--data
s3://bucket/prefix``) or on a local or network disk (``--data OUTPUT``); see
:mod:`barlowtwins.data.streaming` for how they are read. The shards are written by LitData's
``optimize`` (https://github.com/Lightning-AI/litdata), in worker processes, with its progress
bar. This command decides what goes into them:

* **Order.** The folder's images (listed and labelled as :func:`~barlowtwins.data.load_data`
  does: first-level subfolders are the classes) are shuffled with ``--seed`` before they are
  written, so every shard is a random sample of them all: LitData shuffles shards and the
  images inside each shard, never across shards, and the monitor reads the first images as a
  random sample.
* **Each image** is decoded as a folder run decodes it (EXIF rotation, first frame,
  transparency on white, 16-bit scaled to 8 bits, greyscale kept greyscale), shrunk so that
  its shorter side is ``--side`` pixels (256 by default; aspect kept; smaller images are kept
  as they are) and stored as JPEG bytes (``--quality`` 90) with its label, its position in the
  shuffled list and its source's height and width (before shrinking, after the EXIF
  rotation: the views draw crops with the source's own aspect ratio). 256 px is all that any
  recipe's canvas uses: ``fit`` loads images for 224-px views onto 256 x 256 canvases.
* **A file that cannot be decoded** is left out, counted and listed in the manifest, as a
  folder run skips it.
* **Nothing half-written is ever read.** The shards are written into ``.OUTPUT.partial`` beside
  ``OUTPUT`` and renamed to ``OUTPUT`` when complete, with the manifest
  (:class:`~barlowtwins.data.streaming.ShardsManifest`) and the source paths. A rerun after an
  interruption removes the partial folder and starts again: LitData's own resume
  (``use_checkpoint``) counts written images where it means processed inputs, so after a
  skipped file it writes images twice (checked with LitData 0.2.76). A rerun whose ``OUTPUT``
  is complete does nothing.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from barlowtwins.data import DataError, LazyImageFolder, load_image_folder
from barlowtwins.data.folders import convert_mode, open_image_checked
from barlowtwins.data.spec import SHARDS_INDEX
from barlowtwins.data.streaming import MANIFEST, PATHS, ShardsManifest, read_manifest
from barlowtwins.runs.files import atomic_write

_log = logging.getLogger("barlowtwins")

#: Shorter side of the stored images, all that the largest canvas a recipe decodes onto
#: (224-px views on 256 x 256 canvases) needs.
DEFAULT_SIDE = 256
#: JPEG quality of the stored images.
DEFAULT_QUALITY = 90
#: Bytes per shard, LitData's own default (``1 << 26``): a few thousand 256-px JPEGs, one GET
#: each from object storage.
DEFAULT_CHUNK_BYTES = "64MB"
# PIL's JPEG writer takes 1-95; above 95 it stops compressing.
_QUALITY_RANGE = (1, 95)
# Source modes stored as greyscale JPEGs.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Where LitData's optimize keeps its scratch files; it empties both when it starts
# (processing/data_processor.py, _cleanup_cache), so each run gets folders of its own instead
# of $TMPDIR/chunks and $TMPDIR/data.
_LITDATA_SCRATCH = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
# LitData's error text names the worker's exception on a line of its own.
_WORKER_ERROR = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.*)$", re.MULTILINE)


def write_shards(
    folder: str | Path,
    output: str | Path,
    *,
    side: int = DEFAULT_SIDE,
    quality: int = DEFAULT_QUALITY,
    seed: int = 0,
    workers: int | None = None,
    chunk_bytes: str = DEFAULT_CHUNK_BYTES,
) -> ShardsManifest:
    """Write the images of ``folder`` as LitData shards into the new folder ``output``.

    Args:
        folder: An image folder (first-level subfolders are classes).
        output: The folder to create; when it already holds the shards of a finished run,
            nothing is written.
        side: Shorter side the images are shrunk to (aspect kept, never enlarged).
        quality: JPEG quality, 1-95.
        seed: Seed of the order the images are shuffled into.
        workers: Encoding processes (default: one per core).
        chunk_bytes: Bytes per shard (LitData's ``chunk_bytes``, e.g. ``"64MB"``).

    Returns:
        The manifest of the shards (of the existing ones when there was nothing to do).

    Raises:
        DataError: For an invalid argument, an ``output`` that exists and holds something
            else, or a folder without a usable image.
    """
    if side < 1:
        raise DataError(f"--side must be a positive number of pixels, got {side}")
    if not _QUALITY_RANGE[0] <= quality <= _QUALITY_RANGE[1]:
        raise DataError(
            f"--quality must be in {_QUALITY_RANGE[0]}..{_QUALITY_RANGE[1]}, got {quality}"
        )
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    output = Path(output).absolute()
    if (output / MANIFEST).is_file() and (output / SHARDS_INDEX).is_file():
        manifest = read_manifest(str(output))
        _log.info(
            "%s already holds the shards of %d images: nothing to do (remove it to write them "
            "again)",
            output,
            manifest.count,
        )
        return manifest
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise DataError(f"{output} exists and holds no finished shards; give a new OUTPUT")
    partial = output.with_name(f".{output.name}.partial")
    if partial.exists():
        _log.info("removing %s, left by an interrupted run: starting again", partial)
        shutil.rmtree(partial)

    source = Path(folder).absolute()
    # Listing and labels as a folder run has them; the decoder below reads every file.
    images = load_image_folder(source, image_size=side, cache_limit_bytes=0)
    assert isinstance(images, LazyImageFolder)  # nothing is decoded into memory at limit 0
    order = np.random.default_rng(seed).permutation(len(images)).tolist()
    labels = [-1] * len(images) if images.labels is None else images.labels.tolist()
    inputs = [(position, images.paths[i], labels[i]) for position, i in enumerate(order)]
    with tempfile.TemporaryDirectory(prefix="barlowtwins-shards-") as scratch:
        failures = Path(scratch, "failures")
        failures.mkdir()
        encode = functools.partial(encode_image, side=side, quality=quality, failures=str(failures))
        with _litdata_scratch(Path(scratch)):
            _optimize(encode, inputs, partial, chunk_bytes, min(workers, len(inputs)))
        failed = sorted(int(path.name) for path in failures.iterdir())
        reasons = {i: (failures / str(i)).read_text() for i in failed}
    kept = [entry for entry in inputs if entry[0] not in reasons]
    relative = [os.path.relpath(path, source) for _, path, _ in kept]
    manifest = ShardsManifest(
        count=len(kept),
        side=side,
        quality=quality,
        seed=seed,
        source=str(source),
        classes=images.classes,
        labels=None if images.labels is None else np.array([lab for _, _, lab in kept], np.int64),
        failed=failed,
        unusable=[
            *((os.path.relpath(path, source), reason) for path, reason in images.skipped),
            *((os.path.relpath(inputs[i][1], source), reasons[i]) for i in failed),
        ],
    )
    if not kept:
        raise DataError(f"none of the images in {source} could be decoded")
    _check_stored(partial, [position for position, _, _ in kept])
    paths_text = json.dumps(relative) + "\n"
    atomic_write(partial / PATHS, lambda tmp: tmp.write_text(paths_text))
    manifest_text = manifest.to_json()
    atomic_write(partial / MANIFEST, lambda tmp: tmp.write_text(manifest_text))
    if output.exists():
        output.rmdir()  # empty, checked above
    partial.rename(output)
    return manifest


def encode_image(
    entry: tuple[int, str, int], *, side: int, quality: int, failures: str
) -> dict[str, Any] | None:
    """LitData's ``fn``: one source file as a stored item, or None (and a note in
    ``failures``) when it cannot be decoded.

    Args:
        entry: ``(position in the shuffled list, path, label or -1)``.
        side: Shorter side to shrink to.
        quality: JPEG quality.
        failures: Folder of the failure notes, one file per position, holding the reason.
    """
    position, path, label = entry
    try:
        with warnings.catch_warnings():
            # Bombs are refused by open_image_checked; PIL's warning would only repeat that.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image, height, width = _shrunk(path, side)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
    # PIL raises many exception types on corrupt data (OSError, SyntaxError, struct.error, ...).
    except Exception as error:
        Path(failures, str(position)).write_text(f"{type(error).__name__}: {error}")
        return None
    return {
        "image": buffer.getvalue(),
        "label": label,
        "index": position,
        "height": height,
        "width": width,
    }


def _shrunk(path: str, side: int) -> tuple[Image.Image, int, int]:
    """The whole image, shorter side at most ``side``, and its source's height and width."""
    with open_image_checked(path) as source:
        width, height = source.size
        # JPEGs decode straight at a reduced DCT scale that keeps both sides >= side.
        source.draft(None, (side, side))
        drafted = source.size
        image = ImageOps.exif_transpose(source)
    if image.size != drafted:  # rotated by a quarter turn
        width, height = height, width
    image = convert_mode(image, "L" if image.mode in _GREY_MODES else "RGB")
    shorter = min(image.size)
    if shorter > side:
        scale = side / shorter
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image, height, width


@contextmanager
def _litdata_scratch(scratch: Path) -> Iterator[None]:
    """LitData's scratch folders inside ``scratch`` for the duration (see _LITDATA_SCRATCH)."""
    saved = {name: os.environ.get(name) for name in _LITDATA_SCRATCH}
    for name in _LITDATA_SCRATCH:
        os.environ[name] = str(scratch / name.lower())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _optimize(
    encode: Any, inputs: list[tuple[int, str, int]], partial: Path, chunk_bytes: str, workers: int
) -> None:
    """``litdata.optimize`` into ``partial``, in the inputs' order; a worker's failure is a
    one-line :class:`DataError`."""
    import litdata

    try:
        litdata.optimize(
            fn=encode,
            inputs=inputs,
            output_dir=str(partial),
            chunk_bytes=chunk_bytes,
            num_workers=workers,
            # Each worker writes a contiguous slice of the shuffled list, and the index lists
            # the workers' shards in turn: the shards hold the images in the list's order.
            keep_data_ordered=True,
            reorder_files=False,
            # LitData spawns its workers by default, and each spawned one imports torch again:
            # 38 s against 0.3 s forked for 31 small images on this 2-core machine. Nothing
            # runs threads here before the workers start.
            start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
        )
    except RuntimeError as error:
        found = _WORKER_ERROR.findall(str(error))
        cause = ": ".join(found[0]) if found else str(error).splitlines()[0]
        raise DataError(f"writing the shards failed ({cause}); rerun to start again") from None


def _check_stored(shards: Path, positions: list[int]) -> None:
    """Check that LitData stored the decoded images in the list's order, which the manifest's
    labels and paths follow: the count, and the first and last image of every shard.

    Raises:
        DataError: If it did not (the shards are kept in the partial folder).
    """
    import litdata

    index = json.loads((shards / SHARDS_INDEX).read_text())
    sizes = [int(chunk["chunk_size"]) for chunk in index["chunks"]]
    if sum(sizes) != len(positions):
        raise DataError(
            f"LitData stored {sum(sizes)} images, not the {len(positions)} decoded; {shards} is "
            "kept for inspection"
        )
    dataset = litdata.StreamingDataset(str(shards))
    start = 0
    for size in sizes:
        for at in {start, start + size - 1} if size else ():
            if int(dataset[at]["index"]) != positions[at]:
                raise DataError(
                    f"LitData stored the images out of order (image {at}); {shards} is kept for "
                    "inspection"
                )
        start += size


__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_QUALITY", "DEFAULT_SIDE", "encode_image", "write_shards"]
