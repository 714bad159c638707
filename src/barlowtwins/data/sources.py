"""From a data spec to a dataset: :func:`load_data`, the one place that knows every source.

The sources themselves live in :mod:`barlowtwins.data.fashion_mnist`,
:mod:`barlowtwins.data.folders` and :mod:`barlowtwins.data.streaming` (shards, imported only
when asked for: it loads LitData and boto3) and never import each other; this dispatcher sits
above them.
It also brings Fashion-MNIST (read at 1x28x28) to the requested size and channels, which a
folder is decoded at directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from barlowtwins.data.datasets import DataError, ImageDataset, InMemoryImages, check_geometry
from barlowtwins.data.fashion_mnist import load_fashion_mnist
from barlowtwins.data.folders import CACHE_LIMIT_BYTES, load_image_folder
from barlowtwins.data.spec import DataSpec

_RESIZE_CHUNK = 1024


def load_data(
    spec: str | DataSpec,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    max_samples: int | None = None,
    in_memory: bool | None = None,
    s3_endpoint: str | None = None,
) -> ImageDataset:
    """Loads the dataset named by ``spec``: Fashion-MNIST, a folder of images, or shards.

    Args:
        spec: A :class:`DataSpec` or its text: ``"fashion-mnist"`` (the train split),
            ``"fashion-mnist:train"``, ``"fashion-mnist:test"`` (case-insensitive), shards
            (``s3://bucket/prefix`` or a folder holding LitData's ``index.json``), or else
            the path of an image folder.
        image_size: Output side. Fashion-MNIST keeps its native 28 when ``None`` and is
            otherwise resized (bilinear, antialiased); required for folders and shards.
        channels: 1 or 3. Fashion-MNIST keeps its 1 channel when ``None`` (grey is repeated for
            3); folders and shards default to 3.
        data_dir: Where to look for (or download) Fashion-MNIST; unused for folders.
        download: Allow downloading Fashion-MNIST when no local copy exists.
        max_samples: Keep at most this many samples, the first of a seed-0 permutation (so
            roughly class-balanced), in their original order; of shards, the first ones
            (shuffled when written).
        in_memory: For a folder: decode it once into memory (True), per access (False), or
            into memory when its pixels fit in 4 GiB (None). Fashion-MNIST is always in memory.
        s3_endpoint: For shards in S3: the endpoint URL (default: boto3's, e.g. from
            ``AWS_ENDPOINT_URL``).

    Returns:
        The dataset.

    Raises:
        DataError: For an unknown Fashion-MNIST split, invalid sizes, or unusable data.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be a positive integer or None, got {max_samples}")
    try:
        data = DataSpec.parse(spec)
    except ValueError as error:
        raise DataError(str(error)) from None
    if data.shards is not None:
        if image_size is None:
            raise DataError(f"an image size is required to load the shards {data}")
        from barlowtwins.data.streaming import load_shards

        return load_shards(
            data.shards,
            image_size=image_size,
            channels=3 if channels is None else channels,
            s3_endpoint=s3_endpoint,
            max_samples=max_samples,
        )
    if data.path is not None:
        if image_size is None:
            raise DataError(f"an image size is required to load the image folder {data}")
        return load_image_folder(
            data.path,
            image_size=image_size,
            channels=3 if channels is None else channels,
            max_samples=max_samples,
            cache_limit_bytes=(
                CACHE_LIMIT_BYTES if in_memory is None else sys.maxsize if in_memory else 0
            ),
        )
    dataset = load_fashion_mnist(data.split or "train", root=data_dir, download=download)
    if max_samples is not None and max_samples < len(dataset):
        perm = np.random.default_rng(0).permutation(len(dataset))[:max_samples]
        dataset = dataset.subset(np.sort(perm).tolist())
    return _reshape_images(
        dataset,
        dataset.image_size if image_size is None else image_size,
        dataset.channels if channels is None else channels,
    )


def _reshape_images(dataset: InMemoryImages, image_size: int, channels: int) -> InMemoryImages:
    """Resizes (bilinear, antialiased) and converts a dataset's images between 1 and 3 channels.

    Raises:
        DataError: For an invalid size or channel count, or RGB to greyscale.
    """
    check_geometry(image_size, channels)
    if channels < dataset.channels:
        raise DataError(f"cannot convert {dataset.channels}-channel images to {channels}")
    if image_size == dataset.image_size and channels == dataset.channels:
        return dataset
    source = dataset.images
    out = torch.empty(len(dataset), channels, image_size, image_size, dtype=torch.uint8)
    # Chunks bound the float32 working memory regardless of the dataset size.
    for start in range(0, len(dataset), _RESIZE_CHUNK):
        chunk = source[start : start + _RESIZE_CHUNK]
        if image_size != dataset.image_size:
            chunk = F.interpolate(
                chunk.float(),
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            chunk = chunk.round_().clamp_(0, 255).to(torch.uint8)
        out[start : start + chunk.shape[0]] = chunk.expand(-1, channels, -1, -1)
    return InMemoryImages(
        out, dataset.labels, dataset.classes, dataset.paths, dataset.skipped, dataset.num_skipped
    )
