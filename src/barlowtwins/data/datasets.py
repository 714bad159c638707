"""What a dataset is here: fixed-size uint8 images with optional labels, and their statistics.

Every dataset yields ``(image, label, index, size)``: ``image`` a ``uint8`` tensor of shape
``(C, S, S)`` that holds the *whole* source image stretched to an ``S x S`` canvas, and
``size`` the source's ``(height, width)``, so that the views' random crops are drawn on the
whole source with its own aspect ratio (as ``RandomResizedCrop`` on the source image) and read
from the canvas, and the evaluation view takes the source's centred square. A square source is
its own canvas. Augmentation and normalisation happen later, on the device. This module holds
the :class:`ImageDataset` contract, the in-memory implementation every source can produce,
:func:`dataset_stats` and the :class:`DataError` all sources raise. The lazily decoded folder
dataset lives with the folder scanning and decoding it relies on, in
:mod:`barlowtwins.data.folders`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Per-channel statistics are estimated on at most this many samples: plenty for 3-4 digits.
_STATS_MAX_SAMPLES = 10_000
_STATS_CHUNK = 1024


class DataError(ValueError):
    """A data source is missing or unusable; the message is one user-facing line."""


# A dataset item: image (uint8 canvas), label (-1 when unlabeled), index, source size.
Item = tuple[Tensor, int, int, Tensor]


class ImageDataset(Dataset, ABC):
    """Images as uint8 canvases of one square size, with their source sizes and optional
    class labels.

    Attributes:
        channels: 1 (greyscale) or 3 (RGB).
        image_size: Side ``S`` of every ``(C, S, S)`` canvas.
        labels: int64 class labels of shape ``(N,)``, or ``None`` for unlabeled data.
        classes: Class names indexed by label, or ``None``.
        paths: Source file of every sample, or ``None`` for array datasets.
        num_skipped: How many input files could not be used.
    """

    channels: int
    image_size: int
    labels: Tensor | None
    classes: list[str] | None
    paths: list[str] | None
    num_skipped: int

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def __getitem__(self, index: int) -> Item:
        """Returns ``(canvas uint8 (C, S, S), label or -1 when unlabeled, sample index,
        source (height, width) int64)``."""

    def _label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def _canvas_size(self) -> Tensor:
        """The size of a source that is its own canvas."""
        return torch.tensor([self.image_size, self.image_size])

    def subset(self, indices: Sequence[int] | Tensor) -> ImageDataset:
        """The samples at ``indices``, in that order, as a dataset of their own (indexed from 0)."""
        return SubsetImages(self, indices)


class SubsetImages(ImageDataset):
    """Some samples of another dataset, read through it (nothing is copied).

    Args:
        base: The dataset.
        indices: Its samples to keep, in this order.
    """

    def __init__(self, base: ImageDataset, indices: Sequence[int] | Tensor) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        self.labels = None if base.labels is None else base.labels[self.indices]
        self.classes = base.classes
        self.paths = None if base.paths is None else [base.paths[i] for i in self.indices.tolist()]
        self.channels = base.channels
        self.image_size = base.image_size

    @property
    def num_skipped(self) -> int:  # type: ignore[override]
        """The base dataset's count of unusable files."""
        return self.base.num_skipped

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.indices)

    def __getitem__(self, index: int) -> Item:
        """Returns the base's item with its ``index`` in this subset."""
        index = range(len(self))[index]
        image, label, _, size = self.base[int(self.indices[index])]
        return image, label, index, size


class InMemoryImages(ImageDataset):
    """A dataset decoded once into one contiguous ``(N, C, S, S)`` uint8 tensor.

    Args:
        images: uint8 tensor of shape ``(N, C, S, S)`` with ``C`` 1 or 3: each sample's source
            image stretched to the canvas.
        labels: int64 labels of shape ``(N,)`` or ``None``.
        classes: Class names indexed by label, or ``None``.
        paths: Source file of every sample, or ``None``.
        skipped: ``(path, reason)`` of every input file that could not be used.
        num_skipped: Count of unusable inputs; defaults to ``len(skipped)``.
        source_sizes: int64 ``(N, 2)`` height and width of each source image, or ``None``
            when every image is its own (square) source.

    Raises:
        DataError: If the shapes or dtypes do not match.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        classes: Sequence[str] | None = None,
        paths: Sequence[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        num_skipped: int | None = None,
        source_sizes: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"images must be a uint8 tensor of shape (N, 1 or 3, S, S), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if images.shape[2] != images.shape[3]:
            raise DataError(f"images must be square, got {tuple(images.shape[2:])}")
        n = images.shape[0]
        if labels is not None and (labels.shape != (n,) or labels.dtype != torch.int64):
            raise DataError(
                f"labels must be an int64 tensor of shape ({n},), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if paths is not None and len(paths) != n:
            raise DataError(f"got {len(paths)} paths for {n} images")
        if source_sizes is not None and source_sizes.shape != (n, 2):
            raise DataError(f"got source sizes of shape {tuple(source_sizes.shape)} for {n} images")
        self.images = images.contiguous()
        self.source_sizes = source_sizes
        self.labels = labels
        self.classes = None if classes is None else list(classes)
        self.paths = None if paths is None else list(paths)
        self.skipped = list(skipped)
        self.num_skipped = len(self.skipped) if num_skipped is None else num_skipped
        self.channels = images.shape[1]
        self.image_size = images.shape[2]

    def __len__(self) -> int:
        """Number of samples."""
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Item:
        """Returns ``(canvas uint8 (C, S, S), label or -1 when unlabeled, sample index,
        source (height, width))``."""
        index = range(len(self))[index]
        size = self._canvas_size() if self.source_sizes is None else self.source_sizes[index]
        return self.images[index], self._label(index), index, size

    def subset(self, indices: Sequence[int] | Tensor) -> InMemoryImages:
        """A new dataset with the samples at ``indices`` (in that order), images copied."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return InMemoryImages(
            self.images[idx],
            None if self.labels is None else self.labels[idx],
            self.classes,
            None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            self.skipped,
            self.num_skipped,
            None if self.source_sizes is None else self.source_sizes[idx],
        )

    def head(self, n: int) -> InMemoryImages:
        """The first ``n`` samples, sharing memory with this dataset."""
        return InMemoryImages(
            self.images[:n],
            None if self.labels is None else self.labels[:n],
            self.classes,
            None if self.paths is None else self.paths[:n],
            self.skipped,
            self.num_skipped,
            None if self.source_sizes is None else self.source_sizes[:n],
        )


def first_images(dataset: ImageDataset, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` canvases of ``dataset`` and their source sizes, each stacked.

    Returns:
        ``(images (n, C, S, S) uint8, sizes (n, 2) int64)`` with ``n = min(count, len)``.
    """
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([item[0] for item in items]), torch.stack([item[3] for item in items])


def dataset_stats(dataset: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation in [0, 1] units, for normalisation.

    Estimated on all samples, or on a seed-0 random subset of 10000 for larger datasets.

    Args:
        dataset: Any :class:`ImageDataset`.

    Returns:
        ``(mean, std)``, each a tuple of ``dataset.channels`` floats.

    Raises:
        DataError: If the dataset is empty.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute statistics of an empty dataset")
    indices = np.arange(n)
    if n > _STATS_MAX_SAMPLES:
        indices = np.sort(np.random.default_rng(0).permutation(n)[:_STATS_MAX_SAMPLES])
    total = torch.zeros(dataset.channels, dtype=torch.float64)
    total_sq = torch.zeros(dataset.channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(indices), _STATS_CHUNK):
        chunk = indices[start : start + _STATS_CHUNK]
        if isinstance(dataset, InMemoryImages):
            batch = dataset.images[torch.from_numpy(chunk)]
        else:
            batch = torch.stack([dataset[int(i)][0] for i in chunk])
        x = batch.to(torch.float64).div_(255.0).transpose(0, 1).reshape(dataset.channels, -1)
        total += x.sum(dim=1)
        total_sq += x.square().sum(dim=1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def check_geometry(image_size: int, channels: int) -> None:
    """Checks an output geometry: ``image_size`` a positive int, ``channels`` 1 or 3.

    Raises:
        DataError: If either is invalid.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
