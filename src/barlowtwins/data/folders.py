"""Folders of image files: decoding with PIL, and the datasets built from them.

A folder is listed once into a :class:`~barlowtwins.data.index.FolderIndex` (cached on disk
and shared by every process, see :mod:`barlowtwins.data.index`), which rejects entries by name
and type only. Every file that then cannot be used (empty, unreadable, corrupt, truncated, not
an image, decompression bomb, ...) is found when it is decoded, and skipped and counted
instead of crashing a run. :func:`load_image_folder` decodes a folder into memory when it fits
and otherwise returns a :class:`LazyImageFolder`, which decodes per access with the same
decoder and so lives here.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from barlowtwins.data.datasets import (
    DataError,
    ImageDataset,
    InMemoryImages,
    Item,
    check_geometry,
)
from barlowtwins.data.index import IMAGE_EXTENSIONS, folder_index
from barlowtwins.data.spec import DataSummary

_log = logging.getLogger(__name__)

# Modes whose samples span 0..65535; PIL's own convert("L") clips them at 255.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
_SKIPS_LISTED = 5
# Files that may vanish during a run (see vanished_limit): 1 % of the folder, at least 10.
_VANISHED_SHARE = 0.01
_VANISHED_MIN = 10
# Files whose headers are read to size a folder (summarize_folder), and that are tried before
# a folder is read lazily, to find out before training that none of its files is an image.
_SAMPLE = 256
# Folders whose decoded pixels fit in this many bytes are decoded once and kept in memory.
CACHE_LIMIT_BYTES = 4 * 2**30


def vanished_limit(count: int) -> int:
    """How many of ``count`` indexed files may disappear during a run before it stops: a few
    are skipped and counted like any bad file, more mean the folder changed under the run."""
    return max(_VANISHED_MIN, math.ceil(_VANISHED_SHARE * count))


class LazyImageFolder(ImageDataset):
    """Image files decoded on every access, for folders too large to hold in memory.

    A file that fails to decode (empty, unreadable, corrupt, truncated, not an image, a
    decompression bomb) is counted in :attr:`num_skipped` and replaced by the next decodable
    sample, so a training run never stops on one bad file; the first few are logged. The
    failure marks live in shared memory so that DataLoader worker processes update the same
    count.

    Args:
        paths: Image files, one per sample.
        labels: int64 labels of shape ``(N,)`` or ``None``.
        classes: Class names indexed by label, or ``None``.
        image_size: Side ``S`` of the square output.
        channels: 1 (greyscale) or 3 (RGB).
        skipped: ``(path, reason)`` of the files rejected while scanning.

    Raises:
        DataError: If there are no paths or the arguments do not match.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Tensor | None,
        classes: Sequence[str] | None,
        image_size: int,
        channels: int,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        check_geometry(image_size, channels)
        if not paths:
            raise DataError("LazyImageFolder needs at least one image path")
        if labels is not None and labels.shape != (len(paths),):
            raise DataError(f"got {tuple(labels.shape)} labels for {len(paths)} paths")
        self.paths: list[str] = list(paths)
        self.labels = labels
        self.classes = None if classes is None else list(classes)
        self.image_size = image_size
        self.channels = channels
        self.skipped = list(skipped)
        self._failed = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        # Failures logged so far, by any worker (a count for the log only: not atomic).
        self._logged = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Files listed in the index that no longer exist, seen by any worker.
        self._vanished = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:  # type: ignore[override]
        """Files rejected when the folder was listed plus files that failed to decode since."""
        return len(self.skipped) + int(self._failed.sum())

    def __len__(self) -> int:
        """Number of samples (including any that later fail to decode)."""
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        """Decodes sample ``index``, or the next decodable one if it is broken.

        Returns:
            ``(canvas uint8 (C, S, S), label or -1, index of the sample actually returned,
            its source (height, width))``.

        Raises:
            DataError: If no file in the folder can be decoded any more, or more files than
                :func:`vanished_limit` allows have disappeared since the folder was indexed.
        """
        n = len(self.paths)
        start = range(n)[index]
        for offset in range(n):
            i = (start + offset) % n
            if self._failed[i]:
                continue
            result = _decode_or_reason(self.paths[i], self.image_size, self.channels)
            if isinstance(result, Decoded):
                return torch.from_numpy(result.canvas), self._label(i), i, result.size
            self._failed[i] = True
            if not os.path.exists(self.paths[i]):
                self._vanished += 1
                if int(self._vanished[0]) > vanished_limit(n):
                    raise DataError(
                        f"{int(self._vanished[0])} of the {n} images indexed have vanished "
                        f"(e.g. {_printable(self.paths[i])}): the data changed under the run; "
                        "restore them, or rerun the command to index the folder anew "
                        "(the last checkpoint is kept)"
                    )
            if int(self._logged[0]) < _SKIPS_LISTED:
                self._logged += 1
                last = int(self._logged[0]) == _SKIPS_LISTED
                _log.warning(
                    "skipping unreadable image %s: %s%s",
                    _printable(self.paths[i]),
                    result,
                    "; further ones are counted, not logged" if last else "",
                )
        raise DataError(f"none of the {n} images can be decoded any more")


def load_image_folder(
    root: str | Path,
    *,
    image_size: int,
    channels: int = 3,
    max_samples: int | None = None,
    cache_limit_bytes: int = CACHE_LIMIT_BYTES,
    workers: int | None = None,
) -> ImageDataset:
    """Loads every image file below ``root`` as ``channels x image_size x image_size`` uint8.

    The folder's files are those of its :func:`~barlowtwins.data.index.folder_index` (listed
    recursively in sorted order, skipping hidden entries and visiting every real directory
    once, so symlink loops end; reused from the cache while the folder is unchanged).
    Following the ImageFolder convention, when all images sit in first-level subfolders, those
    subfolders are the classes; images directly in ``root`` make the whole folder unlabeled.

    Each image is EXIF-rotated, reduced to its first frame, converted to L or RGB (transparency
    composited on white, 16-bit samples scaled to 8 bits) and resized whole, each axis on its
    own, to ``image_size x image_size`` (bicubic, antialiased): the canvas holds the entire
    image, and the dataset keeps its source size so that crops are drawn with the source's own
    aspect ratio (see :class:`~barlowtwins.data.datasets.ImageDataset`). Files that cannot be
    used are counted in ``num_skipped`` and the first few are logged: when the folder is
    decoded into memory, all of them at once; when it is read lazily, as they are met (files
    spread over the folder are decoded until one works, so that a folder with no image at all
    fails here).

    Args:
        root: Folder to scan.
        image_size: Side ``S`` of the square output images.
        channels: 1 (greyscale) or 3 (RGB).
        max_samples: Keep at most this many files, chosen by a seed-0 permutation (kept in scan
            order); files that then fail to decode are not replaced.
        cache_limit_bytes: Decode everything into memory when ``N*C*S*S`` bytes fit, else
            return a :class:`LazyImageFolder` that decodes per access.
        workers: Decoding threads (default ``os.cpu_count()``); PIL releases the GIL.

    Returns:
        An :class:`InMemoryImages` or a :class:`LazyImageFolder`.

    Raises:
        DataError: If ``root`` is not a folder, an argument is invalid or no image is usable
            (lazily read: none of a sample of the files).
    """
    check_geometry(image_size, channels)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be a positive integer or None, got {max_samples}")
    if cache_limit_bytes < 0:
        raise DataError(f"cache_limit_bytes must be >= 0, got {cache_limit_bytes}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is a file; expected a folder of images or 'fashion-mnist'")

    index = folder_index(root)
    paths = index.paths(root)
    tops = index.tops
    if max_samples is not None and len(paths) > max_samples:
        keep = np.sort(np.random.default_rng(0).permutation(len(paths))[:max_samples])
        paths, tops = [paths[i] for i in keep.tolist()], tops[keep]
    classes, labels = _assign_labels(root, index.folders, tops, subset=max_samples is not None)
    skipped = [(_printable(os.path.join(root, path)), reason) for path, reason in index.skipped]

    with warnings.catch_warnings():
        # Bombs are detected and skipped explicitly; PIL's warning would only repeat that.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(paths) * channels * image_size**2 <= cache_limit_bytes:
            images, sizes, good = _decode_all(paths, image_size, channels, workers, skipped)
            dataset: ImageDataset | None = (
                InMemoryImages(
                    images,
                    None if labels is None else labels[good],
                    classes,
                    [paths[i] for i in good.tolist()],
                    skipped,
                    source_sizes=sizes,
                )
                if good.numel()
                else None
            )
        else:
            # Bad files are found as they are decoded; decoding files spread over the folder
            # until one works (usually the first) finds a folder without a single image now
            # rather than in the first training step.
            found, failures = _first_decodable(paths, image_size, channels)
            dataset = (
                LazyImageFolder(paths, labels, classes, image_size, channels, skipped)
                if found
                else None
            )
            if dataset is None and len(failures) == len(paths):
                skipped.extend(failures.items())  # every file was read: name them all
            elif dataset is None:
                sample = "; ".join(f"{p} ({r})" for p, r in list(failures.items())[:_SKIPS_LISTED])
                raise DataError(
                    f"no usable images in {root}: none of {len(failures)} of its "
                    f"{len(paths)} files, spread over the folder, can be read ({sample})"
                )

    if skipped:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped[:_SKIPS_LISTED])
        more = f"; and {len(skipped) - _SKIPS_LISTED} more" if len(skipped) > _SKIPS_LISTED else ""
        _log.warning("skipped %d unusable files in %s: %s%s", len(skipped), root, listed, more)
    if dataset is None:
        reasons = "; ".join(f"{p} ({r})" for p, r in skipped[:_SKIPS_LISTED]) or (
            "no files named " + "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        )
        raise DataError(f"no usable images in {root} ({len(skipped)} files skipped: {reasons})")
    return dataset


def summarize_folder(root: str | Path, sample: int = _SAMPLE) -> DataSummary:
    """Count the image files below ``root`` and measure the median shorter side of a sample.

    The count comes from the folder's index (the same one :func:`load_image_folder` uses) and
    only the sampled files' headers are read (PIL opens lazily), so this is quick even for
    large folders; recipes use it to choose view size, batch and epochs.

    Args:
        root: Image folder.
        sample: Files whose size is read (a seed-0 random sample).

    Raises:
        DataError: If ``root`` cannot be listed or has no readable image.
    """
    index = folder_index(root)
    prefix = os.path.join(root, "")
    picked = np.random.default_rng(0).permutation(len(index))[:sample].tolist()
    sides = []
    for path in (prefix + index.files[i] for i in picked):
        try:
            with open_image_checked(path) as image:
                sides.append(min(image.size))
        # PIL raises many exception types on corrupt data (OSError, SyntaxError, ...).
        except Exception:
            continue
    if not sides:
        raise DataError(f"no readable image in {root}")
    return DataSummary(count=len(index), median_side=int(np.median(sides)))


def fits_in_memory(
    root: str | Path, *, image_size: int, channels: int, limit_bytes: int = CACHE_LIMIT_BYTES
) -> bool:
    """Whether :func:`load_image_folder` decodes ``root`` once into memory (else per batch);
    counted from the folder's index, which that load then reuses."""
    count = len(folder_index(root))
    return count * channels * image_size * image_size <= limit_bytes


def _first_decodable(
    paths: Sequence[str], image_size: int, channels: int
) -> tuple[bool, dict[str, str]]:
    """Decodes up to ``_SAMPLE`` files evenly spread over ``paths`` until one works.

    Returns:
        Whether one did, and ``{printable path: reason}`` of those that failed before.
    """
    failures: dict[str, str] = {}
    for path in paths[:: max(1, -(-len(paths) // _SAMPLE))]:
        result = _decode_or_reason(path, image_size, channels)
        if isinstance(result, Decoded):
            return True, failures
        failures[_printable(path)] = result
    return False, failures


def _printable(path: str) -> str:
    """``path`` with undecodable bytes (held as surrogates by ``os``) written as escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _assign_labels(
    root: Path, folders: Sequence[str], tops: np.ndarray, *, subset: bool
) -> tuple[list[str] | None, Tensor | None]:
    """ImageFolder labels from first-level subfolders, or None when any image is in root.

    Args:
        root: The folder (for the warning).
        folders: The index's first-level folders that hold files, sorted.
        tops: Each file's index into ``folders``, -1 for a file directly in ``root``.
        subset: Whether ``tops`` are those of some of the files only.
    """
    if not len(tops) or tops.min() < 0:
        if len(tops) and (tops >= 0).any():
            _log.warning(
                "%s has images both directly inside and in subfolders; treating all %d as "
                "unlabeled (put every image in a class subfolder for labels)",
                root,
                len(tops),
            )
        return None, None
    if not subset:  # every folder holds a file: the indices are the labels
        return list(folders), torch.from_numpy(tops.astype(np.int64))
    # Only the folders that hold a kept file are classes (max_samples may leave some empty).
    used, labels = np.unique(tops, return_inverse=True)
    return [folders[i] for i in used.tolist()], torch.from_numpy(labels.astype(np.int64))


def open_image_checked(path: str) -> Image.Image:
    """Opens an image (header only), refusing decompression bombs."""
    image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    # PIL raises only above twice its limit and merely warns in between; refuse both.
    if limit is not None and width * height > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"{width}x{height} pixels exceeds the limit of {limit} (decompression bomb?)"
        )
    if width < 1 or height < 1:
        image.close()
        raise ValueError(f"image has no pixels ({width}x{height})")
    return image


def _reason(path: str, exc: Exception) -> str:
    """Why ``path`` could not be decoded, in words (the listing did not look at the file)."""
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read: {exc.strerror or exc}"  # e.g. removed since it was listed
    try:
        if os.stat(path).st_size == 0:
            return "empty file"
    except OSError:
        pass  # the decoder's own message below says enough
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Decoded:
    """A decoded image: the source stretched to a square canvas, and the source's size."""

    canvas: np.ndarray  # (C, S, S) uint8, contiguous
    size: Tensor  # (2,) int64: height, width


def _decode(path: str, image_size: int, channels: int) -> Decoded:
    """Decodes one file to its whole image on a ``(C, S, S)`` uint8 canvas."""
    with open_image_checked(path) as image:
        # JPEGs decode straight at a reduced DCT scale that keeps both sides >= image_size.
        image.draft(None, (image_size, image_size))
        # Opening selects frame 0, so animated images yield their first frame.
        image = ImageOps.exif_transpose(image)
    image = convert_mode(image, "L" if channels == 1 else "RGB")
    # The source's size as decoded: a JPEG draft scales both sides alike, so its aspect ratio
    # is the file's.
    width, height = image.size
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return Decoded(np.ascontiguousarray(array), torch.tensor([height, width]))


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """Converts any PIL mode to ``mode`` ("L" or "RGB")."""
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float32)
        eight = np.floor(wide * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(eight)
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _WHITE)
        background.alpha_composite(image.convert("RGBA"))
        image = background.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def _decode_or_reason(path: str, image_size: int, channels: int) -> Decoded | str:
    try:
        return _decode(path, image_size, channels)
    # PIL raises many exception types on corrupt data (OSError, SyntaxError, struct.error, ...).
    except Exception as exc:
        return _reason(path, exc)


def _run_pool(fn: Callable[[int], None], n: int, workers: int) -> None:
    if workers == 1 or n <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, range(n)):
            pass


def _decode_all(
    paths: Sequence[str],
    image_size: int,
    channels: int,
    workers: int,
    skipped: list[tuple[str, str]],
) -> tuple[Tensor, Tensor, Tensor]:
    """Decodes ``paths`` in threads; appends failures to ``skipped``.

    Returns:
        ``(images, sizes, good)``: the decoded canvases, compacted in place to the front of
        one allocation, their sources' sizes, and the indices into ``paths`` they came from.
    """
    images = torch.empty(len(paths), channels, image_size, image_size, dtype=torch.uint8)
    sizes = torch.zeros(len(paths), 2, dtype=torch.int64)
    out = images.numpy()
    reasons: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        result = _decode_or_reason(paths[i], image_size, channels)
        if isinstance(result, Decoded):
            out[i] = result.canvas
            sizes[i] = result.size
        else:
            reasons[i] = result

    _run_pool(work, len(paths), workers)
    good = [i for i, r in enumerate(reasons) if r is None]
    skipped.extend((_printable(paths[i]), r) for i, r in enumerate(reasons) if r is not None)
    # Moving rows forward (destination never after source) avoids a second full-size copy.
    for dst, src in enumerate(good):
        if dst != src:
            images[dst] = images[src]
    kept = torch.tensor(good, dtype=torch.int64)
    return images[: len(good)], sizes[kept], kept
