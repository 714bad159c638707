"""Shards: images written by ``barlowtwins shards`` and read with LitData, from disk or S3.

Data larger than a disk lives in object storage as shards: a few hundred files of tens of
megabytes, each holding thousands of encoded images, read in order and cached on local disk.
The shards are LitData's own format (``litdata.optimize``; LitData, Apache-2.0,
https://github.com/Lightning-AI/litdata), so nothing here reads or writes bytes of them:

* **Random access** (``StreamingImages[i]``) goes through LitData's
  ``StreamingDataset[i]``. From S3 it downloads the whole shard that holds ``i`` into LitData's
  cache (``LITDATA_CACHE_DIR``, else ``~/.lightning/chunks``) and reads the rest of that shard
  from there: every pass here is over a contiguous range (the kNN monitor's bank and the
  held-out images are the first images, scoring reads them all in order), and the shards were
  shuffled when written, so the first images are a random sample.
* **Training** (:meth:`StreamingImages.loader`) iterates LitData's ``StreamingDataLoader``:
  each epoch shuffles the order of the shards and the images inside each shard with the run's
  seed, and splits them over the processes (and their DataLoader workers) itself, so Lightning
  adds no ``DistributedSampler``. With ``drop_last`` every process gets ``floor(N / G)``
  batches of a global batch ``G`` (``floor(N / b) // W`` batches of ``b = G / W`` images on
  each of ``W`` processes, LitData's ``_associate_chunks_and_intervals_to_workers``): the
  ``N mod G`` images left out of an epoch are as many as one process with the global batch
  leaves out. Which ones: the end of the last shard(s) in that epoch's shard order, so
  other images each epoch. Its ``state_dict`` resumes an epoch where a checkpoint left it.

What this module adds to LitData: the items are decoded into this package's
``(image, label, index, size)`` (the stored JPEG stretched whole onto the ``S x S`` canvas, the
source's size from the shard), the labels, class names and source paths come from a small
manifest written next to LitData's ``index.json``, and three guards, each checked against
LitData 0.2.76 (``tests/test_streaming.py``):

* On a parallel filesystem (NFS, Lustre, GPFS, ...; ``LITDATA_POSIX_FAST=1`` forces the same)
  LitData switches to a windowed shuffle that hands whole shards to workers and trims every
  worker to the shortest one, which leaves out more than ``N mod G`` images and gives workers
  with no shard no batch at all. ``_keep_full_shuffle`` keeps LitData's in-place reads and
  its ordinary shuffle.
* After a resumed epoch, LitData's loader replays that epoch's rest in the next one unless its
  iterator ran to exhaustion, which Lightning never asks for when the length is known;
  :class:`StreamingLoader` starts the next epoch as an uninterrupted run does, also when
  ``--steps-per-epoch`` ends epochs early.
* LitData reads shards from S3 with obstore, which LitData builds without ``allow_http``: a
  plain-``http://`` endpoint fails on the first shard; :func:`storage_options` refuses it at
  once (serve the endpoint over https; with a private CA give it to both boto3,
  ``AWS_CA_BUNDLE``, and obstore, ``SSL_CERT_FILE``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litdata
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from barlowtwins.data.datasets import DataError, ImageDataset, Item, check_geometry
from barlowtwins.data.spec import S3_SCHEME, SHARDS_INDEX, DataSummary

_log = logging.getLogger(__name__)
# LitData logs two INFO lines for every dataset it opens (one per worker and epoch here);
# its warnings still show.
logging.getLogger("litdata").setLevel(logging.WARNING)

#: The file ``barlowtwins shards`` writes next to LitData's ``index.json``, with the count,
#: labels, classes, how the images were stored and the files left out (:class:`ShardsManifest`).
MANIFEST = "barlowtwins-shards.json"
#: The source path of every stored image, in the shards' order (read only when asked for).
PATHS = "barlowtwins-paths.json"
#: Bumped when the manifest changes meaning; shards of another format are refused.
MANIFEST_FORMAT = 1
# Images whose source sizes give the median side that recipes adapt to.
_SUMMARY_SAMPLE = 256
# The endpoint variables boto3 reads, the service-specific one first.
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class ShardsManifest:
    """What a folder of shards holds, beside LitData's ``index.json``.

    Attributes:
        count: Images stored, in the shards' order ``0 .. count - 1``.
        side: Shorter side of every stored image (smaller sources are stored as they are).
        quality: Their JPEG quality.
        seed: Seed of the order they were shuffled into.
        source: The image folder they came from.
        classes: Class names (the source's first-level subfolders), or None when unlabelled.
        labels: Every stored image's class index (int64, 8 bytes an image however many
            processes read it), or None when unlabelled.
        failed: Positions, in the shuffled list of candidate files, of the files that could
            not be decoded when writing; an item's stored ``position`` less the failures
            before it is its index.
        unusable: ``(path, reason)`` of every source file left out.
    """

    count: int
    side: int
    quality: int
    seed: int
    source: str
    classes: list[str] | None
    labels: np.ndarray | None
    failed: list[int]
    unusable: list[tuple[str, str]]

    def to_json(self) -> str:
        """The manifest as JSON text."""
        values = dataclasses.asdict(self)
        values["labels"] = None if self.labels is None else self.labels.tolist()
        return json.dumps({"format": MANIFEST_FORMAT, **values}) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardsManifest:
        """Parse a manifest; ``where`` names it in errors.

        Raises:
            DataError: If it is not a manifest of this format.
        """
        try:
            values = json.loads(text)
            if values.pop("format") != MANIFEST_FORMAT:
                raise DataError(
                    f"{where} is of another format; write the shards again with this version"
                )
            values["unusable"] = [tuple(entry) for entry in values["unusable"]]
            if values["labels"] is not None:
                values["labels"] = np.asarray(values["labels"], dtype=np.int64)
            return cls(**values)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"{where} is not a manifest of barlowtwins shards ({error})") from None


def storage_options(s3_endpoint: str | None) -> dict[str, Any]:
    """LitData's ``storage_options`` (boto3 client arguments) for an S3 endpoint option.

    Without one, boto3 finds the endpoint and the credentials as it always does
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_DEFAULT_REGION``, ``~/.aws``).

    Raises:
        DataError: For a plain-``http://`` endpoint, which LitData cannot read shards from.
    """
    endpoint = s3_endpoint or next(
        (os.environ[name] for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None
    )
    if endpoint is not None and endpoint.lower().startswith("http://"):
        raise DataError(
            f"the S3 endpoint {endpoint} is plain http, which LitData's shard downloads "
            "(obstore) refuse; serve it over https (a private CA goes in both AWS_CA_BUNDLE "
            "and SSL_CERT_FILE)"
        )
    return {"endpoint_url": s3_endpoint} if s3_endpoint else {}


def _is_remote(shards: str) -> bool:
    return shards.startswith(S3_SCHEME)


def read_shards_file(shards: str, name: str, s3_endpoint: str | None = None) -> str:
    """The text of the file ``name`` in a folder of shards, local or in S3.

    Raises:
        DataError: If it cannot be read.
    """
    if not _is_remote(shards):
        path = Path(shards) / name
        try:
            return path.read_text()
        except OSError as error:
            hint = (
                f"{shards} holds LitData's {SHARDS_INDEX} but no {name}: write it with "
                "barlowtwins shards"
                if (Path(shards) / SHARDS_INDEX).is_file()
                else f"no shards in {shards}"
            )
            raise DataError(f"{hint} ({error.strerror or error})") from None
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = shards[len(S3_SCHEME) :].partition("/")
    key = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
    try:
        client = boto3.session.Session().client("s3", **storage_options(s3_endpoint))
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return bytes(body.read()).decode()
    except (BotoCoreError, ClientError) as error:
        raise DataError(
            f"cannot read {S3_SCHEME}{bucket}/{key} ({str(error).splitlines()[0]}); upload the "
            "whole folder that barlowtwins shards wrote, and check the endpoint and credentials"
        ) from None


def read_manifest(shards: str, s3_endpoint: str | None = None) -> ShardsManifest:
    """The :class:`ShardsManifest` of a folder of shards (read once per process, and again
    when a local one was written anew).

    Raises:
        DataError: If there is none or it cannot be read.
    """
    try:
        written = None if _is_remote(shards) else (Path(shards) / MANIFEST).stat().st_mtime_ns
    except OSError:
        written = None  # reading it names the problem
    return _read_manifest(shards, s3_endpoint, written)


@functools.lru_cache(maxsize=8)
def _read_manifest(shards: str, s3_endpoint: str | None, written: int | None) -> ShardsManifest:
    """Parsed once per shards, endpoint and (local) modification time ``written``."""
    return ShardsManifest.from_json(
        read_shards_file(shards, MANIFEST, s3_endpoint), f"{shards}/{MANIFEST}"
    )


def summarize_shards(shards: str, s3_endpoint: str | None = None) -> DataSummary:
    """The image count of a folder of shards and the median shorter side of the sources of its
    first images (a random sample: the shards were shuffled when written); recipes adapt to it.

    Raises:
        DataError: If the shards cannot be read.
    """
    data = StreamingImages(shards, image_size=1, s3_endpoint=s3_endpoint)
    sides = [int(data.source_size(i).min()) for i in range(min(len(data), _SUMMARY_SAMPLE))]
    return DataSummary(count=len(data), median_side=int(np.median(sides)))


def decode_canvas(data: bytes | memoryview, image_size: int, channels: int) -> Tensor:
    """A stored JPEG stretched whole onto a ``(channels, image_size, image_size)`` uint8 canvas.

    JPEGs decode at a reduced DCT scale that keeps both sides at least ``image_size`` (PIL's
    ``draft``), then are resized bicubically, as folders are.
    """
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        image.draft(mode, (image_size, image_size))
        canvas = image.convert(mode).resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(canvas)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


@dataclass(frozen=True)
class _Decode:
    """LitData's ``transform``: a stored item to ``(canvas, label, index, source size)``, run
    where the item is read (a DataLoader worker)."""

    image_size: int
    channels: int
    failed: tuple[int, ...]

    def __call__(self, item: dict[str, Any]) -> Item:
        position = int(item["index"])
        index = position - bisect_left(self.failed, position)
        size = torch.tensor([int(item["height"]), int(item["width"])])
        return (
            decode_canvas(item["image"], self.image_size, self.channels),
            int(item["label"]),
            index,
            size,
        )


class StreamingImages(ImageDataset):
    """Images in shards written by ``barlowtwins shards``, on disk or in S3, read with LitData.

    Indexable (each access reads one image through LitData's random access) and, for
    training, iterable through :meth:`loader`. Labels, class names and the count come from the
    shards' manifest; the source paths too, read only when :attr:`paths` is asked for.

    Args:
        shards: A folder holding LitData's ``index.json`` and the manifest, or an
            ``s3://bucket/prefix`` URL of one.
        image_size: Side ``S`` of the canvases.
        channels: 1 (greyscale) or 3 (RGB).
        s3_endpoint: The S3 endpoint URL (default: what boto3 finds, e.g. ``AWS_ENDPOINT_URL``).
        limit: Keep the first ``limit`` images only (a random sample: the shards are shuffled).

    Raises:
        DataError: If the shards or their manifest cannot be read, or an argument is invalid.
    """

    def __init__(
        self,
        shards: str,
        *,
        image_size: int,
        channels: int = 3,
        s3_endpoint: str | None = None,
        limit: int | None = None,
    ) -> None:
        check_geometry(image_size, channels)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive integer or None, got {limit}")
        # One spelling per dataset: LitData's resume checks that it reads the same one.
        remote = _is_remote(shards)
        self.shards = shards.rstrip("/") if remote else str(Path(shards).absolute())
        self.s3_endpoint = s3_endpoint
        self._storage_options = storage_options(s3_endpoint) if remote else {}
        self.manifest = read_manifest(self.shards, s3_endpoint)
        self._count = self.manifest.count if limit is None else min(limit, self.manifest.count)
        labels = self.manifest.labels
        self.labels = None if labels is None else torch.from_numpy(labels[: self._count])
        self.classes = self.manifest.classes
        self.image_size = image_size
        self.channels = channels
        self._decode = _Decode(image_size, channels, tuple(self.manifest.failed))
        self._paths: list[str] | None = None
        # LitData's reader for random access, one per process (its threads do not survive a
        # fork, and DataLoader workers fork).
        self._reader: litdata.StreamingDataset | None = None
        self._reader_pid = -1

    @property
    def num_skipped(self) -> int:  # type: ignore[override]
        """Source files that are not in the shards (unusable when they were written)."""
        return len(self.manifest.unusable)

    @property
    def paths(self) -> list[str]:  # type: ignore[override]
        """Every image's source file, relative to the folder the shards were written from."""
        if self._paths is None:
            text = read_shards_file(self.shards, PATHS, self.s3_endpoint)
            self._paths = list(json.loads(text))[: self._count]
        return self._paths

    def __len__(self) -> int:
        """Number of images."""
        return self._count

    def __getstate__(self) -> dict[str, Any]:
        # A pickled copy (a spawned worker) opens its own reader.
        return {**self.__dict__, "_reader": None, "_reader_pid": -1}

    def _item(self, index: int) -> dict[str, Any]:
        if self._reader is None or self._reader_pid != os.getpid():
            reader = litdata.StreamingDataset(self.shards, storage_options=self._storage_options)
            item = reader[index]
            if _is_remote(self.shards):
                # Further reads download whole shards into the cache (LitData's first read of
                # an S3 dataset fetches only that item's bytes).
                reader.on_demand_bytes = False
            self._reader, self._reader_pid = reader, os.getpid()
            return item  # type: ignore[no-any-return]
        return self._reader[index]  # type: ignore[no-any-return]

    def __getitem__(self, index: int) -> Item:
        """Returns ``(canvas uint8 (C, S, S), label or -1, index, source (height, width))``."""
        index = range(len(self))[index]
        image, label, _, size = self._decode(self._item(index))
        return image, label, index, size

    def source_size(self, index: int) -> Tensor:
        """The source ``(height, width)`` of image ``index``, without decoding it."""
        item = self._item(range(len(self))[index])
        return torch.tensor([int(item["height"]), int(item["width"])])

    def head(self, count: int) -> StreamingImages:
        """The first ``count`` images (a random sample of them all), read from the same shards."""
        return StreamingImages(
            self.shards,
            image_size=self.image_size,
            channels=self.channels,
            s3_endpoint=self.s3_endpoint,
            limit=min(count, self._count),
        )

    def loader(
        self,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        epoch_batches: int | None = None,
    ) -> StreamingLoader:
        """LitData's loader for training: shuffled per epoch from ``seed``, split over the
        processes of a distributed run, full batches only, resumable mid-epoch.

        Build it in each training process once the process group exists (a LightningDataModule's
        ``train_dataloader``): LitData reads the world size and rank when its dataset is made.

        Args:
            batch_size: Images per process and step.
            seed: Seed of each epoch's shuffle (the epoch number is mixed in).
            num_workers: DataLoader workers per process, each reading its own shards.
            pin_memory: Pin the batches (for CUDA).
            epoch_batches: End every epoch after this many batches (``--steps-per-epoch``).
        """
        dataset = litdata.StreamingDataset(
            self.shards,
            shuffle=True,
            drop_last=True,
            seed=seed,
            storage_options=self._storage_options,
            transform=self._decode,
        )
        if self._count < self.manifest.count:
            dataset = dataset.subset(range(self._count))
        _keep_full_shuffle(dataset)
        return StreamingLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            epoch_batches=epoch_batches,
        )


def _keep_full_shuffle(dataset: litdata.StreamingDataset) -> None:
    """Keep LitData's ordinary shuffle on a parallel filesystem too (see the module's notes):
    its windowed shuffle there trims every worker to the shortest one."""
    profile = getattr(dataset, "posix_fast", None)
    if profile is not None and profile.window_shuffle:
        dataset.posix_fast = dataclasses.replace(profile, kind="posix")


class StreamingLoader(litdata.StreamingDataLoader):
    """LitData's ``StreamingDataLoader`` whose epochs after a resume are an uninterrupted run's.

    LitData replays a resumed epoch (``load_state_dict``) until its iterator is exhausted.
    Lightning stops asking for batches at the loader's length, and at ``--steps-per-epoch``
    before it, so the epoch after a resumed one would replay the resumed one's rest. This
    loader ends an epoch at ``len(loader)`` batches, counting those before the resume, and
    starts the next one afresh, as LitData does after an epoch it ran to the end.

    Args:
        dataset: LitData's dataset.
        epoch_batches: End every epoch after this many batches (None: all of them).
        **kwargs: ``StreamingDataLoader``'s (``batch_size``, ``num_workers``, ...).
    """

    #: Whether the next iteration resumes from a loaded state (LitData's flag).
    restore: bool

    def __init__(
        self, dataset: litdata.StreamingDataset, *, epoch_batches: int | None = None, **kwargs: Any
    ) -> None:
        self.epoch_batches = epoch_batches
        # Batches of the current epoch handed out, those before a resume included.
        self._epoch_batches_done = 0
        super().__init__(dataset, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch on this process: LitData's, or ``epoch_batches`` if fewer."""
        batches = super().__len__()
        return batches if self.epoch_batches is None else min(batches, self.epoch_batches)

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Resume the epoch that ``obj`` (from :meth:`state_dict`) was taken in."""
        super().load_state_dict(obj)
        self._epoch_batches_done = int(obj["num_samples_yielded"]) // int(self.batch_size or 1)

    def __iter__(self) -> Iterator[Any]:
        if not self.restore or self._epoch_batches_done >= len(self):
            # A new epoch; also after a restored one has ended, which LitData would replay.
            self.restore = False
            self._epoch_batches_done = 0
        # LitData's generator reads ``restore`` when it starts, after the lines above.
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            if self._epoch_batches_done >= len(self):
                return
            self._epoch_batches_done += 1
            yield batch


def load_shards(
    shards: str,
    *,
    image_size: int,
    channels: int = 3,
    s3_endpoint: str | None = None,
    max_samples: int | None = None,
) -> StreamingImages:
    """The images of a folder of shards (``s3://`` or local); see :class:`StreamingImages`."""
    return StreamingImages(
        shards, image_size=image_size, channels=channels, s3_endpoint=s3_endpoint, limit=max_samples
    )


__all__: Sequence[str] = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "PATHS",
    "ShardsManifest",
    "StreamingImages",
    "StreamingLoader",
    "decode_canvas",
    "load_shards",
    "read_manifest",
    "read_shards_file",
    "storage_options",
    "summarize_shards",
]
