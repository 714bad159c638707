"""What ``--data`` names, parsed once: the built-in Fashion-MNIST, a folder of images, or shards
(a local folder holding LitData's ``index.json``, or an ``s3://`` URL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

FASHION_MNIST: Final = "fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")
#: The file LitData writes into every folder of shards (``litdata.optimize``); a folder holding
#: it is read as shards, not as images.
SHARDS_INDEX: Final = "index.json"
#: URLs of shards in S3 or an S3-compatible store.
S3_SCHEME: Final = "s3://"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    ``"fashion-mnist"``, ``"fashion-mnist:train"`` and ``"fashion-mnist:test"`` (any case)
    name the built-in dataset; ``s3://bucket/prefix`` and a folder holding LitData's
    ``index.json`` name shards written by ``barlowtwins shards``; anything else is the path of
    an image folder, so a folder called ``fashion-mnist-png/`` is a folder (write
    ``./fashion-mnist`` for a folder of that exact name).

    Attributes:
        kind: ``"fashion-mnist"``, ``"folder"`` or ``"shards"``.
        split: Fashion-MNIST's split; None otherwise.
        path: The image folder; None otherwise.
        shards: The shards' folder or ``s3://`` URL; None otherwise.
    """

    kind: Literal["fashion-mnist", "folder", "shards"]
    split: str | None = None
    path: Path | None = None
    shards: str | None = None

    @classmethod
    def parse(cls, text: str | DataSpec) -> DataSpec:
        """Parse ``text`` (a spec passes through unchanged).

        Raises:
            ValueError: For an empty spec or an unknown Fashion-MNIST split.
        """
        if isinstance(text, DataSpec):
            return text
        stripped = text.strip()
        if not stripped:
            raise ValueError("the data spec is empty; give fashion-mnist or an image folder")
        if stripped.startswith(S3_SCHEME) or (Path(stripped) / SHARDS_INDEX).is_file():
            return cls("shards", shards=stripped)
        name, colon, split = stripped.partition(":")
        if name.lower() != FASHION_MNIST:
            return cls("folder", path=Path(stripped))
        split = split.lower() if colon else "train"
        if split not in FASHION_MNIST_SPLITS:
            raise ValueError(
                f"unknown Fashion-MNIST split {split!r} in {text!r}; use "
                + " or ".join(f"{FASHION_MNIST}:{s}" for s in FASHION_MNIST_SPLITS)
            )
        return cls("fashion-mnist", split=split)

    @property
    def is_fashion_mnist(self) -> bool:
        """Whether this names the built-in Fashion-MNIST."""
        return self.kind == FASHION_MNIST

    @property
    def is_shards(self) -> bool:
        """Whether this names shards (a local folder or an ``s3://`` URL)."""
        return self.kind == "shards"

    @property
    def test_split(self) -> DataSpec | None:
        """The labelled data that scores a run on this data by default (None for folders)."""
        return DataSpec(FASHION_MNIST, split="test") if self.is_fashion_mnist else None

    def __str__(self) -> str:
        if self.shards is not None:
            return self.shards
        return f"{FASHION_MNIST}:{self.split}" if self.is_fashion_mnist else str(self.path)


@dataclass(frozen=True)
class DataSummary:
    """What a recipe adapts to: how many images there are and how large they are.

    Attributes:
        count: Number of image files.
        median_side: Median shorter side, in pixels, of a sample of them.
    """

    count: int
    median_side: int
