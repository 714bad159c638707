"""PNG figures of a Barlow Twins run: loss, training health, kNN accuracy, cross-correlation
matrix, t-SNE, and the images an encoder puts together (nearest neighbours, near-duplicates).

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas directly instead of
through ``pyplot``, so no display is needed, no global backend is switched, and no figure is
left registered in pyplot's global state. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from barlowtwins import health

_DPI = 100
_LOSS_COLUMNS_STEP = ("train_loss_step", "train_loss")
_LOSS_COLUMN_EPOCH = "train_loss_epoch"
_KNN_COLUMN = "val_knn_acc"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def _read_metrics(metrics_csv: Path) -> dict[str, np.ndarray]:
    """Read a Lightning ``CSVLogger`` metrics file into one float array per column.

    Lightning writes one row per logging call, so most cells are empty; they become NaN.
    """
    with Path(metrics_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{metrics_csv} has no data rows; expected a Lightning metrics.csv")
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        columns[name] = np.array([float(v) if v not in ("", None) else math.nan for v in values])
    return columns


def _logged(columns: dict[str, np.ndarray], y: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows where ``y`` was logged, as (x, y) arrays."""
    mask = ~np.isnan(columns[y])
    return columns[x][mask], columns[y][mask]


def plot_loss(metrics_csv: Path, out: Path) -> Path:
    """Plot the training loss against the optimisation step.

    Per-step values (column ``train_loss_step``, or ``train_loss`` when the loss is logged on
    steps only) are drawn as a thin line; per-epoch means (``train_loss_epoch``) as markers at
    the step where each epoch ended.

    Args:
        metrics_csv: A Lightning ``CSVLogger`` ``metrics.csv`` with a ``step`` column.
        out: Where to write the PNG.

    Returns:
        ``out``.

    Raises:
        ValueError: If the file has no rows, no ``step`` column, or no logged training loss.
    """
    columns = _read_metrics(metrics_csv)
    if "step" not in columns:
        raise ValueError(f"{metrics_csv} has no 'step' column; columns are {sorted(columns)}")
    step_column = next((c for c in _LOSS_COLUMNS_STEP if c in columns), None)
    series: list[tuple[str, dict[str, Any]]] = []
    if step_column is not None:
        series.append((step_column, {"label": "per step", "linewidth": 0.8, "alpha": 0.7}))
    if _LOSS_COLUMN_EPOCH in columns:
        series.append((_LOSS_COLUMN_EPOCH, {"label": "per epoch", "marker": "o"}))
    if not any((~np.isnan(columns[name])).any() for name, _ in series):
        raise ValueError(
            f"{metrics_csv} logs no training loss; expected one of "
            f"{[*_LOSS_COLUMNS_STEP, _LOSS_COLUMN_EPOCH]} with values"
        )

    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    for name, style in series:
        axes.plot(*_logged(columns, name, "step"), **style)
    axes.set_xlabel("step")
    axes.set_ylabel("Barlow Twins loss")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def plot_health(metrics_csv: Path, out: Path, embedding_dim: int | None = None) -> Path:
    """Plot the training-health metrics of :mod:`barlowtwins.health` against the step.

    Three panels: the loss per feature with its invariance and weighted redundancy terms per
    feature (log scale); the embeddings' spread ``train_embedding_std`` with the healthy
    ``1 / sqrt(D)`` as a dashed line when ``embedding_dim`` is given; the effective rank of
    held-out backbone features (at the start and after each epoch).

    Args:
        metrics_csv: A Lightning ``CSVLogger`` ``metrics.csv`` with a ``step`` column and the
            columns named in :mod:`barlowtwins.health`.
        out: Where to write the PNG.
        embedding_dim: ``D``, the projector's output size, for the reference line.

    Returns:
        ``out``.

    Raises:
        ValueError: If the file has no rows, no ``step`` column, or no logged health metric.
    """
    columns = _read_metrics(metrics_csv)
    names = (health.LOSS_PER_FEATURE, health.EMBEDDING_STD, health.EFFECTIVE_RANK)
    if "step" not in columns or not any(
        name in columns and (~np.isnan(columns[name])).any() for name in names
    ):
        raise ValueError(
            f"{metrics_csv} logs no training-health metric; expected a 'step' column and one "
            f"of {list(names)} with values"
        )

    def series(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in columns:
            return np.array([]), np.array([])
        return _logged(columns, name, "step")

    figure = _new_figure(13.0, 4.2)
    loss_axes, spread_axes, rank_axes = figure.subplots(1, 3)
    steps, per_feature = series(health.LOSS_PER_FEATURE)
    loss_axes.plot(steps, per_feature, label="loss / D", color="black")
    _, invariance = series(health.INVARIANCE)
    _, redundancy = series(health.WEIGHTED_REDUNDANCY)
    if embedding_dim and len(invariance) == len(steps) and len(redundancy) == len(steps):
        loss_axes.plot(steps, invariance / embedding_dim, label="invariance / D")
        loss_axes.plot(steps, redundancy / embedding_dim, label="lambda x redundancy / D")
    if len(steps):
        loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_title("Loss per feature (1 = independent views)")
    loss_axes.grid(alpha=0.3, which="both")
    loss_axes.legend()

    steps, spread = series(health.EMBEDDING_STD)
    spread_axes.plot(steps, spread, color="C2", label="per-feature std, l2-normalised")
    if embedding_dim:
        healthy = 1 / math.sqrt(embedding_dim)
        spread_axes.axhline(
            healthy, linestyle="--", color="grey", label=f"1/sqrt(D) = {healthy:.4f}"
        )
    top = max([*spread.tolist(), 1 / math.sqrt(embedding_dim) if embedding_dim else 0.0, 1e-6])
    spread_axes.set_ylim(0, 1.15 * top)
    spread_axes.set_xlabel("step")
    spread_axes.set_title("Embedding spread (0 = collapsed)")
    spread_axes.grid(alpha=0.3)
    spread_axes.legend()

    steps, rank = series(health.EFFECTIVE_RANK)
    rank_axes.plot(steps, rank, marker="o", color="C3")
    rank_axes.set_ylim(0, 1.1 * max([*rank.tolist(), 1.0]))
    rank_axes.set_xlabel("step")
    rank_axes.set_title("Effective rank, held-out backbone features")
    rank_axes.grid(alpha=0.3)
    return _save(figure, out)


def plot_knn_accuracy(
    metrics_csv: Path, out: Path, baselines: dict[str, float] | None = None
) -> Path:
    """Plot the validation kNN accuracy per epoch, with optional baseline reference lines.

    Args:
        metrics_csv: A Lightning ``CSVLogger`` ``metrics.csv`` with ``epoch`` and
            ``val_knn_acc`` columns (accuracy in percent).
        out: Where to write the PNG.
        baselines: Name to accuracy (percent), each drawn as a horizontal dashed line, e.g.
            ``{"random init": 78.9, "raw pixels": 85.5}``.

    Returns:
        ``out``.

    Raises:
        ValueError: If the file has no rows, no ``epoch`` column, or no logged kNN accuracy.
    """
    columns = _read_metrics(metrics_csv)
    if "epoch" not in columns or _KNN_COLUMN not in columns:
        raise ValueError(
            f"{metrics_csv} needs 'epoch' and '{_KNN_COLUMN}' columns; columns are "
            f"{sorted(columns)}"
        )
    epochs, accuracy = _logged(columns, _KNN_COLUMN, "epoch")
    if len(accuracy) == 0:
        raise ValueError(f"{metrics_csv} has no logged '{_KNN_COLUMN}' values")

    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    axes.plot(epochs, accuracy, marker="o", color="black", label="Barlow Twins, per epoch")
    for index, (name, value) in enumerate((baselines or {}).items()):
        axes.axhline(value, linestyle="--", color=f"C{index}", label=f"{name} ({value:.1f}%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("kNN accuracy (%)")
    axes.set_title("kNN accuracy: per-epoch monitor, and final scores (dashed)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def _correlation_summary(c: Tensor) -> tuple[float, float]:
    """Mean of the diagonal and mean absolute off-diagonal entry of a square matrix.

    These are the two terms Barlow Twins drives to 1 and 0 (Zbontar et al. 2021, Eq. 1). With a
    single feature there is no off-diagonal entry and the second value is NaN.
    """
    c = c.detach().double().cpu()
    diagonal = c.diagonal()
    off_diagonal_count = c.numel() - diagonal.numel()
    if off_diagonal_count == 0:
        return float(diagonal.mean()), math.nan
    off_diagonal_sum = c.abs().sum() - diagonal.abs().sum()
    return float(diagonal.mean()), float(off_diagonal_sum / off_diagonal_count)


def plot_cross_correlation(c: Tensor, out: Path, max_features: int = 64) -> Path:
    """Draw the Barlow Twins cross-correlation matrix of a held-out batch.

    A well-trained model shows the identity: a red diagonal on a white background (Zbontar
    et al. 2021, Fig. 1). Only the top-left ``max_features x max_features`` block is drawn so
    single entries stay visible, but the title summarises the full matrix.

    Args:
        c: ``(D, D)`` cross-correlation matrix, entries in [-1, 1].
        out: Where to write the PNG.
        max_features: Size of the drawn top-left block.

    Returns:
        ``out``.

    Raises:
        ValueError: If ``c`` is not a non-empty square matrix or ``max_features < 1``.
    """
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise ValueError(f"c must be a non-empty square (D, D) matrix; got {tuple(c.shape)}")
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1; got {max_features}")
    mean_diagonal, mean_off_diagonal = _correlation_summary(c)
    size = min(max_features, c.shape[0])
    block = c[:size, :size].detach().float().cpu().numpy()

    figure = _new_figure(6.0, 5.2)
    axes = figure.add_subplot()
    image = axes.imshow(block, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes)
    axes.set_xlabel("feature (view B)")
    axes.set_ylabel("feature (view A)")
    axes.set_title(
        f"Cross-correlation, first {size} of {c.shape[0]} features\n"
        f"mean diagonal {mean_diagonal:.3f}, mean |off-diagonal| {mean_off_diagonal:.3f}"
    )
    return _save(figure, out)


def plot_embedding_2d(
    features: Tensor,
    labels: Tensor | None,
    out: Path,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter a 2-D t-SNE embedding of features, coloured by label.

    At most ``max_points`` samples (a seeded random subset) are embedded, because t-SNE is
    quadratic-ish in the number of points. Features are first reduced to 50 dimensions with
    PCA, the usual preconditioning that removes noise and speeds t-SNE up, and t-SNE starts
    from the PCA layout so the result is stable across seeds.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` integer labels, or ``None`` for a single colour without a legend.
        out: Where to write the PNG.
        class_names: Legend names indexed by label; label values are used when omitted.
        max_points: Largest number of samples embedded.
        seed: Seed of the subset choice, PCA and t-SNE.

    Returns:
        ``out``.

    Raises:
        ValueError: If ``features`` is not 2-D with at least 5 rows (after subsetting),
            ``labels`` does not match it, or ``class_names`` lacks a name for some label.
    """
    # Imported here: scikit-learn is slow to import and only this figure needs it.
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if features.ndim != 2 or features.shape[1] == 0:
        raise ValueError(f"features must be a 2-D (N, D) tensor; got {tuple(features.shape)}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != features.shape[0]):
        raise ValueError(
            f"labels must be 1-D with one entry per feature row ({features.shape[0]}); "
            f"got shape {tuple(labels.shape)}"
        )
    if max_points < 5:
        raise ValueError(f"max_points must be >= 5; got {max_points}")
    if features.shape[0] < 5:
        raise ValueError(f"t-SNE needs at least 5 samples; got {features.shape[0]}")

    x = features.detach().float().cpu().numpy()
    y = None if labels is None else labels.detach().cpu().long().numpy()
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_points:
        subset = np.sort(rng.choice(x.shape[0], size=max_points, replace=False))
        x = x[subset]
        y = None if y is None else y[subset]
    if y is not None and class_names is not None and (y.min() < 0 or y.max() >= len(class_names)):
        raise ValueError(
            f"labels must index class_names (0 to {len(class_names) - 1}); "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )

    pca_dims = min(50, x.shape[0], x.shape[1])
    if pca_dims < x.shape[1]:
        x = PCA(n_components=pca_dims, random_state=seed).fit_transform(x)
    # Perplexity must stay below the number of samples; 30 is the usual value for large sets.
    perplexity = min(30.0, (x.shape[0] - 1) / 3)
    embedding = TSNE(
        n_components=2, init="pca", perplexity=perplexity, random_state=seed
    ).fit_transform(x)

    figure = _new_figure(7.5, 6.0)
    axes = figure.add_subplot()
    if y is None:
        axes.scatter(embedding[:, 0], embedding[:, 1], s=4, alpha=0.7)
    else:
        classes = np.unique(y)
        colormap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for index, label in enumerate(classes):
            color = colormap(index % colormap.N)
            mask = y == label
            name = class_names[label] if class_names is not None else str(label)
            axes.scatter(
                embedding[mask, 0], embedding[mask, 1], s=4, alpha=0.7, color=color, label=name
            )
        axes.legend(markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"t-SNE of {x.shape[0]} samples")
    return _save(figure, out)


# Colours of a neighbour's caption: same class as its query, another class.
_SAME_CLASS, _OTHER_CLASS = "tab:green", "tab:red"
# Images up to this side are drawn with visible pixels; larger ones are smoothed.
_PIXELATED_SIDE = 64


def _draw_image(axes: Any, image: np.ndarray) -> None:
    """One thumbnail at its own aspect ratio (letterboxed in its cell), without ticks."""
    grey = image.ndim == 2
    axes.imshow(
        image,
        cmap="gray" if grey else None,
        vmin=0,
        vmax=255,
        interpolation="nearest" if max(image.shape[:2]) <= _PIXELATED_SIDE else "antialiased",
    )
    axes.set_axis_off()


def plot_neighbour_grid(
    queries: Sequence[np.ndarray],
    neighbours: Sequence[Sequence[np.ndarray]],
    similarities: np.ndarray,
    out: Path,
    *,
    captions: Sequence[Sequence[str]] | None = None,
    same_class: np.ndarray | None = None,
    title: str = "Nearest neighbours in the embedding",
) -> Path:
    """A grid: each row a query image followed by its nearest neighbours, most similar first.

    Args:
        queries: ``Q`` thumbnails (``(h, w)`` greyscale or ``(h, w, 3)`` RGB uint8 arrays, at
            their own aspect ratio, e.g. from :func:`~barlowtwins.evaluation.neighbours.thumbnail`).
        neighbours: For each query, its ``k`` neighbours' thumbnails.
        similarities: ``(Q, k)`` cosine similarities, written under each neighbour.
        out: Where to write the PNG.
        captions: ``(Q, k + 1)`` extra words per cell (e.g. class names), query first.
        same_class: ``(Q, k)`` whether each neighbour shares its query's class; colours the
            captions green or red when given.
        title: The figure's title.

    Returns:
        ``out``.

    Raises:
        ValueError: If there is no query, or the shapes do not agree.
    """
    rows = len(queries)
    k = len(neighbours[0]) if neighbours else 0
    if rows == 0 or k == 0:
        raise ValueError("the grid needs at least one query with one neighbour")
    if len(neighbours) != rows or any(len(row) != k for row in neighbours):
        raise ValueError(f"expected {rows} rows of {k} neighbours")
    if similarities.shape != (rows, k):
        raise ValueError(f"similarities must be ({rows}, {k}); got {similarities.shape}")
    figure = _new_figure(1.25 * (k + 1) + 0.3, 1.45 * rows + 0.6)
    grid = figure.subplots(rows, k + 1, squeeze=False)
    for row in range(rows):
        cells = [queries[row], *neighbours[row]]
        for column, image in enumerate(cells):
            axes = grid[row][column]
            _draw_image(axes, image)
            extra = captions[row][column] if captions is not None else ""
            if column == 0:
                text, color = "query" + (f"\n{extra}" if extra else ""), "black"
            else:
                text = f"{similarities[row, column - 1]:.3f}" + (f"\n{extra}" if extra else "")
                agree = None if same_class is None else bool(same_class[row, column - 1])
                color = "black" if agree is None else _SAME_CLASS if agree else _OTHER_CLASS
            axes.set_title(
                text, fontsize=7, color=color, fontweight="bold" if column == 0 else None
            )
    figure.suptitle(title, fontsize=10)
    return _save(figure, out)


def plot_duplicate_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    similarities: Sequence[float],
    out: Path,
    *,
    captions: Sequence[tuple[str, str]] | None = None,
    title: str = "Near-duplicate pairs",
    columns: int = 3,
) -> Path:
    """The most similar pairs of images side by side, with their similarity.

    Args:
        pairs: Thumbnails of each pair, as for :func:`plot_neighbour_grid`.
        similarities: Each pair's cosine similarity.
        out: Where to write the PNG.
        captions: Words under each image of a pair (e.g. file names).
        title: The figure's title; with no pair, the figure's only text.
        columns: Pairs per row.

    Returns:
        ``out``.

    Raises:
        ValueError: If the lengths do not agree or ``columns < 1``.
    """
    if len(similarities) != len(pairs) or (captions is not None and len(captions) != len(pairs)):
        raise ValueError("pairs, similarities and captions must have the same length")
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns}")
    if not pairs:
        figure = _new_figure(6.0, 3.0)
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.text(0.5, 0.5, title, ha="center", va="center", wrap=True)
        return _save(figure, out)
    columns = min(columns, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure = _new_figure(2.6 * columns + 0.3, 1.55 * rows + 0.6)
    grid = figure.subplots(rows, 2 * columns, squeeze=False)
    for cell in range(rows * columns):
        row, column = divmod(cell, columns)
        left, right = grid[row][2 * column], grid[row][2 * column + 1]
        if cell >= len(pairs):
            left.set_axis_off()
            right.set_axis_off()
            continue
        for side, (axes, image) in enumerate(zip((left, right), pairs[cell], strict=True)):
            _draw_image(axes, image)
            name = captions[cell][side] if captions is not None else ""
            heading = f"{similarities[cell]:.4f}" if side == 0 else ""
            axes.set_title("\n".join(filter(None, (heading, name))) or " ", fontsize=7)
    figure.suptitle(title, fontsize=10)
    return _save(figure, out)
