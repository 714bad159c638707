"""``barlowtwins shards``: an image folder written as LitData shards (``barlowtwins.app.shards``):
what each stored image is, the seeded order, bad files, and reruns."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from litdata import StreamingDataset
from PIL import Image

from barlowtwins.app.cli import main
from barlowtwins.data.streaming import MANIFEST, StreamingImages
from conftest import ImageFolderFactory

_ORIENTATION = 0x0112  # EXIF tag
_ROTATED_QUARTER_TURN = 6  # "rotate 90 degrees clockwise to display"


def _write(folder: Path, output: Path, *options: str) -> Path:
    arguments = ["shards", str(folder), str(output), "--workers", "2", "--chunk-bytes", "4KB"]
    assert main([*arguments, *options]) == 0
    return output


def _stored(shards: Path) -> dict[str, Image.Image]:
    """Every stored JPEG, by its source path, read with LitData itself."""
    dataset = StreamingDataset(str(shards))
    paths = StreamingImages(str(shards), image_size=8).paths
    images = {}
    for index in range(len(paths)):
        item = dataset[index]
        images[paths[index]] = Image.open(io.BytesIO(bytes(item["image"])))
    return images


def test_images_are_stored_whole_at_the_shorter_side_with_their_source_size(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (100, 60), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (20, 24), (30, 200, 30)).save(folder / "small.png")
    Image.new("L", (50, 80), 128).save(folder / "grey.png")
    exif = Image.Exif()
    exif[_ORIENTATION] = _ROTATED_QUARTER_TURN
    Image.new("RGB", (90, 40), (30, 30, 200)).save(folder / "turned.jpg", exif=exif)
    shards = _write(folder, tmp_path / "shards", "--side", "32")
    stored = _stored(shards)
    assert {name: image.size for name, image in stored.items()} == {
        "wide.png": (53, 32),  # aspect kept
        "small.png": (20, 24),  # never enlarged
        "grey.png": (32, 51),
        "turned.jpg": (32, 72),  # displayed upright
    }
    assert stored["grey.png"].mode == "L" and stored["wide.png"].mode == "RGB"
    data = StreamingImages(str(shards), image_size=16)
    sizes = {data.paths[i]: data[i][3].tolist() for i in range(len(data))}
    assert sizes == {
        "wide.png": [60, 100],
        "small.png": [24, 20],
        "grey.png": [80, 50],
        "turned.jpg": [90, 40],  # the upright source's height and width
    }
    assert data.labels is None and data.classes is None  # no class subfolders


def test_the_order_is_a_seeded_shuffle(tmp_path: Path, image_folder: ImageFolderFactory) -> None:
    folder = image_folder("labelled", count=12, classes=3)
    paths = [
        StreamingImages(str(_write(folder, tmp_path / name, "--seed", seed)), image_size=8).paths
        for name, seed in (("a", "0"), ("b", "0"), ("c", "1"))
    ]
    assert paths[0] == paths[1] != paths[2]
    assert sorted(paths[0]) == sorted(paths[2]) != paths[0]
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["labels"] == [int(path.split("/")[0][1:]) for path in paths[0]]
    assert manifest["classes"] == ["c0", "c1", "c2"]


def test_a_finished_output_is_left_as_it_is(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    folder = image_folder("images", count=6)
    shards = _write(folder, tmp_path / "shards")
    before = {path.name: path.stat().st_mtime_ns for path in shards.iterdir()}
    _write(folder, shards, "--seed", "5")
    assert {path.name: path.stat().st_mtime_ns for path in shards.iterdir()} == before


def test_a_rerun_after_an_interruption_starts_again(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    folder = image_folder("images", count=12)
    # What a killed run leaves: a partial folder with a shard and no index.
    partial = tmp_path / ".shards.partial"
    partial.mkdir()
    (partial / "chunk-0-0.bin").write_bytes(b"half a shard")
    output = _write(folder, tmp_path / "shards")
    assert not partial.exists()
    assert len(StreamingImages(str(output), image_size=8)) == 12


def test_an_output_that_holds_something_else_is_refused(
    tmp_path: Path, image_folder: ImageFolderFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = image_folder("images", count=4)
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main(["shards", str(folder), str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds no finished shards" in error
    assert (output / "notes.txt").read_text() == "mine"


def test_files_that_cannot_be_decoded_are_left_out_and_listed(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    folder = image_folder("images", count=20, classes=2)
    (folder / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (folder / "c1" / "empty.png").write_bytes(b"")
    data = StreamingImages(str(_write(folder, tmp_path / "shards")), image_size=8)
    assert len(data) == 20 and data.num_skipped == 2
    assert {path for path, _ in data.manifest.unusable} == {"c0/broken.jpg", "c1/empty.png"}
    assert "broken.jpg" not in " ".join(data.paths)
    # Indices stay 0..N-1 in the shards' order, when training too.
    seen = [i for batch in data.loader(4, seed=0) for i in batch[2].tolist()]
    assert sorted(seen) == list(range(20))
    assert [data[i][2] for i in range(20)] == list(range(20))
