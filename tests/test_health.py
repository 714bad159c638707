"""Training health: the metric functions, the rules of the warning, and both in real runs."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from barlowtwins import BarlowTwinsLoss
from barlowtwins.app.cli import main
from barlowtwins.app.recipes import DEFAULT_RECIPE, get_recipe
from barlowtwins.data import InMemoryImages, load_fashion_mnist
from barlowtwins.health import (
    EFFECTIVE_RANK,
    EMBEDDING_STD,
    INVARIANCE,
    LOSS_PER_FEATURE,
    REDUNDANCY,
    WEIGHTED_REDUNDANCY,
    EpochHealth,
    diagnose,
    effective_rank,
    embedding_std,
    loss_terms,
)
from barlowtwins.hparams import Hyperparameters
from barlowtwins.loss import cross_correlation
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule


def test_loss_terms_are_the_terms_the_loss_summed() -> None:
    generator = torch.Generator().manual_seed(0)
    z_a = torch.randn(64, 32, generator=generator)
    z_b = z_a + 0.5 * torch.randn(64, 32, generator=generator)
    criterion = BarlowTwinsLoss(lambda_param=0.01)
    loss = criterion(z_a, z_b)
    terms = loss_terms(criterion, num_features=32)
    torch.testing.assert_close(terms.loss, loss.detach())
    c = cross_correlation(z_a, z_b)
    torch.testing.assert_close(terms.invariance, (1 - c.diagonal()).square().sum())
    torch.testing.assert_close(terms.redundancy, c.square().sum() - c.diagonal().square().sum())
    torch.testing.assert_close(terms.loss_per_feature, loss.detach() / 32)
    assert not terms.invariance.requires_grad


def test_loss_terms_need_a_computed_loss() -> None:
    with pytest.raises(ValueError, match="not computed a loss"):
        loss_terms(BarlowTwinsLoss(), num_features=8)


def _independent_features_terms(num_features: int, batch_size: int) -> tuple[float, float]:
    """Expected (invariance, redundancy) when the two views' features are independent.

    Every c_ij is then the sample correlation of two independent series of N values:
    E[(1 - c_ii)^2] = 1 + 1/(N-1) on the D diagonal entries, E[c_ij^2] = 1/(N-1) on the
    D (D - 1) others.
    """
    per_entry = 1.0 / (batch_size - 1)
    return num_features * (1.0 + per_entry), num_features * (num_features - 1) * per_entry


def test_independent_features_give_the_derived_scale() -> None:
    features, batch, lambda_param = 256, 512, 5e-3
    invariance, redundancy = _independent_features_terms(features, batch)
    generator = torch.Generator().manual_seed(1)
    criterion = BarlowTwinsLoss(lambda_param)
    criterion(
        torch.randn(batch, features, generator=generator),
        torch.randn(batch, features, generator=generator),
    )
    measured = loss_terms(criterion, features)
    assert measured.invariance.item() == pytest.approx(invariance, rel=0.03)
    assert measured.redundancy.item() == pytest.approx(redundancy, rel=0.03)
    loss_per_feature = 1 + 1 / 511 + lambda_param * 255 / 511
    assert measured.loss_per_feature.item() == pytest.approx(loss_per_feature, rel=0.03)


def test_embedding_std_is_one_over_sqrt_d_when_spread_and_zero_when_collapsed() -> None:
    generator = torch.Generator().manual_seed(2)
    spread = torch.randn(4096, 64, generator=generator)
    assert embedding_std(spread).item() * math.sqrt(64) == pytest.approx(1.0, rel=0.05)
    direction = torch.randn(1, 64, generator=generator)
    collapsed = direction + 1e-4 * torch.randn(4096, 64, generator=generator)
    assert embedding_std(collapsed).item() * math.sqrt(64) < 0.01


def test_effective_rank_counts_equal_directions() -> None:
    generator = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(100, 5, generator=generator, dtype=torch.float64))
    # Five orthonormal columns with equal singular values: effective rank 5.
    assert effective_rank(3.0 * basis, centre=False) == pytest.approx(5.0, rel=1e-9)
    constant = torch.ones(50, 8)
    assert effective_rank(constant, centre=False) == pytest.approx(1.0, rel=1e-9)
    assert effective_rank(constant) == 0.0
    gaussian = torch.randn(4000, 16, generator=generator)
    assert 15.0 < effective_rank(gaussian) <= 16.0


# The numbers of a healthy run near the end of `barlowtwins fit --max-samples 8192 --epochs 2`
# (D = 1024), see docs/is_it_working.md.
HEALTHY = EpochHealth(
    num_features=1024,
    lambda_param=5e-3,
    steps=32,
    initial_invariance=300.0,
    invariance=60.0,
    redundancy=15000.0,
    embedding_std=0.85 / 32,
    effective_rank=195.0,
    initial_effective_rank=172.0,
)


def test_diagnose_finds_nothing_in_a_healthy_run() -> None:
    assert diagnose(HEALTHY) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"invariance": 280.0}, "stalled"),
        ({"redundancy": 0.7 * 1024 * 1023}, "copies of each other"),
        ({"effective_rank": 12.0}, "effective rank of 12.0 (random init: 172.0)"),
        ({"effective_rank": 0.0, "initial_effective_rank": 0.0}, "effective rank of 0.0"),
        ({"embedding_std": 0.05 / 32}, "0.050/sqrt(D)"),
    ],
)
def test_diagnose_names_each_problem(change: dict[str, float], message: str) -> None:
    import dataclasses

    problems = diagnose(dataclasses.replace(HEALTHY, **change))
    assert len(problems) == 1 and message in problems[0].message


def test_stall_is_judged_only_after_some_steps_from_a_known_start() -> None:
    import dataclasses

    stalled = dataclasses.replace(HEALTHY, invariance=280.0)
    assert [p.kind for p in diagnose(stalled)] == ["stalled"]
    assert diagnose(dataclasses.replace(stalled, initial_invariance=None)) == []
    assert diagnose(dataclasses.replace(stalled, steps=10)) == []


def _train(
    images: InMemoryImages, caplog: pytest.LogCaptureFixture, epochs: int, **options: float
) -> list[str]:
    """A tiny module with fit's recipe (no crops, LARS lr 3) on ``images``; the warnings."""
    torch.manual_seed(0)
    recipe = {"lr_weights": 3.0, "lr_biases": 0.0144, "lambda_param": 5e-3, **options}
    module = BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10",
            image_size=28,
            small_image=False,
            projector_dims=(128, 128),
            batch_size=64,
            warmup_epochs=0,
            crop_scale=(1.0, 1.0),
            **recipe,
        ),
        in_channels=1,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.WARNING, logger="barlowtwins"):
        trainer.fit(module, BarlowTwinsDataModule(images, 64))
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def fashion() -> InMemoryImages:
    return load_fashion_mnist("train").head(256)


def test_healthy_run_gets_no_warning(
    fashion: InMemoryImages, caplog: pytest.LogCaptureFixture
) -> None:
    # 20 steps: the stall rule is judged at the end.
    assert _train(fashion, caplog, epochs=5) == []


def test_identical_images_warn_once_of_each_problem(
    fashion: InMemoryImages, caplog: pytest.LogCaptureFixture
) -> None:
    constant = InMemoryImages(torch.full_like(fashion.images, 128), fashion.labels)
    warnings = _train(constant, caplog, epochs=5)
    assert len(warnings) == 2
    assert "after epoch 0" in warnings[0] and "effective rank of 0.0" in warnings[0]
    assert "after epoch 4" in warnings[1] and "stalled" in warnings[1]


def test_no_redundancy_term_with_a_huge_learning_rate_warns_of_collapse(
    fashion: InMemoryImages, caplog: pytest.LogCaptureFixture
) -> None:
    warnings = " ".join(_train(fashion, caplog, epochs=3, lambda_param=0.0, lr_weights=100.0))
    assert warnings.count("the run looks broken") >= 1
    assert "copies of each other" in warnings


def test_fit_logs_health_metrics_and_plots_them(tmp_path: Path) -> None:
    output = tmp_path / "run"
    # 10 steps: Lightning writes the step metrics every 10 steps.
    args = ["--backbone", "resnet10", "--max-samples", "320", "--batch-size", "32"]
    args += ["--val-max-samples", "200", "--knn-bank-size", "320", "--knn-k", "20"]
    args += ["--projector-dims", "64", "64", "--precision", "32", "--epochs", "1"]
    assert main(["fit", *args, "--output", str(output)]) == 0
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    step_rows = [row for row in rows if row.get(INVARIANCE)]
    assert step_rows, "no step row with the health metrics"
    row = step_rows[0]
    invariance, redundancy = float(row[INVARIANCE]), float(row[REDUNDANCY])
    # The logged terms add up to the logged loss of the same step.
    loss = float(row["train_loss_step"])
    lambda_param = get_recipe(DEFAULT_RECIPE).hparams.lambda_param
    assert float(row[WEIGHTED_REDUNDANCY]) == pytest.approx(lambda_param * redundancy, rel=1e-5)
    assert invariance + float(row[WEIGHTED_REDUNDANCY]) == pytest.approx(loss, rel=1e-5)
    assert float(row[LOSS_PER_FEATURE]) == pytest.approx(loss / 64, rel=1e-5)
    assert 0 < float(row[EMBEDDING_STD]) <= 1
    # The effective rank: at the start and after the epoch.
    ranks = [float(row[EFFECTIVE_RANK]) for row in rows if row.get(EFFECTIVE_RANK)]
    assert len(ranks) == 2 and all(1 < rank <= 200 for rank in ranks)
    with Image.open(output / "plots" / "health.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
