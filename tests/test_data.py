"""Tests for barlowtwins.data: Fashion-MNIST idx files and image folders with bad files."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from barlowtwins.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_SYSTEM_DIR,
    INDEX_CACHE_ENV,
    DataError,
    ImageDataset,
    InMemoryImages,
    LazyImageFolder,
    dataset_stats,
    folder_index,
    load_data,
    load_fashion_mnist,
    load_image_folder,
)
from barlowtwins.views import prepare_images

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder indexes go to the test's own cache directory, not the user's."""
    monkeypatch.setenv(INDEX_CACHE_ENV, str(tmp_path / ".index-cache"))


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: realistic compressed size, so truncation cuts real image data."""
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array)


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _truncated(image: Image.Image, path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``side x side`` pixels (far above PIL's limit)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _single(tmp_path: Path, write: Callable[[Path], object], **kwargs: object) -> torch.Tensor:
    """Writes one image into a fresh folder, loads it, returns its (C, S, S) tensor."""
    folder = tmp_path / "one"
    folder.mkdir()
    write(folder)
    kwargs.setdefault("image_size", 16)
    dataset = load_image_folder(folder, **kwargs)
    assert len(dataset) == 1
    assert dataset.num_skipped == 0
    return dataset[0][0]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_train() -> InMemoryImages:
    return load_fashion_mnist("train")


@needs_fashion_mnist
def test_fashion_mnist_both_splits(fashion_train: InMemoryImages) -> None:
    test = load_fashion_mnist("test")
    for dataset, n in ((fashion_train, 60000), (test, 10000)):
        assert dataset.images.shape == (n, 1, 28, 28)
        assert dataset.images.dtype == torch.uint8
        assert dataset.images.is_contiguous()
        assert dataset.labels is not None and dataset.labels.dtype == torch.int64
        assert dataset.labels.shape == (n,)
        assert set(dataset.labels.unique().tolist()) == set(range(10))
        assert dataset.classes == list(FASHION_MNIST_CLASSES)
        assert dataset.channels == 1 and dataset.image_size == 28
        assert dataset.num_skipped == 0
    image, label, index, size = test[3]
    assert image.shape == (1, 28, 28) and label == int(test.labels[3]) and index == 3
    assert size.tolist() == [28, 28]  # a square source is its own canvas
    # Not a blank decode: Fashion-MNIST's mean pixel is about 0.286.
    assert 0.25 < fashion_train.images[:1000].float().mean().item() / 255 < 0.32


@needs_fashion_mnist
def test_load_data_max_samples_is_deterministic_and_balanced(
    fashion_train: InMemoryImages,
) -> None:
    first = load_data("FASHION-MNIST:Train", max_samples=500)
    second = load_data("fashion-mnist", max_samples=500)
    assert isinstance(first, InMemoryImages) and isinstance(second, InMemoryImages)
    assert len(first) == 500
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    counts = torch.bincount(first.labels, minlength=10)
    assert counts.min() >= 25  # a random subset: every class present, roughly 50 each
    # Every chosen sample really is a training sample with its own label.
    flat = fashion_train.images.reshape(60000, -1)
    for k in (0, 250, 499):
        matches = (flat == first.images[k].reshape(1, -1)).all(dim=1).nonzero().flatten()
        assert first.labels[k] in fashion_train.labels[matches]


@needs_fashion_mnist
def test_load_data_resizes_and_repeats_grey(fashion_train: InMemoryImages) -> None:
    native = load_data("fashion-mnist:test", max_samples=64)
    assert native.images.shape == (64, 1, 28, 28)
    big = load_data("fashion-mnist:test", image_size=32, channels=3, max_samples=64)
    assert big.images.shape == (64, 3, 32, 32) and big.images.dtype == torch.uint8
    assert torch.equal(big.images[:, 0], big.images[:, 2])
    assert torch.equal(big.labels, native.labels)
    # Resizing keeps the overall brightness.
    assert abs(big.images.float().mean() - native.images.float().mean()) < 2.0
    same = load_data("fashion-mnist:test", image_size=28, channels=1, max_samples=64)
    assert torch.equal(same.images, native.images)


def test_fashion_mnist_copy_via_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    labels = np.arange(300) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    # The test split uncompressed, as torchvision also leaves it.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:40])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:40])
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))

    train = load_fashion_mnist()
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert train.labels.tolist() == labels.tolist()
    test = load_data("fashion-mnist:test")
    assert len(test) == 40 and torch.equal(test.images[:, 0], torch.from_numpy(images[:40]))


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), dtype=np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    assert len(load_fashion_mnist("test", root=tmp_path)) == 5


def test_fashion_mnist_missing_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist(root=tmp_path)
    message = str(info.value)
    assert message.startswith(f"Fashion-MNIST not found in {tmp_path}")
    assert "`apt-get install dataset-fashion-mnist`" in message
    assert FASHION_MNIST_ENV in message and "--download" in message
    assert "\n" not in message
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        load_data("fashion-mnist:test")


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12)), "magic"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
        (
            lambda p: p.write_bytes(
                gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", 5, 28, 28) + b"\x01")
            ),
            "corrupt",
        ),
    ],
    ids=["bad-magic", "not-gzip", "short"],
)
def test_fashion_mnist_corrupt_files(
    tmp_path: Path, corrupt: Callable[[Path], object], match: str
) -> None:
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    corrupt(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=match):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load_fashion_mnist("test", root=tmp_path)


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown Fashion-MNIST split 'xyz'"):
        load_data("fashion-mnist:xyz")
    with pytest.raises(DataError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("validation")


# --------------------------------------------------------------------------- folder layout


def test_class_subfolders_give_labels(tmp_path: Path) -> None:
    for name, count in (("dog", 2), ("cat", 3), ("emu", 1)):
        for k in range(count):
            _save(_noise(20, 12, seed=k), tmp_path / name / f"{k}.png")
    _save(_noise(9, 9), tmp_path / "cat" / "nested" / "deep.jpg")
    dataset = load_image_folder(tmp_path, image_size=8, workers=2)
    assert isinstance(dataset, InMemoryImages)
    assert dataset.classes == ["cat", "dog", "emu"]
    assert dataset.labels.tolist() == [0, 0, 0, 0, 1, 1, 2]
    rel = [os.path.relpath(p, tmp_path) for p in dataset.paths]
    assert rel == sorted(rel, key=lambda p: p.split(os.sep))
    assert rel[3] == os.path.join("cat", "nested", "deep.jpg")
    assert dataset[6][1:3] == (2, 6)
    assert dataset.images.shape == (7, 3, 8, 8) and dataset.images.is_contiguous()


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    for k in range(3):
        _save(_noise(10, 10, seed=k), tmp_path / f"img{k}.PNG")  # extension case ignored
    dataset = load_image_folder(tmp_path, image_size=8, channels=1)
    assert dataset.labels is None and dataset.classes is None
    assert dataset.images.shape == (3, 1, 8, 8)
    assert [dataset[k][1] for k in range(3)] == [-1, -1, -1]


def test_mixed_folder_is_unlabeled_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(_noise(10, 10), tmp_path / "loose.png")
    _save(_noise(10, 10), tmp_path / "cls" / "a.png")
    with caplog.at_level(logging.WARNING, logger="barlowtwins.data"):
        dataset = load_image_folder(tmp_path, image_size=8)
    assert dataset.labels is None and len(dataset) == 2
    assert "treating all 2 as unlabeled" in caplog.text


def test_decoding_is_deterministic_across_thread_counts(tmp_path: Path) -> None:
    for k in range(12):
        _save(_noise(30 + k, 17, seed=k), tmp_path / f"{k:02d}.jpg", quality=90)
    one = load_image_folder(tmp_path, image_size=12, workers=1)
    many = load_image_folder(tmp_path, image_size=12, workers=4)
    assert torch.equal(one.images, many.images) and one.paths == many.paths


def test_folder_max_samples(tmp_path: Path) -> None:
    for k in range(20):
        _save(_noise(6, 6, seed=k), tmp_path / f"{k:02d}.png")
    a = load_data(str(tmp_path), image_size=6, max_samples=7)
    b = load_data(str(tmp_path), image_size=6, max_samples=7)
    assert len(a) == 7 and a.paths == b.paths and a.paths == sorted(a.paths)
    assert a.paths != sorted(str(p) for p in tmp_path.iterdir())[:7]  # a spread, not a prefix


# --------------------------------------------------------------------------- decoding


def test_a_wide_image_is_held_whole_with_its_size(tmp_path: Path) -> None:
    # 60x20: left third red, middle green, right third blue.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :20, 0] = array[:, 20:40, 1] = array[:, 40:, 2] = 255
    _save(Image.fromarray(array), tmp_path / "wide.png")
    dataset = load_image_folder(tmp_path, image_size=15)
    image, _, _, size = dataset[0]
    assert image.shape == (3, 15, 15) and image.dtype == torch.uint8
    assert size.tolist() == [20, 60]
    # Stretched across the canvas: each third is a third of the columns, each colour pure
    # away from the stripes' borders.
    for channel, columns in enumerate((slice(0, 4), slice(6, 9), slice(11, 15))):
        stripe = image[:, :, columns]
        assert stripe[channel].min() >= 250
        assert stripe[[c for c in range(3) if c != channel]].max() <= 5
    # The evaluation view still takes the centred square of the source: the green third.
    view = prepare_images(image[None], (0.0,) * 3, (1.0,) * 3, 15, size[None])[0]
    centre = view[:, :, 5:10]
    assert centre[1].min() >= 0.98 and centre[[0, 2]].max() <= 0.02
    # Only where the resize blends in the stripes' border pixels does red or blue show, faintly.
    assert view[[0, 2]].max() <= 0.15


def test_tiny_image_is_upscaled(tmp_path: Path) -> None:
    image = _single(tmp_path, lambda d: _save(Image.new("RGB", (1, 1), (10, 20, 30)), d / "a.bmp"))
    assert image.shape == (3, 16, 16)
    assert image.reshape(3, -1).float().mean(1).tolist() == [10.0, 20.0, 30.0]


@pytest.mark.parametrize(
    ("level", "expected"), [(65535, 255), (32896, 128), (0, 0)], ids=["max", "mid", "zero"]
)
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path, level: int, expected: int) -> None:
    def write(folder: Path) -> None:
        image = Image.fromarray(np.full((12, 10), level, dtype=np.uint16))
        assert image.mode == "I;16"
        _save(image, folder / "deep.png")

    image = _single(tmp_path, write, channels=1)
    assert image.unique().tolist() == [expected]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # Cyan 0, magenta and yellow full, black 0: red.
    image = _single(
        tmp_path, lambda d: _save(Image.new("CMYK", (12, 12), (0, 255, 255, 0)), d / "c.jpg")
    )
    red, green, blue = image.reshape(3, -1).float().mean(1).tolist()
    assert red > 230 and green < 30 and blue < 30


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        image = Image.new("P", (8, 8), 1)
        image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
        _save(image, folder / "opaque.png")
        image.paste(0, (0, 0, 8, 4))  # top half index 0, declared transparent below
        _save(image, folder / "holes.png", transparency=0)

    write(tmp_path)
    dataset = load_image_folder(tmp_path, image_size=8)
    holes, opaque = dataset.images  # sorted by name
    assert opaque[1].min() == 200 and opaque[0].max() == 0
    assert holes[:, :3].min() == 255  # transparent top rows composited on white
    assert holes[:, 5:].tolist() == opaque[:, 5:].tolist()


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        array = np.zeros((8, 8, 4), dtype=np.uint8)
        array[4:] = (255, 0, 0, 128)  # bottom half: half-transparent red
        _save(Image.fromarray(array, "RGBA"), folder / "alpha.png")

    image = _single(tmp_path, write, image_size=8)
    assert image[:, :3].min() == 255  # fully transparent black -> white
    assert image[:, 6:].reshape(3, -1)[:, 0].tolist() == [255, 127, 127]


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        red, blue = Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), "blue")
        red.save(folder / "anim.gif", save_all=True, append_images=[blue], duration=50, loop=0)
        assert Image.open(folder / "anim.gif").n_frames == 2

    image = _single(tmp_path, write)
    red, green, blue = image.reshape(3, -1).float().mean(1).tolist()
    assert red > 240 and green < 15 and blue < 15


def test_exif_orientation_is_applied_before_resize(tmp_path: Path) -> None:
    # Stored 40x20, left half black; orientation 6 shows it rotated 90 degrees clockwise, so
    # the displayed image is 20x40 with the black half on top.
    array = np.full((20, 40), 255, dtype=np.uint8)
    array[:, :20] = 0

    def write(folder: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6
        _save(Image.fromarray(array), folder / "rotated.jpg", exif=exif, quality=95)

    image = _single(tmp_path, write, channels=1)[0].float()
    assert image[0].mean() < 40 and image[-1].mean() > 215  # rows differ: rotated
    assert abs(image[:, 0].mean() - image[:, -1].mean()) < 10  # columns alike


def test_one_bit_and_grey_to_rgb(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        _save(Image.new("1", (9, 9), 1), folder / "bits.png")
        _save(Image.new("L", (9, 9), 77), folder / "grey.tif")

    write(tmp_path)
    dataset = load_image_folder(tmp_path, image_size=4)
    assert dataset.images[0].unique().tolist() == [255]
    assert dataset.images[1].unique().tolist() == [77]


def test_rgb_to_greyscale(tmp_path: Path) -> None:
    image = _single(
        tmp_path,
        lambda d: _save(Image.new("RGB", (5, 5), (0, 255, 0)), d / "g.webp", lossless=True),
        channels=1,
    )
    assert image.shape == (1, 16, 16)
    assert image.unique().tolist() == [150]  # ITU-R 601-2 luma: 0.587 * 255


# --------------------------------------------------------------------------- bad files


# Rejected by the listing, from their names and types alone; the others are found when decoded.
_REJECTED_BY_NAME = {"latin1-\\udce9t\\udce9.png", "dangling.jpg", "pipe.png"}


def _write_bad_files(folder: Path) -> set[str]:
    """Writes every kind of unusable file; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    _truncated(_noise(64, 64), folder / "cut.jpg", "JPEG")
    _truncated(_noise(64, 64), folder / "cut.png", "PNG")
    (folder / "text.jpg").write_text("this is not an image\n")
    _bomb_png(folder / "bomb.png")
    with open(os.path.join(os.fsencode(folder), b"latin1-\xe9t\xe9.png"), "wb") as f:
        _noise(8, 8).save(f, "PNG")
    os.symlink(folder / "does-not-exist.png", folder / "dangling.jpg")
    os.mkfifo(folder / "pipe.png")  # opening it would block forever
    return {
        "empty.jpg",
        "cut.jpg",
        "cut.png",
        "text.jpg",
        "bomb.png",
        "latin1-\\udce9t\\udce9.png",
        "dangling.jpg",
        "pipe.png",
    }


def _write_good_and_ignored(folder: Path) -> set[str]:
    """Writes decodable images plus files that are ignored (not counted); returns good names."""
    _save(_noise(30, 20), folder / "good.png")
    _save(_noise(20, 30), folder / "good.jpeg")
    _save(Image.new("RGB", (1, 1), "white"), folder / "tiny.gif")
    long_name = "n" * 196 + ".png"
    _save(_noise(8, 8), folder / long_name)
    _save(_noise(8, 8), folder / ".hidden.png")
    _save(_noise(8, 8), folder / ".git" / "object.png")
    (folder / "notes.txt").write_text("ignored")
    return {"good.png", "good.jpeg", "tiny.gif", long_name}


def test_the_listing_reads_names_only(tmp_path: Path) -> None:
    bad = _write_bad_files(tmp_path / "mixed")
    good = _write_good_and_ignored(tmp_path / "mixed")
    index = folder_index(tmp_path / "mixed")
    assert set(index.files) == good | (bad - _REJECTED_BY_NAME)
    assert {name for name, _ in index.skipped} == _REJECTED_BY_NAME


def test_bad_files_are_counted_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mixed"
    bad = _write_bad_files(folder)
    good = _write_good_and_ignored(folder)
    with caplog.at_level(logging.WARNING, logger="barlowtwins.data"):
        dataset = load_image_folder(folder, image_size=8, workers=3)
    assert isinstance(dataset, InMemoryImages)
    assert {Path(p).name for p in dataset.paths} == good
    assert len(dataset) == len(good) == dataset.images.shape[0]
    assert dataset.num_skipped == len(bad) == len(dataset.skipped)
    assert {Path(p).name for p, _ in dataset.skipped} == bad
    reasons = dict((Path(p).name, r) for p, r in dataset.skipped)
    assert "decompression bomb" in reasons["bomb.png"]
    assert "truncated" in reasons["cut.jpg"] and "truncated" in reasons["cut.png"]
    assert reasons["empty.jpg"] == "empty file"
    assert "UTF-8" in reasons["latin1-\\udce9t\\udce9.png"]
    assert "not a regular file" in reasons["pipe.png"]
    assert f"skipped {len(bad)} unusable files" in caplog.text
    assert f"and {len(bad) - 5} more" in caplog.text
    # The surviving rows are the right images, compacted in scan order.
    clean = tmp_path / "clean"
    _write_good_and_ignored(clean)
    assert torch.equal(dataset.images, load_image_folder(clean, image_size=8).images)


def test_lowered_pixel_limit_skips_without_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40x40 = 1600 pixels: above the limit but below PIL's own error threshold (2x limit).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _save(_noise(40, 40), tmp_path / "big.png")
    _save(_noise(100, 100), tmp_path / "huge.png")
    _save(_noise(20, 20), tmp_path / "small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        dataset = load_image_folder(tmp_path, image_size=8)
    assert [Path(p).name for p in dataset.paths] == ["small.png"]
    assert sorted(Path(p).name for p, _ in dataset.skipped) == ["big.png", "huge.png"]


def test_symlinked_folders_followed_once_and_loops_end(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    _save(_noise(8, 8), root / "a" / "x.png")
    _save(_noise(8, 8), outside / "y.png")
    os.symlink(root, root / "a" / "loop")  # loop back to the root
    os.symlink(outside, root / "b")
    os.symlink(outside, root / "c")  # the same folder again
    dataset = load_image_folder(root, image_size=8)
    assert [os.path.relpath(p, root) for p in dataset.paths] == [
        os.path.join("a", "x.png"),
        os.path.join("b", "y.png"),
    ]
    assert dataset.classes == ["a", "b"] and dataset.num_skipped == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; see dangling link")
def test_permission_denied_is_skipped(tmp_path: Path) -> None:
    _save(_noise(8, 8), tmp_path / "ok.png")
    locked = _save(_noise(8, 8), tmp_path / "locked.png")
    locked.chmod(0)
    dataset = load_image_folder(tmp_path, image_size=8)
    assert len(dataset) == 1 and dataset.skipped[0][1] == "permission denied"


def test_only_bad_files_raise(tmp_path: Path) -> None:
    _write_bad_files(tmp_path)
    with pytest.raises(DataError, match=r"no usable images in .* \(8 files skipped: .*bomb"):
        load_image_folder(tmp_path, image_size=8)


def test_empty_folder_and_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no usable images in .* \(0 files skipped: no files"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing"), image_size=8)
    file = _save(_noise(4, 4), tmp_path / "file.png")
    with pytest.raises(DataError, match="is a file"):
        load_image_folder(file, image_size=8)
    with pytest.raises(DataError, match="image size is required"):
        load_data(str(tmp_path))
    with pytest.raises(DataError, match="channels must be 1"):
        load_image_folder(tmp_path, image_size=8, channels=4)
    with pytest.raises(DataError, match="image_size must be a positive"):
        load_image_folder(tmp_path, image_size=0)


# --------------------------------------------------------------------------- lazy folders


def test_lazy_folder_skips_broken_files_at_decode_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    bad = _write_bad_files(folder)
    good = _write_good_and_ignored(folder)
    dataset = load_image_folder(folder, image_size=8, cache_limit_bytes=0)
    assert isinstance(dataset, LazyImageFolder)
    # The listing rejects names and types; the other five bad files fail when decoded.
    assert len(dataset) == len(good) + len(bad) - len(_REJECTED_BY_NAME)
    assert dataset.num_skipped == len(_REJECTED_BY_NAME)
    eager = load_image_folder(folder, image_size=8)
    with caplog.at_level(logging.WARNING, logger="barlowtwins.data"):
        for _ in range(2):  # the second pass must not warn again
            for k in range(len(dataset)):
                image, label, index, _ = dataset[k]
                assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == -1
                assert torch.equal(image, eager.images[eager.paths.index(dataset.paths[index])])
    assert dataset.num_skipped == len(bad)
    # The first five are logged, the fifth saying that further ones are only counted.
    assert caplog.text.count("skipping unreadable image") == 5
    assert caplog.text.count("further ones are counted, not logged") == 1


def test_a_lazy_folder_without_any_image_fails_when_loaded(tmp_path: Path) -> None:
    _write_bad_files(tmp_path / "bad")
    with pytest.raises(DataError, match=r"no usable images in .* \(8 files skipped: "):
        load_image_folder(tmp_path / "bad", image_size=8, cache_limit_bytes=0)
    # Beyond the files tried at load, the error says what it looked at.
    for k in range(300):
        (tmp_path / "text" / f"{k:03d}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "text" / f"{k:03d}.png").write_text("not an image")
    with pytest.raises(DataError, match=r"none of 150 of its 300 files, spread over the folder"):
        load_image_folder(tmp_path / "text", image_size=8, cache_limit_bytes=0)


def test_lazy_folder_skip_count_shared_with_loader_workers(tmp_path: Path) -> None:
    for k in range(4):
        _save(_noise(10, 10, seed=k), tmp_path / "cls" / f"{k}.png")
    _truncated(_noise(64, 64), tmp_path / "cls" / "2-cut.jpg", "JPEG")
    dataset = load_image_folder(tmp_path, image_size=8, channels=1, cache_limit_bytes=0)
    assert isinstance(dataset, LazyImageFolder) and dataset.num_skipped == 0
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    images, labels, indices, _ = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert images.shape == (5, 1, 8, 8) and labels.tolist() == [0] * 5
    # "2-cut.jpg" sorts at index 2 and is replaced by the next sample whenever it is asked for.
    assert sorted(indices.tolist()) == [0, 1, 3, 3, 4]
    assert dataset.num_skipped == 1


# --------------------------------------------------------------------------- datasets, stats


def test_in_memory_subset_head_and_validation() -> None:
    images = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1).expand(5, 1, 2, 2).clone()
    dataset = InMemoryImages(images, torch.tensor([4, 3, 2, 1, 0]), classes=list("abcde"))
    assert isinstance(dataset, ImageDataset)
    assert dataset[-1][1:3] == (0, 4)
    picked = dataset.subset([3, 1])
    assert picked.images[:, 0, 0, 0].tolist() == [3, 1] and picked.labels.tolist() == [1, 3]
    assert picked.classes == list("abcde")
    head = dataset.head(2)
    assert len(head) == 2 and head.images.data_ptr() == dataset.images.data_ptr()
    unlabeled = InMemoryImages(images)
    assert unlabeled[2][1] == -1
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(DataError, match="uint8"):
        InMemoryImages(images.float())
    with pytest.raises(DataError, match="square"):
        InMemoryImages(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))
    with pytest.raises(DataError, match="labels"):
        InMemoryImages(images, torch.zeros(4, dtype=torch.int64))


def test_dataset_stats_known_values(tmp_path: Path) -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[2:, 0] = 255  # red: half 0, half 1 -> mean 0.5, std 0.5
    images[:, 1] = 51  # green: constant 0.2
    mean, std = dataset_stats(InMemoryImages(images))
    assert mean == pytest.approx((0.5, 0.2, 0.0)) and std == pytest.approx((0.5, 0.0, 0.0))

    for k in range(3):
        _save(_noise(12, 12, seed=k), tmp_path / f"{k}.png")
    lazy = load_image_folder(tmp_path, image_size=8, cache_limit_bytes=0)
    eager = load_image_folder(tmp_path, image_size=8)
    assert isinstance(lazy, LazyImageFolder)
    (lazy_mean, lazy_std), (eager_mean, eager_std) = dataset_stats(lazy), dataset_stats(eager)
    assert lazy_mean == pytest.approx(eager_mean) and lazy_std == pytest.approx(eager_std)
    assert len(eager_mean) == 3 and 0.4 < eager_mean[0] < 0.6
    with pytest.raises(DataError, match="empty"):
        dataset_stats(InMemoryImages(torch.zeros(0, 1, 2, 2, dtype=torch.uint8)))


@needs_fashion_mnist
def test_dataset_stats_fashion_mnist(fashion_train: InMemoryImages) -> None:
    mean, std = dataset_stats(fashion_train)
    # Published full-train-set values 0.2860 / 0.3530; the 10k-sample estimate is close.
    assert mean[0] == pytest.approx(0.286, abs=0.005)
    assert std[0] == pytest.approx(0.353, abs=0.005)
