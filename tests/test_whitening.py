"""nn.whitening: a frozen first convolution that whitens its input patches (``whiten_stem``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from _distributed import run_distributed
from barlowtwins.data import load_fashion_mnist
from barlowtwins.hparams import Hyperparameters
from barlowtwins.nn.whitening import (
    WHITENING_EPS,
    first_convolution,
    patch_second_moment,
    whiten_convolution_,
    whitening_filters,
)
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule


def _images(count: int = 32, seed: int = 0) -> Tensor:
    """Fashion-MNIST images normalised to zero mean and unit variance (correlated pixels)."""
    images = load_fashion_mnist("train").head(count + seed * count).images[seed * count :]
    x = images.float()
    return (x - x.mean()) / x.std()


def _output_covariance(conv: nn.Conv2d, images: Tensor) -> Tensor:
    """Covariance (second moment) of the convolution's outputs over every patch."""
    total, count = patch_second_moment(images, (conv.kernel_size[0], conv.kernel_size[1]))
    filters = conv.weight.detach().reshape(conv.out_channels, -1).double()
    return filters @ (total.double() / count) @ filters.T


@pytest.mark.parametrize("kernel", [3, 7])
def test_filters_whiten_the_patches_they_were_computed_from(kernel: int) -> None:
    images = _images()
    dim = kernel * kernel
    conv = nn.Conv2d(1, 2 * dim, kernel, bias=False)
    whiten_convolution_(conv, images)
    covariance = _output_covariance(conv, images)
    # The first d filters decorrelate the patches; each output's variance is 1 up to the eps
    # added to its eigenvalue, lambda / (lambda + eps), largest eigenvalue first.
    total, count = patch_second_moment(images, (kernel, kernel))
    eigenvalues = torch.linalg.eigvalsh(total.double() / count).flip(0)
    expected = torch.diag(eigenvalues / (eigenvalues + WHITENING_EPS))
    assert torch.allclose(covariance[:dim, :dim], expected, atol=2e-3)
    # ... and the last d are the same filters with the opposite sign.
    assert torch.equal(conv.weight[dim:], -conv.weight[:dim])
    # Before: the raw pixels of neighbouring positions are strongly correlated.
    raw = nn.Conv2d(1, dim, kernel, bias=False)
    raw.weight.data = torch.eye(dim).reshape(dim, 1, kernel, kernel)
    raw_covariance = _output_covariance(raw, images)
    assert raw_covariance[0, 1] / raw_covariance[0, 0] > 0.5


def test_more_filters_than_twice_the_patch_are_rotated_whitenings() -> None:
    images = _images()
    conv = nn.Conv2d(1, 64, 3, bias=False)  # 64 > 2 x 9
    whiten_convolution_(conv, images)
    covariance = _output_covariance(conv, images)
    # Each block of 9 filters after the first two is a rotation of the whitened basis:
    # its outputs are as decorrelated as the first block's, and differ from it.
    first, rotated = covariance[:9, :9], covariance[18:27, 18:27]
    identity = torch.eye(9, dtype=covariance.dtype)
    assert (rotated - identity).abs().max() <= (first - identity).abs().max() + 1e-3
    assert not torch.allclose(conv.weight[18:27], conv.weight[:9])
    assert torch.equal(conv.weight[27:36], -conv.weight[18:27])


def test_fewer_filters_keep_the_leading_directions() -> None:
    images = _images()
    total, count = patch_second_moment(images, (3, 3))
    six = whitening_filters(total / count, 6, (1, 3, 3)).reshape(6, 9)
    all_of_them = whitening_filters(total / count, 18, (1, 3, 3)).reshape(18, 9)
    # The three directions of largest variance, with both signs.
    assert torch.allclose(six[:3], all_of_them[:3])
    assert torch.allclose(six[3:], -all_of_them[:3])


def test_first_convolution_is_the_stem_and_must_exist() -> None:
    module = BarlowTwinsModule(
        Hyperparameters(backbone="resnet10", image_size=16, projector_dims=(16,), batch_size=8),
        in_channels=1,
    )
    assert first_convolution(module.backbone) is module.backbone.conv1
    with pytest.raises(ValueError, match="not a plain 2-D convolution"):
        first_convolution(nn.Sequential(nn.Linear(4, 4)))


class _FirstViews(L.Callback):
    """Keeps the views of the first step, as the module's own hook receives them after it."""

    views: Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == 0:
            views, _, _ = batch  # type: ignore[misc]
            self.views = torch.cat(views).clone()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_run_whitens_its_stem_from_the_first_views_and_keeps_it_frozen(
    tmp_path: Path, precision: str
) -> None:
    module = BarlowTwinsModule(
        Hyperparameters(
            backbone="resnet10",
            image_size=16,
            projector_dims=(16,),
            batch_size=8,
            whiten_stem=True,
            precision=precision,  # type: ignore[arg-type]
        ),
        in_channels=1,
    )
    first = _FirstViews()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[first],
    )
    trainer.fit(module, datamodule=BarlowTwinsDataModule(load_fashion_mnist("train").head(16), 8))
    stem = module.backbone.conv1
    assert not stem.weight.requires_grad
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(stem.weight) not in optimised
    assert any(p.requires_grad for p in module.backbone.parameters())
    # The stem is the whitening of step 0's views, and the three steps left it there.
    assert first.views is not None
    reference = nn.Conv2d(1, stem.out_channels, stem.kernel_size, bias=False)
    whiten_convolution_(reference, first.views)
    assert torch.equal(stem.weight, reference.weight)


def _whitening_worker(rank: int, world_size: int, images: Tensor, expected: Tensor) -> None:
    conv = nn.Conv2d(1, 98, 7, stride=2, bias=False)
    whiten_convolution_(conv, images.chunk(world_size)[rank])
    # Every rank holds the same filters, bit for bit ...
    gathered = [torch.empty_like(conv.weight) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, conv.weight.detach())
    assert all(torch.equal(other, gathered[0]) for other in gathered), rank
    # ... and they whiten the patches of all images, as one process's filters do.
    assert torch.allclose(_output_covariance(conv, images), expected, atol=2e-3), rank


def test_two_processes_whiten_with_the_patches_of_both() -> None:
    images = _images(16)
    single = nn.Conv2d(1, 98, 7, stride=2, bias=False)  # 2 x 49: the whole basis
    whiten_convolution_(single, images)
    expected = _output_covariance(single, images)
    run_distributed(_whitening_worker, 2, images, expected)
