"""Tests for barlowtwins.evaluation.plots: each figure is a valid PNG from small real inputs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from barlowtwins.evaluation.plots import (
    _correlation_summary,
    plot_cross_correlation,
    plot_embedding_2d,
    plot_knn_accuracy,
    plot_loss,
)


def _write_metrics(path: Path, epochs: int = 4, steps_per_epoch: int = 5) -> Path:
    """A metrics.csv as Lightning's CSVLogger writes it: one sparse row per logging call."""
    header = ["epoch", "step", "train_loss_epoch", "train_loss_step", "val_knn_acc"]
    rows: list[dict[str, object]] = []
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            rows.append({"epoch": epoch, "step": step, "train_loss_step": 900 / (step + 1)})
            step += 1
        rows.append({"epoch": epoch, "step": step - 1, "val_knn_acc": 70 + 3 * epoch})
        rows.append({"epoch": epoch, "step": step - 1, "train_loss_epoch": 500 / (epoch + 1)})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 300 and height >= 300


def test_plot_loss_from_sparse_metrics(tmp_path: Path) -> None:
    metrics = _write_metrics(tmp_path / "metrics.csv")
    out = plot_loss(metrics, tmp_path / "figures" / "loss.png")
    assert out == tmp_path / "figures" / "loss.png"
    _assert_png(out)


def test_plot_loss_with_step_only_column(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train_loss\n0,0,5.0\n0,1,4.0\n1,2,3.5\n")
    _assert_png(plot_loss(metrics, tmp_path / "loss.png"))


def test_plot_loss_without_loss_column_fails(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,val_knn_acc\n0,4,71.0\n")
    with pytest.raises(ValueError, match="no training loss"):
        plot_loss(metrics, tmp_path / "loss.png")


def test_plot_knn_accuracy_with_baselines(tmp_path: Path) -> None:
    metrics = _write_metrics(tmp_path / "metrics.csv")
    out = plot_knn_accuracy(
        metrics, tmp_path / "knn.png", baselines={"random init": 78.9, "raw pixels": 85.5}
    )
    _assert_png(out)


def test_plot_knn_accuracy_needs_the_column(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train_loss_step\n0,0,5.0\n")
    with pytest.raises(ValueError, match="val_knn_acc"):
        plot_knn_accuracy(metrics, tmp_path / "knn.png")


def test_correlation_summary_on_crafted_matrix() -> None:
    c = torch.tensor([[1.0, 0.5, -0.2], [0.1, 0.8, 0.0], [-0.3, 0.4, 0.9]])
    mean_diagonal, mean_off_diagonal = _correlation_summary(c)
    assert mean_diagonal == pytest.approx(0.9)
    assert mean_off_diagonal == pytest.approx((0.5 + 0.2 + 0.1 + 0.0 + 0.3 + 0.4) / 6)
    assert _correlation_summary(torch.eye(5)) == (1.0, 0.0)
    single_diagonal, single_off_diagonal = _correlation_summary(torch.tensor([[0.7]]))
    assert single_diagonal == pytest.approx(0.7)
    assert math.isnan(single_off_diagonal)


def test_plot_cross_correlation_of_real_batch(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    z_a = torch.randn(256, 100, generator=generator)
    z_b = z_a + 0.5 * torch.randn(256, 100, generator=generator)
    z_a = (z_a - z_a.mean(0)) / z_a.std(0)
    z_b = (z_b - z_b.mean(0)) / z_b.std(0)
    c = z_a.T @ z_b / 256
    _assert_png(plot_cross_correlation(c, tmp_path / "c.png", max_features=32))
    with pytest.raises(ValueError, match="square"):
        plot_cross_correlation(c[:, :10], tmp_path / "bad.png")


@pytest.fixture
def tsne_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the arrays that scikit-learn's t-SNE embeds (it still runs, unchanged)."""
    from sklearn.manifold import TSNE

    shapes: list[tuple[int, ...]] = []
    fit_transform = TSNE.fit_transform

    def _recording(self: TSNE, x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        shapes.append(x.shape)
        return fit_transform(self, x, *args, **kwargs)

    monkeypatch.setattr(TSNE, "fit_transform", _recording)
    return shapes


def test_plot_embedding_2d_of_200_points(
    tmp_path: Path, tsne_inputs: list[tuple[int, ...]]
) -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=generator) * 5
    labels = torch.arange(4).repeat_interleave(50)
    features = centres[labels] + torch.randn(200, 64, generator=generator)
    out = plot_embedding_2d(
        features, labels, tmp_path / "tsne.png", class_names=["a", "b", "c", "d"]
    )
    _assert_png(out)
    # What keeps t-SNE cheap, checked by size rather than by a clock: PCA to 50 dimensions.
    assert tsne_inputs == [(200, 50)]


def test_plot_embedding_2d_subsets_and_accepts_no_labels(
    tmp_path: Path, tsne_inputs: list[tuple[int, ...]]
) -> None:
    features = torch.randn(120, 8, generator=torch.Generator().manual_seed(1))
    _assert_png(plot_embedding_2d(features, None, tmp_path / "tsne.png", max_points=60))
    assert tsne_inputs == [(60, 8)]
    with pytest.raises(ValueError, match="class_names"):
        plot_embedding_2d(
            features, torch.arange(120) % 3, tmp_path / "bad.png", class_names=["a", "b"]
        )
