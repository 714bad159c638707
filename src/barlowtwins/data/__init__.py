"""Data sources: Fashion-MNIST and folders of image files, as fixed-size uint8 images.

A data spec string (``"fashion-mnist:test"``, a folder path) is parsed once into a
:class:`~barlowtwins.data.spec.DataSpec`; :func:`load_data` turns it into a dataset.
"""

from barlowtwins.data.datasets import (
    DataError,
    ImageDataset,
    InMemoryImages,
    Item,
    dataset_stats,
    first_images,
)
from barlowtwins.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_SYSTEM_DIR,
    load_fashion_mnist,
)
from barlowtwins.data.folders import (
    IMAGE_EXTENSIONS,
    LazyImageFolder,
    fits_in_memory,
    load_image_folder,
    summarize_folder,
)
from barlowtwins.data.index import (
    INDEX_CACHE_ENV,
    FolderIndex,
    folder_index,
    index_cache_dir,
    index_file,
)
from barlowtwins.data.sources import load_data
from barlowtwins.data.spec import DataSpec, DataSummary

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "INDEX_CACHE_ENV",
    "DataError",
    "DataSpec",
    "DataSummary",
    "FolderIndex",
    "ImageDataset",
    "InMemoryImages",
    "Item",
    "LazyImageFolder",
    "dataset_stats",
    "first_images",
    "fits_in_memory",
    "folder_index",
    "index_cache_dir",
    "index_file",
    "load_data",
    "load_fashion_mnist",
    "load_image_folder",
    "summarize_folder",
]
