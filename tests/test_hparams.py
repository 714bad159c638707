"""Tests for barlowtwins.hparams: the method's hyperparameters as one typed object."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from barlowtwins.hparams import AUTO, Hyperparameters, checkpoint_values


def test_the_defaults_are_the_papers() -> None:
    paper = Hyperparameters()
    assert (paper.backbone, paper.projector_dims, paper.lambda_param) == (
        "resnet50",
        (8192, 8192, 8192),
        0.0051,
    )
    assert (paper.batch_size, paper.lr_weights, paper.lr_biases, paper.epochs) == (
        2048,
        0.2,
        0.0048,
        1000,
    )
    # Every field has the help text of its option.
    for spec in dataclasses.fields(Hyperparameters):
        assert spec.metadata["help"], spec.name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"momentum": 1.0}, "momentum must be < 1, got 1.0"),
        ({"num_views": 1}, "num views must be >= 2, got 1"),
        ({"projector_dims": (8, 0)}, "projector dims must be positive, got [8, 0]"),
        ({"crop_scale": (0.5, 0.2)}, "crop scale must satisfy 0 < lo <= hi <= 1, got [0.5, 0.2]"),
        ({"solarize_prob": (0.0, 1.5)}, "solarize prob must lie in [0, 1], got [0.0, 1.5]"),
        (
            {"num_views": 3, "mix_weight": 1.0},
            "Mixed Barlow Twins (mix_weight > 0) takes 2 views, got num_views 3",
        ),
    ],
)
def test_a_value_out_of_its_bounds_is_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        Hyperparameters(**changes)
    assert str(error.value) == message


def test_auto_values_are_left_to_resolve() -> None:
    recipe = Hyperparameters().replace(batch_size=AUTO, image_size=AUTO)
    # The precision is left to the hardware in every recipe.
    assert recipe.unresolved() == ["batch_size", "image_size", "precision"]
    assert recipe.replace(batch_size=64, image_size=32, precision="32").unresolved() == []


def test_whether_a_value_may_change_on_resume_is_a_property_of_its_field() -> None:
    fixed = Hyperparameters.fixed_on_resume()
    assert {"backbone", "projector_dims", "batch_size", "optimizer", "lr_weights"} <= set(fixed)
    assert "lambda_param" not in fixed and "epochs" not in fixed


def test_plain_values_round_trip() -> None:
    method = Hyperparameters(projector_dims=(64, 32), crop_scale=(0.2, 1.0))
    plain = method.to_dict()
    assert plain["projector_dims"] == [64, 32]
    assert Hyperparameters.from_dict({**plain, "in_channels": 3}) == method


def test_both_checkpoint_layouts_give_the_same_values() -> None:
    method = Hyperparameters(backbone="resnet10", image_size=28).to_dict()
    nested = {"hparams": method, "in_channels": 1, "seed": 0}
    # A module saved before Hyperparameters kept one flat mapping.
    flat = {**method, "in_channels": 1, "mix_seed": 0}
    assert checkpoint_values(nested)["image_size"] == checkpoint_values(flat)["image_size"] == 28
    assert checkpoint_values(nested)["in_channels"] == checkpoint_values(flat)["in_channels"] == 1


def test_a_view_that_must_not_flip_never_flips() -> None:
    from barlowtwins.training.module import BarlowTwinsModule

    # A left-to-right ramp: any flip reverses it. Identity otherwise (no crop, jitter or blur).
    module = BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10",
            image_size=16,
            crop_scale=(1.0, 1.0),
            solarize_prob=(0.0, 0.0),
            hflip_prob=0.0,
        ),
        in_channels=1,
    )
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).expand(64, 1, 16, 16).contiguous()
    for view in module.make_views(ramp, torch.Generator().manual_seed(0)):
        # Brightness and contrast jitter keep the ramp's order along each row.
        assert bool((view[..., 1:] >= view[..., :-1]).all())
    flipping = BarlowTwinsModule(Hyperparameters(backbone="resnet10", image_size=16), in_channels=1)
    views = flipping.make_views(ramp, torch.Generator().manual_seed(0))
    assert any(bool((view[..., 1:] < view[..., :-1]).any()) for view in views)
