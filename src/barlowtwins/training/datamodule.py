"""Data loaders for pretraining and for the online kNN monitor."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from barlowtwins.data import ImageDataset


class BarlowTwinsDataModule(L.LightningDataModule):
    """Serves uint8 image batches; augmentation happens later, on the training device.

    Under DDP, Lightning wraps these loaders in a ``DistributedSampler``: each rank reads a
    disjoint ``1/W`` of every epoch and the *global* batch is ``batch_size * W``.

    Args:
        train: Images to pretrain on (labels unused).
        batch_size: Batch per device.
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
        self.knn_bank = knn_bank
        self.knn_query = knn_query
        self.num_workers = num_workers
        self.pin_memory = pin_memory

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
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
