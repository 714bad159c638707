"""The LightningModule and plugins in a real (tiny) Lightning run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from barlowtwins.data import load_fashion_mnist
from barlowtwins.hparams import Hyperparameters
from barlowtwins.nn.distributed import GlobalBatchNorm
from barlowtwins.runs.files import safe_load
from barlowtwins.training.callbacks import AtomicCheckpointIO, GlobalBatchNormSync
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule


def _module() -> BarlowTwinsModule:
    return BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10",
            image_size=16,
            small_image=False,
            projector_dims=(64, 64),
            batch_size=32,
            warmup_epochs=0.5,
        ),
        in_channels=1,
        knn_k=10,
    )


def test_training_logs_loss_and_knn_and_checkpoints(tmp_path: Path) -> None:
    data = load_fashion_mnist("train").head(128)
    query = load_fashion_mnist("test").head(64)
    module = _module()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
    )
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer.fit(module, BarlowTwinsDataModule(data, 32, knn_bank=data, knn_query=query))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"])
    assert 0 <= metrics["val_knn_acc"] <= 100
    changed = sum(
        not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True)
    )
    assert changed > 0
    # Lightning wrote its checkpoint through the atomic IO; it loads weights-only.
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    state = safe_load(ckpt)
    assert state["hyper_parameters"]["hparams"]["backbone"] == "resnet10"
    # What Lightning's own loader rebuilds the module from.
    assert BarlowTwinsModule(**state["hyper_parameters"]).hyperparameters == module.hyperparameters


def test_lr_follows_global_batch_rule() -> None:
    module = _module()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_train_batches=1,
    )
    data = load_fashion_mnist("train").head(64)
    trainer.fit(module, BarlowTwinsDataModule(data, 32))
    weights_group = trainer.optimizers[0].param_groups[0]
    # The paper's rule: base lr 0.2 scaled by the global batch (32 on one process) / 256.
    assert weights_group["initial_lr"] == 0.2 * 32 / 256


def test_global_batchnorm_sync_applies_and_reverts() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4))
    plugin = GlobalBatchNormSync()
    synced = plugin.apply(model)
    assert sum(isinstance(m, GlobalBatchNorm) for m in synced.modules()) == 2
    reverted = plugin.revert(synced)
    assert [type(m) for m in reverted if "BatchNorm" in type(m).__name__] == [
        nn.BatchNorm2d,
        nn.BatchNorm1d,
    ]


def _train_tiny(
    tmp_path: Path, steps: int, cpu_convolutions: bool = True, **hparams: Any
) -> tuple[BarlowTwinsModule, L.Trainer]:
    """A 16 px ResNet-10 module trained ``steps`` steps of 8 Fashion-MNIST images on the CPU."""
    module = BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10", image_size=16, projector_dims=(16,), batch_size=8, **hparams
        ),
        in_channels=1,
        cpu_convolutions=cpu_convolutions,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=BarlowTwinsDataModule(load_fashion_mnist("train").head(16), 8))
    return module, trainer


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_convolutions_are_swapped_in_on_cpu_only_when_enabled(
    enabled: bool, tmp_path: Path
) -> None:
    from barlowtwins.nn.convolution import SmallOutputConv2d

    module, _ = _train_tiny(tmp_path, 1, cpu_convolutions=enabled)
    swapped = [type(m) is SmallOutputConv2d for m in module.backbone.modules()]
    assert any(swapped) is enabled


def test_mixed_barlow_twins_trains_and_logs_its_term(tmp_path: Path) -> None:
    module, trainer = _train_tiny(tmp_path, 2, mix_weight=4.0)
    assert module.batches_per_step == 3  # both views and the mixed batch
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"])
    # The regulariser is part of the loss: positive for a generic mixing coefficient.
    assert 0 < float(metrics["train_mixed_term"]) < float(metrics["train_loss"])


def test_more_views_train_on_the_mean_over_pairs(tmp_path: Path) -> None:
    module, trainer = _train_tiny(tmp_path, 2, num_views=3)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    images = load_fashion_mnist("train").head(8).images
    views = module.make_views(images, torch.Generator().manual_seed(0))
    assert len(views) == module.batches_per_step == 3
    assert all(v.shape == (8, 1, 16, 16) for v in views)
    assert not torch.equal(views[0], views[2]), "the third view repeats the first"


def test_the_speedrun_initialisations_reach_the_module_from_the_hyperparameters() -> None:
    module = BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10",
            image_size=16,
            projector_dims=(16,),
            batch_size=8,
            dirac_init=True,
            whiten_stem=True,
        ),
        in_channels=1,
    )
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(module.backbone.layer1[0].conv2(x), x)
    assert not module.backbone.conv1.weight.requires_grad
    assert module.backbone.layer1[0].conv2.weight.requires_grad
