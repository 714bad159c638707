"""``barlowtwins neighbours``, and the same pictures at the end of ``fit``: what an encoder
learned from the images alone.

From features computed once (:func:`~barlowtwins.evaluation.probes.extract_features`, on the
accelerator present) it draws a grid of random query images, each followed by its nearest
neighbours in the embedding with their cosine similarities, and lists the near-duplicate pairs
above a similarity threshold as a CSV a user can act on (keep one image per group) and as a
picture (:mod:`barlowtwins.evaluation.neighbours`). Thumbnails are shown at each image's own
aspect ratio. Where the data has labels, each neighbour's caption is green when it shares the
query's class and red when not, and the share of neighbours that do is measured on more
queries than the grid shows.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from barlowtwins.app.inference import resolve_device
from barlowtwins.data import ImageDataset, load_data
from barlowtwins.encoder import EncoderInfo
from barlowtwins.evaluation import extract_features
from barlowtwins.evaluation.neighbours import (
    DuplicatePairs,
    Neighbours,
    near_duplicates,
    nearest_neighbours,
    thumbnail,
)
from barlowtwins.precision import default_precision
from barlowtwins.runs.files import atomic_write
from barlowtwins.runs.loader import load_trained_encoder

_log = logging.getLogger("barlowtwins")

#: The files of a neighbour report, in the folder it is written to (``plots/`` for ``fit``).
GRID_PNG, DUPLICATES_PNG, DUPLICATES_CSV = "neighbours.png", "duplicates.png", "duplicates.csv"
#: The summary ``barlowtwins neighbours`` writes beside them.
SUMMARY_JSON = "neighbours.json"
_CSV_COLUMNS = ("group", "similarity", "index_a", "index_b", "path_a", "path_b")


@dataclass(frozen=True)
class NeighbourSettings:
    """What the pictures show.

    Attributes:
        queries: Query images of the grid (rows).
        k: Neighbours per query (columns after the query).
        threshold: Cosine similarity from which a pair counts as a near-duplicate. On
            Fashion-MNIST with the default run's encoder, a JPEG (quality 75) copy of an image
            scores 0.993 or more for 95 % of images and an identical copy 1.0, while half of
            all images have a distinct nearest neighbour above 0.952 and 1 % above 0.992.
        max_pairs: The most pairs listed in the CSV (the most similar ones).
        shown_pairs: Pairs drawn in the picture.
        agreement_queries: Random queries on which the share of neighbours of the query's
            class is measured (labelled data only).
        pool: The most images searched; a larger dataset is sampled (seeded). ``None``: all.
        seed: Seed of the queries and of the sample.
    """

    queries: int = 8
    k: int = 8
    threshold: float = 0.99
    max_pairs: int = 10_000
    shown_pairs: int = 24
    agreement_queries: int = 1000
    pool: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """One-line errors for settings no picture can use."""
        for name in ("queries", "k", "max_pairs", "shown_pairs", "agreement_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not -1.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold must lie in (-1, 1]; got {self.threshold}")
        if self.pool is not None and self.pool < 2:
            raise ValueError(f"pool must be >= 2 images; got {self.pool}")


@dataclass(frozen=True)
class NeighbourSummary:
    """What a neighbour report found.

    Attributes:
        images: Images searched.
        of_images: Images in the dataset (more than ``images`` when sampled).
        queries: Query indices of the grid, in the dataset.
        threshold: The near-duplicate threshold.
        pairs: Pairs above it.
        pairs_listed: Pairs in the CSV (at most ``max_pairs``).
        groups: Groups of images those pairs link.
        same_class: Share of the ``k`` nearest neighbours that have their query's class, in
            percent, over :attr:`agreement_queries` random queries; ``None`` without labels.
        agreement_queries: Queries that share was measured on.
        files: The files written.
    """

    images: int
    of_images: int
    queries: list[int]
    threshold: float
    pairs: int
    pairs_listed: int
    groups: int
    same_class: float | None
    agreement_queries: int
    files: list[str]


def neighbour_report(
    backbone: nn.Module,
    info: EncoderInfo,
    data: ImageDataset,
    directory: Path,
    *,
    settings: NeighbourSettings | None = None,
    device: torch.device | None = None,
    precision: str = "32",
    batch_size: int = 512,
) -> NeighbourSummary:
    """Draw the neighbour grid and list the near-duplicates of ``data`` into ``directory``.

    Writes :data:`GRID_PNG`, :data:`DUPLICATES_PNG` and :data:`DUPLICATES_CSV` (paths and
    similarities, most similar first; ``group`` numbers the images linked by pairs).

    Args:
        backbone: The encoder.
        info: How to feed it.
        data: The images (labels optional).
        directory: Where to write.
        settings: What to show (default: :class:`NeighbourSettings`'s).
        device: Where the encoder and the similarities run (default: where the backbone is).
        precision: Autocast precision of the feature extraction.
        batch_size: Images per forward pass.

    Returns:
        What was found.

    Raises:
        ValueError: If ``data`` has fewer than ``k + 1`` images.
    """
    settings = settings or NeighbourSettings()
    device = next(backbone.parameters()).device if device is None else device
    generator = torch.Generator().manual_seed(settings.seed)
    pool = torch.arange(len(data))
    if settings.pool is not None and len(data) > settings.pool:
        pool = torch.randperm(len(data), generator=generator)[: settings.pool].sort().values
    images = data.subset(pool) if len(pool) < len(data) else data
    if len(images) < settings.k + 1:
        raise ValueError(
            f"{len(images)} images cannot show {settings.k} neighbours each; "
            f"use at least {settings.k + 1} images or a smaller k"
        )
    backbone.to(device)
    features = extract_features(
        backbone,
        images,
        batch_size=batch_size,
        device=device,
        mean=info.mean,
        std=info.std,
        image_size=info.image_size,
        precision=precision,
    )
    order = torch.randperm(len(images), generator=generator)
    queries = order[: min(settings.queries, len(images))]
    grid = nearest_neighbours(features, queries, k=settings.k, device=device)
    labels = images.labels
    same_class, agreement_queries = None, 0
    if labels is not None:
        sample = order[: min(settings.agreement_queries, len(images))]
        found = nearest_neighbours(features, sample, k=settings.k, device=device)
        same_class = 100.0 * float((labels[found.indices] == labels[sample, None]).float().mean())
        agreement_queries = len(sample)
    pairs = near_duplicates(
        features, threshold=settings.threshold, max_pairs=settings.max_pairs, device=device
    )
    directory.mkdir(parents=True, exist_ok=True)
    where = (
        f"{len(images)} images"
        if len(images) == len(data)
        else f"{len(images)} of {len(data)} images (seeded sample)"
    )
    title = f"Nearest neighbours in the encoder's embedding (cosine similarity) among {where}"
    if same_class is not None:
        title += (
            f"\nthe {settings.k} nearest share the query's class for {same_class:.1f} % "
            f"of {agreement_queries} random queries"
        )
    names = _names(images, pool)
    _draw_grid(images, names, grid, directory / GRID_PNG, title)
    shown = min(settings.shown_pairs, len(pairs.first))
    _draw_pairs(
        images,
        names,
        pairs,
        shown,
        directory / DUPLICATES_PNG,
        f"{pairs.total or 'No'} pair{'s' if pairs.total != 1 else ''} at cosine similarity "
        f">= {settings.threshold} among {where}"
        + (f", the {shown} most similar" if pairs.total > shown else ""),
    )
    _write_pairs(directory / DUPLICATES_CSV, pairs, pool, data)
    return NeighbourSummary(
        images=len(images),
        of_images=len(data),
        queries=pool[grid.queries].tolist(),
        threshold=settings.threshold,
        pairs=pairs.total,
        pairs_listed=len(pairs.first),
        groups=int(pairs.groups.max()) + 1 if len(pairs.groups) else 0,
        same_class=None if same_class is None else round(same_class, 2),
        agreement_queries=agreement_queries,
        files=[GRID_PNG, DUPLICATES_PNG, DUPLICATES_CSV],
    )


def _picture(data: ImageDataset, index: int) -> np.ndarray:
    image, _, _, size = data[index]
    return thumbnail(image, size)


def _draw_grid(
    data: ImageDataset, names: list[str], grid: Neighbours, out: Path, title: str
) -> None:
    """The grid; under each image its class (green or red as it matches the query's), or
    without labels its name."""
    from barlowtwins.evaluation import plots

    cells = [[q, *row] for q, row in zip(grid.queries.tolist(), grid.indices.tolist(), strict=True)]
    labels, classes = data.labels, data.classes
    if labels is None:
        captions = [[names[i] for i in row] for row in cells]
        same_class = None
    else:
        captions = [
            [classes[int(labels[i])] if classes else str(int(labels[i])) for i in row]
            for row in cells
        ]
        same_class = (labels[grid.indices] == labels[grid.queries, None]).numpy()
    plots.plot_neighbour_grid(
        [_picture(data, row[0]) for row in cells],
        [[_picture(data, i) for i in row[1:]] for row in cells],
        grid.similarities.numpy(),
        out,
        captions=captions,
        same_class=same_class,
        title=title,
    )


def _draw_pairs(
    data: ImageDataset,
    names: list[str],
    pairs: DuplicatePairs,
    shown: int,
    out: Path,
    title: str,
) -> None:
    """The ``shown`` most similar pairs, with their names."""
    from barlowtwins.evaluation import plots

    first, second = pairs.first[:shown].tolist(), pairs.second[:shown].tolist()
    plots.plot_duplicate_pairs(
        [(_picture(data, a), _picture(data, b)) for a, b in zip(first, second, strict=True)],
        pairs.similarities[:shown].tolist(),
        out,
        captions=[(names[a], names[b]) for a, b in zip(first, second, strict=True)],
        title=title,
    )


def _names(data: ImageDataset, pool: torch.Tensor) -> list[str]:
    """A short name of every image searched: its file name, or ``#`` and its index in the
    whole dataset (``pool`` maps the searched images to it)."""
    if data.paths is None:
        return [f"#{i}" for i in pool.tolist()]
    return [Path(path).name for path in data.paths]


def _write_pairs(path: Path, pairs: DuplicatePairs, pool: torch.Tensor, data: ImageDataset) -> None:
    """The pairs as CSV: indices into the whole dataset, and its paths where it has them."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(_CSV_COLUMNS)
            for group, value, a, b in zip(
                pairs.groups.tolist(),
                pairs.similarities.tolist(),
                pool[pairs.first].tolist(),
                pool[pairs.second].tolist(),
                strict=True,
            ):
                paths = ("", "") if data.paths is None else (data.paths[a], data.paths[b])
                writer.writerow((group, f"{value:.6f}", a, b, *paths))

    atomic_write(path, write)


def find_neighbours(
    checkpoint: str | Path,
    data: str,
    output: Path | None = None,
    *,
    settings: NeighbourSettings | None = None,
    accelerator: str | None = None,
    batch_size: int = 512,
    **data_options: Any,
) -> tuple[NeighbourSummary, Path]:
    """``barlowtwins neighbours``: the neighbour report of any run on any data.

    Args:
        checkpoint: Anything :func:`~barlowtwins.runs.loader.load_trained_encoder` reads.
        data: The images (``fashion-mnist[:split]`` or a folder, labelled or not).
        output: The folder to write into (default: the run's ``neighbours/``).
        settings: What to show.
        accelerator: Where to compute (:func:`~barlowtwins.app.inference.resolve_device`).
        batch_size: Images per forward pass.
        **data_options: Passed to :func:`barlowtwins.data.load_data`.

    Returns:
        What was found, and the folder written.

    Raises:
        ValueError: If there is no folder to write into, or too few images.
    """
    run = load_trained_encoder(checkpoint)
    if output is None:
        if run.folder is None:
            raise ValueError(f"{checkpoint} lies in no run folder; pass --output DIR")
        output = run.folder.neighbours
    device = resolve_device(accelerator)
    dataset = load_data(
        data, image_size=run.info.image_size, channels=run.info.in_channels, **data_options
    )
    backbone = run.encoder().to(device).to(memory_format=torch.channels_last)
    summary = neighbour_report(
        backbone,
        run.info,
        dataset,
        output,
        settings=settings,
        device=device,
        precision=default_precision(accelerator or "auto"),
        batch_size=batch_size,
    )
    record = {"data": data, "settings": asdict(settings or NeighbourSettings()), **asdict(summary)}
    record["files"] = [*summary.files, SUMMARY_JSON]
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(output / SUMMARY_JSON, lambda tmp: tmp.write_text(text))
    return summary, output
