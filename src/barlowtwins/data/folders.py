"""Folders of image files: scanning, decoding with PIL, and the datasets built from them.

Folders are scanned deterministically and every file that cannot be used (corrupt, truncated,
not an image, decompression bomb, odd name, ...) is skipped and counted instead of crashing a
run. :func:`load_image_folder` decodes a folder into memory when it fits and otherwise returns a
:class:`LazyImageFolder`, which decodes per access with the same decoder and so lives here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
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
from barlowtwins.data.spec import DataSummary

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Modes whose samples span 0..65535; PIL's own convert("L") clips them at 255.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
_SKIPS_LISTED = 5
# Folders whose decoded pixels fit in this many bytes are decoded once and kept in memory.
CACHE_LIMIT_BYTES = 4 * 2**30


class LazyImageFolder(ImageDataset):
    """Image files decoded on every access, for folders too large to hold in memory.

    Headers were validated when the folder was scanned; a file that still fails to decode is
    logged once, counted in :attr:`num_skipped` and replaced by the next decodable sample, so a
    training run never stops on one bad file. The failure marks live in shared memory so that
    DataLoader worker processes update the same count.

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

    @property
    def num_skipped(self) -> int:  # type: ignore[override]
        """Files rejected at scan time plus files that failed to decode since."""
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
            DataError: If no file in the folder can be decoded any more.
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
            _log.warning("skipping unreadable image %s: %s", _printable(self.paths[i]), result)
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

    The folder is scanned recursively in sorted order, skipping hidden entries (names starting
    with ``.``) and visiting every real directory once, so symlink loops end. Following the
    ImageFolder convention, when all images sit in first-level subfolders, those subfolders are
    the classes; images directly in ``root`` make the whole folder unlabeled.

    Each image is EXIF-rotated, reduced to its first frame, converted to L or RGB (transparency
    composited on white, 16-bit samples scaled to 8 bits) and resized whole, each axis on its
    own, to ``image_size x image_size`` (bicubic, antialiased): the canvas holds the entire
    image, and the dataset keeps its source size so that crops are drawn with the source's own
    aspect ratio (see :class:`~barlowtwins.data.datasets.ImageDataset`). Files that cannot be
    used are counted in ``num_skipped`` and the first few are logged.

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
        DataError: If ``root`` is not a folder, an argument is invalid or no image is usable.
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

    scan = _scan(root)
    files = scan.files
    if max_samples is not None and len(files) > max_samples:
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_samples])
        files = [files[i] for i in keep]
    classes, labels = _assign_labels(root, files)
    skipped = list(scan.skipped)

    with warnings.catch_warnings():
        # Bombs are detected and skipped explicitly; PIL's warning would only repeat that.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        paths = [f.path for f in files]
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
            good = _probe_all(paths, workers, skipped)
            dataset = (
                LazyImageFolder(
                    [paths[i] for i in good.tolist()],
                    None if labels is None else labels[good],
                    classes,
                    image_size,
                    channels,
                    skipped,
                )
                if good.numel()
                else None
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


def summarize_folder(root: str | Path, sample: int = 256) -> DataSummary:
    """Count the image files below ``root`` and measure the median shorter side of a sample.

    Only the files' headers are read (PIL opens lazily), so this is quick even for large
    folders; recipes use it to choose view size, batch and epochs.

    Args:
        root: Image folder.
        sample: Files whose size is read (a seed-0 random sample).

    Raises:
        DataError: If ``root`` cannot be listed or has no readable image.
    """
    files = _scan(Path(root)).files
    rng = np.random.default_rng(0)
    picked = rng.permutation(len(files))[:sample].tolist()
    sides = []
    for index in picked:
        try:
            with Image.open(files[int(index)].path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sides:
        raise DataError(f"no readable image in {root}")
    return DataSummary(count=len(files), median_side=int(np.median(sides)))


def fits_in_memory(
    root: str | Path, *, image_size: int, channels: int, limit_bytes: int = CACHE_LIMIT_BYTES
) -> bool:
    """Whether :func:`load_image_folder` decodes ``root`` once into memory (else per batch)."""
    count = len(_scan(Path(root)).files)
    return count * channels * image_size * image_size <= limit_bytes


@dataclass(frozen=True)
class _File:
    """A candidate image file and the first-level subfolder it was found in (None: root)."""

    path: str
    top: str | None


@dataclass
class _Scan:
    """Result of scanning a folder: usable candidates and ``(path, reason)`` rejections."""

    files: list[_File]
    skipped: list[tuple[str, str]]


def _printable(path: str) -> str:
    """``path`` with undecodable bytes (held as surrogates by ``os``) written as escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _scan(root: Path) -> _Scan:
    """Lists candidate image files below ``root`` in sorted, depth-first order.

    An explicit stack instead of recursion keeps arbitrarily deep trees safe; real paths of
    visited directories stop symlink loops and double visits.
    """
    files: list[_File] = []
    skipped: list[tuple[str, str]] = []
    visited = {os.path.realpath(root)}
    try:
        first = _sorted_entries(str(root))
    except OSError as exc:
        raise DataError(f"cannot list image folder {root}: {exc.strerror or exc}") from exc
    stack: list[tuple[Iterator[os.DirEntry[str]], str | None]] = [(iter(first), None)]
    while stack:
        entries, top = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        shown = _printable(entry.path)
        if _is_dir(entry):
            real = os.path.realpath(entry.path)
            if real in visited:
                continue
            visited.add(real)
            try:
                children = _sorted_entries(entry.path)
            except OSError as exc:
                skipped.append((shown, f"cannot list folder: {exc.strerror or exc}"))
                continue
            stack.append((iter(children), entry.name if top is None else top))
            continue
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        reason = _unusable_file_reason(entry)
        if reason is None:
            files.append(_File(entry.path, top))
        else:
            skipped.append((shown, reason))
    return _Scan(files, skipped)


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unusable_file_reason(entry: os.DirEntry[str]) -> str | None:
    """Why a file with an image extension cannot be used before opening it, or None."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable names cannot be shown, logged or stored portably downstream.
        return "file name is not valid UTF-8"
    try:
        if not entry.is_file():
            return "not a regular file (broken link, device or pipe)"
        if entry.stat().st_size == 0:
            return "empty file"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    if not os.access(entry.path, os.R_OK):
        return "permission denied"
    return None


def _assign_labels(root: Path, files: Sequence[_File]) -> tuple[list[str] | None, Tensor | None]:
    """ImageFolder labels from first-level subfolders, or None when any image is in root."""
    tops = {f.top for f in files}
    if not files or None in tops:
        if len(tops) > 1:
            _log.warning(
                "%s has images both directly inside and in subfolders; treating all %d as "
                "unlabeled (put every image in a class subfolder for labels)",
                root,
                len(files),
            )
        return None, None
    classes = sorted(t for t in tops if t is not None)
    index = {name: i for i, name in enumerate(classes)}
    return classes, torch.tensor([index[str(f.top)] for f in files], dtype=torch.int64)


def _open_checked(path: str) -> Image.Image:
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


def _reason(exc: Exception) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Decoded:
    """A decoded image: the source stretched to a square canvas, and the source's size."""

    canvas: np.ndarray  # (C, S, S) uint8, contiguous
    size: Tensor  # (2,) int64: height, width


def _decode(path: str, image_size: int, channels: int) -> Decoded:
    """Decodes one file to its whole image on a ``(C, S, S)`` uint8 canvas."""
    with _open_checked(path) as image:
        # JPEGs decode straight at a reduced DCT scale that keeps both sides >= image_size.
        image.draft(None, (image_size, image_size))
        # Opening selects frame 0, so animated images yield their first frame.
        image = ImageOps.exif_transpose(image)
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    # The source's size as decoded: a JPEG draft scales both sides alike, so its aspect ratio
    # is the file's.
    width, height = image.size
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return Decoded(np.ascontiguousarray(array), torch.tensor([height, width]))


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
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
        return _reason(exc)


def _probe_reason(path: str) -> str | None:
    try:
        _open_checked(path).close()
    # Same variety of PIL exceptions as in _decode_or_reason.
    except Exception as exc:
        return _reason(exc)
    return None


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


def _probe_all(paths: Sequence[str], workers: int, skipped: list[tuple[str, str]]) -> Tensor:
    """Validates headers in threads; appends failures to ``skipped``; returns good indices."""
    reasons: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        reasons[i] = _probe_reason(paths[i])

    _run_pool(work, len(paths), workers)
    skipped.extend((_printable(paths[i]), r) for i, r in enumerate(reasons) if r is not None)
    return torch.tensor([i for i, r in enumerate(reasons) if r is None], dtype=torch.int64)
