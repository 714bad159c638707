"""Tests for barlowtwins.app.recipes: every recipe complete, each value from its cited source,
and every recipe trains a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from barlowtwins.app.cli import main
from barlowtwins.app.config import FitConfig
from barlowtwins.app.recipes import PAPER, RECIPES, SOLO_LEARN, folder_values
from barlowtwins.data import DataSummary
from barlowtwins.training import BarlowTwinsModule
from conftest import ImageFolderFactory

_PAPER = "Zbontar et al. 2021 §4 / facebookresearch/barlowtwins main.py"
_PAPER_AUG = "Zbontar et al. 2021 appendix A / main.py Transform (RandomResizedCrop default)"
_SOLO_CIFAR = "solo-learn scripts/pretrain/cifar/barlow.yaml"
_SOLO_IN100 = "solo-learn scripts/pretrain/imagenet-100/barlow.yaml"
_SOLO_METHOD = "solo-learn solo/methods/barlow_twins.py (lamb default 0.0051)"
_SOLO_BASE = "solo-learn solo/methods/base.py (warmup_epochs 10, min_lr 0.0)"
_SOLO_AUG = "solo-learn scripts/pretrain/*/augmentations/asymmetric.yaml (crop_min_scale 0.08)"

# (recipe, hyperparameter, value, where the value is written)
SOURCES = [
    ("paper", "backbone", "resnet50", _PAPER),
    ("paper", "zero_init_residual", True, "main.py: resnet50(zero_init_residual=True)"),
    ("paper", "projector_dims", (8192, 8192, 8192), "main.py --projector 8192-8192-8192"),
    ("paper", "lambda_param", 0.0051, "main.py --lambd 0.0051"),
    ("paper", "scale_loss", 1.0, "main.py: loss = on_diag + lambd * off_diag"),
    ("paper", "optimizer", "lars", _PAPER),
    ("paper", "lr_weights", 0.2, "main.py --learning-rate-weights 0.2"),
    ("paper", "lr_biases", 0.0048, "main.py --learning-rate-biases 0.0048"),
    ("paper", "weight_decay", 1.5e-6, "paper §4 text (main.py defaults to 1e-6)"),
    ("paper", "momentum", 0.9, "main.py LARS(momentum=0.9)"),
    ("paper", "lars_eta", 0.001, "main.py LARS(eta=0.001)"),
    ("paper", "lars_clip_lr", False, "main.py LARS (no clipping)"),
    ("paper", "warmup_epochs", 10, "main.py adjust_learning_rate: warmup_steps = 10 epochs"),
    ("paper", "final_lr_factor", 0.001, "main.py adjust_learning_rate: end_lr = base * 0.001"),
    ("paper", "epochs", 1000, "main.py --epochs 1000"),
    ("paper", "batch_size", 2048, "main.py --batch-size 2048"),
    ("paper", "image_size", 224, "main.py RandomResizedCrop(224)"),
    ("paper", "crop_scale", (0.08, 1.0), _PAPER_AUG),
    ("paper", "solarize_prob", (0.0, 0.2), _PAPER_AUG + ": Solarization(p=0.0), (p=0.2)"),
    ("cifar10", "backbone", "resnet18", _SOLO_CIFAR),
    ("cifar10", "small_image", True, "solo-learn base.py: cifar conv1 3x3, maxpool Identity"),
    ("cifar10", "projector_dims", (2048, 2048, 2048), _SOLO_CIFAR + " proj dims 2048"),
    ("cifar10", "lambda_param", 0.0051, _SOLO_METHOD),
    ("cifar10", "scale_loss", 0.1, _SOLO_CIFAR + " scale_loss: 0.1"),
    ("cifar10", "optimizer", "lars", _SOLO_CIFAR),
    ("cifar10", "lr_weights", 0.3, _SOLO_CIFAR + " lr: 0.3"),
    ("cifar10", "lr_biases", 0.3, _SOLO_CIFAR + " (one lr for all parameters)"),
    ("cifar10", "weight_decay", 1e-4, _SOLO_CIFAR + " weight_decay: 1e-4"),
    ("cifar10", "lars_eta", 0.02, _SOLO_CIFAR + " eta: 0.02"),
    ("cifar10", "lars_clip_lr", True, _SOLO_CIFAR + " clip_lr: True"),
    ("cifar10", "warmup_epochs", 10, _SOLO_BASE),
    ("cifar10", "final_lr_factor", 0.0, _SOLO_BASE),
    ("cifar10", "epochs", 1000, _SOLO_CIFAR + " max_epochs: 1000"),
    ("cifar10", "batch_size", 256, _SOLO_CIFAR + " batch_size: 256"),
    ("cifar10", "image_size", 32, _SOLO_AUG + " crop_size: 32"),
    ("cifar10", "crop_scale", (0.08, 1.0), _SOLO_AUG),
    ("cifar10", "solarize_prob", (0.0, 0.2), _SOLO_AUG + " solarization prob: 0.0, 0.2"),
    ("imagenet100", "backbone", "resnet18", _SOLO_IN100),
    ("imagenet100", "small_image", False, _SOLO_IN100 + " (not cifar: standard stem)"),
    ("imagenet100", "scale_loss", 0.1, _SOLO_IN100 + " scale_loss: 0.1"),
    ("imagenet100", "lr_weights", 0.3, _SOLO_IN100 + " lr: 0.3"),
    ("imagenet100", "lars_eta", 0.02, _SOLO_IN100 + " eta: 0.02"),
    ("imagenet100", "epochs", 400, _SOLO_IN100 + " max_epochs: 400"),
    ("imagenet100", "batch_size", 256, _SOLO_IN100 + " batch_size: 128 x 2 devices"),
    ("imagenet100", "image_size", 224, _SOLO_AUG + " crop_size: 224"),
    ("fashion-mnist-cpu", "backbone", "resnet10", "README 'Measured results'"),
    ("fashion-mnist-cpu", "lr_weights", 3.0, "README one-epoch learning-rate sweep"),
    ("fashion-mnist-cpu", "batch_size", 512, "README: batch 512, 1.3x faster than 256"),
    ("fashion-mnist-cpu", "crop_scale", (1.0, 1.0), "README session-2 crop table"),
    ("fashion-mnist-cpu", "epochs", 5, "README 'Measured results'"),
]


@pytest.mark.parametrize(("recipe", "name", "value", "source"), SOURCES)
def test_recipe_value_matches_its_source(recipe: str, name: str, value: object, source: str):
    assert getattr(RECIPES[recipe].hparams, name) == value, source


def test_every_recipe_cites_a_source_and_derives_from_the_paper_or_solo_learn() -> None:
    for recipe in RECIPES.values():
        assert recipe.source and recipe.purpose and recipe.measured
    # Each recipe states only what differs from its base.
    assert RECIPES["paper"].hparams is PAPER
    for name in ("cifar10", "imagenet100", "folder"):
        differs = {
            key
            for key, value in RECIPES[name].hparams.to_dict().items()
            if value != SOLO_LEARN.to_dict()[key]
        }
        assert differs <= {"small_image", "epochs", "batch_size", "image_size", "warmup_epochs"}


def test_config_has_no_default_for_the_hyperparameters() -> None:
    # The recipe is the only source of the method's defaults.
    assert FitConfig.model_fields["hparams"].is_required()


def test_module_defaults_are_the_paper_recipe() -> None:
    assert BarlowTwinsModule().hyperparameters == RECIPES["paper"].hparams


@pytest.mark.parametrize(
    ("count", "side", "expected"),
    [
        (50_000, 32, {"image_size": 32, "small_image": True, "batch_size": 256, "epochs": 40}),
        (600, 28, {"image_size": 28, "small_image": True, "batch_size": 128, "epochs": 1000}),
        (10, 500, {"image_size": 224, "small_image": False, "batch_size": 8, "epochs": 1000}),
        (1_000_000, 375, {"image_size": 224, "small_image": False, "epochs": 20}),
        (20_000, 64, {"image_size": 64, "small_image": False, "epochs": 100}),
    ],
)
def test_folder_recipe_follows_the_data(count: int, side: int, expected: dict) -> None:
    values = folder_values(DataSummary(count=count, median_side=side))
    assert {k: values[k] for k in expected} == expected
    assert values["warmup_epochs"] == max(1, values["epochs"] // 10)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_a_few_steps(
    recipe: str, tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    data = image_folder(count=16, classes=2)
    # Tiny stand-ins for each recipe's model and data; its optimiser, loss options, schedule
    # and views are the recipe's own.
    small = ["--backbone", "resnet10", "--projector-dims", "32", "32", "--image-size", "32"]
    args = ["fit", "--recipe", recipe, "--data", str(data), *small, "--batch-size", "8"]
    args += ["--epochs", "1", "--precision", "32", "--no-plots", "--output", str(tmp_path / "r")]
    assert main(args) == 0
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["recipe"] == recipe
    assert (tmp_path / "r" / "backbone.pt").is_file()
