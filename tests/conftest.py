"""Fixtures shared by the test modules: small real image folders written with PIL."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from barlowtwins.data.index import INDEX_CACHE_ENV

ImageFolderFactory = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    """Keep the folder indexes the tests write out of the user's cache: set before any test
    module loads, so the commands the tests start inherit it too."""
    os.environ[INDEX_CACHE_ENV] = tempfile.mkdtemp(prefix="barlowtwins-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop(INDEX_CACHE_ENV, ""), ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> ImageFolderFactory:
    """Write a folder of distinct RGB images: ``image_folder(name, count, size, classes)``.

    With ``classes > 0`` the images go to subfolders ``c0``, ``c1``, ... (ImageFolder
    labels); otherwise the folder is flat (unlabelled).
    """

    def write(
        name: str = "images",
        count: int = 12,
        size: tuple[int, int] = (40, 40),
        classes: int = 0,
        suffix: str = ".png",
    ) -> Path:
        root = tmp_path / name
        for i in range(count):
            folder = root / f"c{i % classes}" if classes else root
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (i * 23 % 256, 120, 200 - i % 100)).save(folder / f"{i}{suffix}")
        return root

    return write
