"""Data loaders for pretraining and for the online kNN monitor."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from barlowtwins.data import ImageDataset


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

    Args:
        train: Images to pretrain on (labels unused).
        batch_size: Global batch over all processes.
        knn_bank: Labelled images whose features vote in the kNN monitor.
        knn_query: Labelled images classified by the kNN monitor each epoch.
        num_workers: DataLoader worker processes (0 suits in-memory data).
        pin_memory: Pin host memory (for CUDA).
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
    ) -> None:
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.batch_size_per_device = batch_size
        self.knn_bank = knn_bank
        self.knn_query = knn_query
        self.num_workers = num_workers
        self.pin_memory = pin_memory

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
        # drop_last: every step sees a full batch, which batch norm and the loss rely on.
        return self._loader(self.train, shuffle=True, drop_last=True)

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
