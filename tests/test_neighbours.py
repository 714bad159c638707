"""What an encoder learned, as pictures: nearest neighbours and near-duplicates, from the library
to `barlowtwins neighbours` on a folder with planted duplicates."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from barlowtwins.app.cli import main
from barlowtwins.backbones import build_backbone
from barlowtwins.data import load_fashion_mnist
from barlowtwins.encoder import EncoderInfo
from barlowtwins.evaluation.neighbours import near_duplicates, nearest_neighbours, thumbnail
from barlowtwins.evaluation.plots import plot_duplicate_pairs, plot_neighbour_grid
from barlowtwins.runs.files import save_encoder
from barlowtwins.runs.folder import RunFolder


def _features(count: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def test_nearest_neighbours_are_the_most_similar_others() -> None:
    features = _features(300)
    queries = torch.tensor([0, 17, 299])
    found = nearest_neighbours(features, queries, k=5)
    unit = F.normalize(features, dim=1)
    similarity = unit[queries] @ unit.T
    similarity[torch.arange(3), queries] = -2.0
    expected, indices = similarity.topk(5, dim=1)
    assert torch.equal(found.indices, indices)
    torch.testing.assert_close(found.similarities, expected)
    assert not (found.indices == queries[:, None]).any()


def test_near_duplicates_finds_every_pair_above_the_threshold_once() -> None:
    features = _features(400)
    # Plant three copies of image 3 (one slightly off) and one copy of image 10.
    features[50] = features[3]
    features[51] = features[3] * 2.0  # the same direction: cosine 1
    features[52] = features[3] + 0.01
    features[60] = features[10]
    pairs = near_duplicates(features, threshold=0.99)
    unit = F.normalize(features, dim=1)
    similarity = (unit @ unit.T).triu(diagonal=1)
    expected = {(int(a), int(b)) for a, b in torch.nonzero(similarity >= 0.99)}
    found = set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))
    assert found == expected and pairs.total == len(expected) == 7
    assert torch.all(pairs.similarities[:-1] >= pairs.similarities[1:])  # most similar first
    # Image 3 and its copies form one group, 10 and 60 another.
    pair_list = list(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))
    group = dict(zip(pair_list, pairs.groups.tolist(), strict=True))
    assert group[(3, 50)] == group[(51, 52)] != group[(10, 60)]
    assert pairs.groups.max() == 1
    capped = near_duplicates(features, threshold=0.99, max_pairs=2)
    assert capped.total == 7 and len(capped.first) == 2
    torch.testing.assert_close(capped.similarities, pairs.similarities[:2])


@pytest.mark.parametrize(("threshold", "k"), [(1.5, None), (-1.0, None), (None, 0), (None, 300)])
def test_bad_arguments_are_refused(threshold: float | None, k: int | None) -> None:
    features = _features(300)
    with pytest.raises(ValueError):
        if threshold is not None:
            near_duplicates(features, threshold=threshold)
        else:
            nearest_neighbours(features, torch.tensor([0]), k=int(k or 0))


def test_thumbnails_keep_the_aspect_ratio_of_the_source() -> None:
    canvas = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert thumbnail(canvas, torch.tensor([300, 600])).shape == (32, 64, 3)
    assert thumbnail(canvas, (600, 300)).shape == (64, 32, 3)
    assert np.array_equal(thumbnail(canvas), canvas.permute(1, 2, 0).numpy())
    assert thumbnail(canvas[:1], (10, 10)).shape == (64, 64)  # greyscale: 2-D


def test_the_pictures_are_pngs(tmp_path: Path) -> None:
    wide, tall = np.zeros((16, 32), np.uint8), np.full((32, 16, 3), 200, np.uint8)
    grid = plot_neighbour_grid(
        [wide, tall],
        [[tall, wide, wide], [wide, wide, tall]],
        np.array([[0.9, 0.8, 0.7], [0.95, 0.9, 0.5]]),
        tmp_path / "grid.png",
        captions=[["a", "b", "c", "d"]] * 2,
        same_class=np.array([[True, False, True], [False, False, True]]),
    )
    pairs = plot_duplicate_pairs(
        [(wide, wide), (tall, tall)], [1.0, 0.99], tmp_path / "pairs.png", captions=[("x", "y")] * 2
    )
    none = plot_duplicate_pairs([], [], tmp_path / "none.png", title="No pair")
    for path in (grid, pairs, none):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a 1-channel ResNet-10 for 28 px images."""
    folder = tmp_path_factory.mktemp("run")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone, _ = build_backbone("resnet10", in_channels=1)
    info = EncoderInfo("resnet10", 1, False, 28, (0.286,), (0.353,))
    save_encoder(backbone, info, RunFolder(folder))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unlabelled folder of 30 Fashion-MNIST images of several sizes and aspect ratios, and
    planted duplicates: two byte-identical copies of image 4 and one of image 9 under other
    names."""
    folder = tmp_path_factory.mktemp("planted")
    for index, (image, _, _, _) in enumerate(load_fashion_mnist("test").head(30)):
        picture = Image.fromarray(image[0].numpy()).resize((28 + index, 28 + 2 * (index % 3)))
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        (folder / f"item{index:02d}.png").write_bytes(buffer.getvalue())
        copies = {4: ["copy-a.png", "copy-b.png"], 9: ["zz-copy.png"]}.get(index, [])
        for name in copies:
            (folder / name).write_bytes(buffer.getvalue())
    return folder


def test_neighbours_lists_the_planted_duplicates_and_draws_the_grid(
    run: Path, planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    args = ["neighbours", str(run), "--data", str(planted), "--output", str(output)]
    assert main([*args, "--queries", "4", "--k", "5", "--accelerator", "cpu"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    with open(output / "duplicates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    top = {frozenset(Path(row[key]).name for key in ("path_a", "path_b")) for row in rows[:4]}
    planted_pairs = [
        {"item04.png", "copy-a.png"},
        {"item04.png", "copy-b.png"},
        {"copy-a.png", "copy-b.png"},
        {"item09.png", "zz-copy.png"},
    ]
    assert top == {frozenset(pair) for pair in planted_pairs}  # the identical files come first
    assert all(float(row["similarity"]) > 0.9999 for row in rows[:4])
    groups = {
        frozenset(Path(row[k]).name for k in ("path_a", "path_b")): row["group"] for row in rows
    }
    assert groups[frozenset(planted_pairs[0])] == groups[frozenset(planted_pairs[2])]
    assert groups[frozenset(planted_pairs[0])] != groups[frozenset(planted_pairs[3])]
    summary = json.loads((output / "neighbours.json").read_text())
    assert summary["images"] == 33 and summary["pairs"] == len(rows) >= 4
    assert summary["same_class"] is None  # no labels
    for name in ("neighbours.png", "duplicates.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG"
    # The queries are drawn with the seed: the same again, others with another seed.
    again = tmp_path / "again"
    assert main([*args[:4], "--output", str(again), "--queries", "4", "--k", "5"]) == 0
    assert json.loads((again / "neighbours.json").read_text())["queries"] == summary["queries"]
    other = tmp_path / "other"
    assert (
        main([*args[:4], "--output", str(other), "--queries", "4", "--k", "5", "--seed", "1"]) == 0
    )
    assert json.loads((other / "neighbours.json").read_text())["queries"] != summary["queries"]


def test_neighbours_writes_into_the_run_by_default_and_measures_labelled_data(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["neighbours", str(run), "--data", "fashion-mnist:test", "--max-samples", "300"]
    assert main(args) == 0
    assert "share their query's class" in capsys.readouterr().out
    summary = json.loads((RunFolder(run).neighbours / "neighbours.json").read_text())
    assert summary["agreement_queries"] == 300 and 0.0 <= summary["same_class"] <= 100.0


def test_too_few_images_is_a_one_line_error(
    run: Path, planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["neighbours", str(run), "--data", str(planted), "--output", str(tmp_path / "o")]
    assert main([*args, "--k", "40"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("barlowtwins: error: 33 images cannot show 40 neighbours")
    assert len(err.splitlines()) == 1
