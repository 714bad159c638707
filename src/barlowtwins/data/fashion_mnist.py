"""Fashion-MNIST: finding its idx files (system package, environment, torchvision layout),
reading and checking them, and the explicitly requested download through torchvision."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from barlowtwins.data.datasets import DataError, InMemoryImages

_log = logging.getLogger(__name__)

FASHION_MNIST_ENV = "BARLOWTWINS_FASHION_MNIST_DIR"
# Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_SIDE = 28
# idx magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> InMemoryImages:
    """Loads a Fashion-MNIST split from its idx files (gzip-compressed or not).

    The files are looked up in ``root``, else in ``$BARLOWTWINS_FASHION_MNIST_DIR``, else in
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``); in each,
    also under ``FashionMNIST/raw`` where torchvision keeps them. The network is used only with
    ``download=True`` and only when no local copy was found.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: Folder holding the idx files; the download target with ``download=True``
            (default ``~/.cache/barlowtwins``).
        download: Download through torchvision if no local copy exists.

    Returns:
        1x28x28 images with labels 0..9 and the 10 Fashion-MNIST class names.

    Raises:
        DataError: If the split is unknown, the files are missing (without ``download``),
            corrupt, or the download fails.
    """
    split = split.lower()
    if split not in _FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    if root is not None:
        base = Path(root).expanduser()
    elif os.environ.get(FASHION_MNIST_ENV):
        base = Path(os.environ[FASHION_MNIST_ENV]).expanduser()
    else:
        base = FASHION_MNIST_SYSTEM_DIR
    candidates = [base, base / "FashionMNIST" / "raw"]
    files = _find_fashion_mnist(candidates, split)
    if files is None and download:
        target = base if root is not None else Path("~/.cache/barlowtwins").expanduser()
        _download_fashion_mnist(target, split)
        files = _find_fashion_mnist([target / "FashionMNIST" / "raw"], split)
    if files is None:
        searched = ", ".join(str(d) for d in candidates)
        raise DataError(
            f"Fashion-MNIST not found in {searched}; install it with "
            f"`apt-get install dataset-fashion-mnist`, set {FASHION_MNIST_ENV}, or pass --download"
        )
    images = _read_idx(files[0], _IDX_IMAGES_MAGIC)
    labels = _read_idx(files[1], _IDX_LABELS_MAGIC)
    if images.shape[1:] != (_FASHION_MNIST_SIDE, _FASHION_MNIST_SIDE):
        raise DataError(f"{files[0]} holds images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{files[1]} has {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{files[1]} holds label {labels.max()}, expected 0..9")
    return InMemoryImages(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels).to(torch.int64),
        FASHION_MNIST_CLASSES,
    )


def _find_fashion_mnist(dirs: Sequence[Path], split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in the first directory holding both."""
    for directory in dirs:
        found = [_first_existing(directory, stem) for stem in _FASHION_MNIST_FILES[split]]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _first_existing(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _download_fashion_mnist(target: Path, split: str) -> None:
    # Imported here: torchvision's dataset module is needed only for this opt-in download.
    from torchvision.datasets import FashionMNIST

    _log.info("downloading Fashion-MNIST into %s", target)
    try:
        FashionMNIST(root=str(target), train=split == "train", download=True)
    # Network, HTTP and checksum failures surface as many exception types.
    except Exception as exc:
        raise DataError(f"downloading Fashion-MNIST into {target} failed: {exc}") from exc


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads an idx file (optionally gzip-compressed) of unsigned bytes, checking its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an idx file (bad magic number), expected magic {magic:#x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path} is corrupt: {len(raw)} bytes for shape {shape}, expected {expected}"
        )
    # bytearray gives a writable buffer, so torch.from_numpy needs no copy and does not warn.
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(shape)
