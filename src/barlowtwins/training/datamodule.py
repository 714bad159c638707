"""Data loaders for pretraining and for the online kNN monitor."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from barlowtwins.data import ImageDataset
from barlowtwins.data.streaming import StreamingImages, StreamingLoader


def batch_per_device(global_batch: int, world_size: int) -> int:
    """The images each of ``world_size`` processes takes for a global batch of ``global_batch``.

    Raises:
        ValueError: If the processes cannot share the global batch equally.
    """
    if global_batch % world_size:
        raise ValueError(
            f"a global batch of {global_batch} does not split over {world_size} processes; "
            f"give a multiple of {world_size}, or the batch per device"
        )
    return global_batch // world_size


class BarlowTwinsDataModule(L.LightningDataModule):
    """Serves uint8 image batches; augmentation happens later, on the training device.

    ``batch_size`` is the global batch: under DDP each of the W processes loads
    ``batch_size / W`` images a step, and Lightning's ``DistributedSampler`` gives each rank a
    disjoint ``1/W`` of every epoch, so a step trains on ``batch_size`` images whatever W is.
    Shards (:class:`~barlowtwins.data.streaming.StreamingImages`) are iterated by LitData's
    loader instead, which splits each epoch over the ranks itself (an iterable dataset gets no
    sampler from Lightning), shuffles it from ``seed`` and resumes mid-epoch from a checkpoint:
    this data module keeps its position in checkpoints itself. Lightning's own copy, in the fit
    loop's state, is not restored when the optimiser's schedule asked for the run's length
    first (``estimated_stepping_batches`` loads the train dataloader before the checkpoint's
    loops are restored, and the fit loop keeps that loader; Lightning 2.6).

    Args:
        train: Images to pretrain on (labels unused).
        batch_size: Global batch over all processes.
        knn_bank: Labelled images whose features vote in the kNN monitor.
        knn_query: Labelled images classified by the kNN monitor each epoch.
        num_workers: DataLoader worker processes (0 suits in-memory data).
        pin_memory: Pin host memory (for CUDA).
        seed: Seed of the shuffle of shards (each epoch's is drawn from it and the epoch).
    """

    def __init__(
        self,
        train: ImageDataset,
        batch_size: int,
        *,
        knn_bank: ImageDataset | None = None,
        knn_query: ImageDataset | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.knn_bank = knn_bank
        self.knn_query = knn_query
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._streaming_loader: StreamingLoader | None = None
        self._streaming_state: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        world_size = 1 if self.trainer is None else self.trainer.world_size
        self.batch_size_per_device = batch_per_device(self.batch_size, world_size)

    @property
    def has_knn_monitor(self) -> bool:
        """Whether both kNN datasets exist and carry labels."""
        return all(
            data is not None and data.labels is not None for data in (self.knn_bank, self.knn_query)
        )

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train, StreamingImages):
            # Built here, in each rank once the process group exists: LitData reads the world
            # size when it builds its dataset. An epoch ends at the trainer's limit.
            limit = None if self.trainer is None else self.trainer.limit_train_batches
            loader = self.train.loader(
                self.batch_size_per_device,
                seed=self.seed,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                epoch_batches=limit if isinstance(limit, int) else None,
            )
            if self._streaming_state is not None:
                loader.load_state_dict(self._streaming_state)
                self._streaming_state = None
            self._streaming_loader = loader
            return loader
        # drop_last: every step sees a full batch, which batch norm and the loss rely on.
        return self._loader(self.train, shuffle=True, drop_last=True)

    def state_dict(self) -> dict[str, Any]:
        """The streaming loader's position (empty for other data)."""
        loader = self._streaming_loader
        return {} if loader is None else {"streaming_loader": loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's loader position for the loader ``train_dataloader`` makes."""
        self._streaming_state = state_dict.get("streaming_loader")

    def val_dataloader(self) -> list[DataLoader]:
        if not self.has_knn_monitor:
            return []
        assert self.knn_bank is not None and self.knn_query is not None
        return [
            self._loader(data, shuffle=False, drop_last=False)
            for data in (self.knn_bank, self.knn_query)
        ]

    def _loader(self, data: ImageDataset, *, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size_per_device,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
