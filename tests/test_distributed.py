"""A W-process DDP step equals one process on the global batch: whole model, real gloo."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _distributed import run_distributed
from barlowtwins import BarlowTwinsLoss
from barlowtwins.hparams import Hyperparameters
from barlowtwins.model import BarlowTwins
from barlowtwins.nn.distributed import (
    GlobalBatchNorm,
    convert_to_global_batchnorm,
    revert_global_batchnorm,
    sync_batchnorm,
)
from barlowtwins.training.callbacks import GlobalBatchNormSync, training_device
from barlowtwins.training.module import BarlowTwinsModule

_PER_RANK = 4


class _TwoViews(nn.Module):
    """One DDP forward per step for both views, as Lightning's training_step does."""

    def __init__(self, model: BarlowTwins) -> None:
        super().__init__()
        self.model = model

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(view_a), self.model(view_b)


def _model() -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins.from_name(
        "resnet18", in_channels=1, small_image=True, projector_dims=(32, 32, 16)
    ).double()


def _views(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of the global batch; each rank's shard has its own brightness and contrast."""
    gen = torch.Generator().manual_seed(1)
    view_a = torch.rand(world_size * _PER_RANK, 1, 8, 8, dtype=torch.float64, generator=gen)
    view_b = view_a.flip(-1) + 0.1 * torch.randn(view_a.shape, dtype=torch.float64, generator=gen)
    for rank in range(world_size):
        shard = slice(rank * _PER_RANK, (rank + 1) * _PER_RANK)
        view_a[shard] = view_a[shard] * (1 + 2 * rank) + 3 * rank
        view_b[shard] = view_b[shard] * (1 + rank) - rank
    return view_a, view_b


def _whole_model_worker(rank: int, world_size: int) -> None:
    view_a, view_b = _views(world_size)

    single = _model()
    expected_loss = BarlowTwinsLoss()(single(view_a), single(view_b))
    expected_loss.backward()

    shard = slice(rank * _PER_RANK, (rank + 1) * _PER_RANK)
    model = DistributedDataParallel(_TwoViews(convert_to_global_batchnorm(_model())))
    loss = BarlowTwinsLoss(gather_distributed=True)(*model(view_a[shard], view_b[shard]))
    loss.backward()

    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    checked = 0
    for (name, got), expected in zip(
        model.module.model.named_parameters(), single.parameters(), strict=True
    ):
        # Parameters whose true gradient is ~0 (e.g. shift-invariant biases) compare absolutely.
        scale = max(expected.grad.norm().item(), 1e-8)
        relative = ((got.grad - expected.grad).norm() / scale).item()
        assert relative < 1e-6, f"rank {rank}: {name} gradient relative error {relative:.3g}"
        checked += 1
    assert checked > 60  # backbone and projector
    # Running statistics follow the global batch too.
    for got, expected in zip(model.module.model.buffers(), single.buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_ddp_step_equals_one_process_on_global_batch() -> None:
    run_distributed(_whole_model_worker, 2)


def test_global_batchnorm_is_plain_batchnorm_without_process_group() -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3)
    converted = convert_to_global_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.running_var, reference.running_var)


def test_conversion_shares_parameters_and_reverts_to_original_class() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    weight = model[1].weight
    converted = convert_to_global_batchnorm(model)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert converted[1].weight is weight
    reverted = revert_global_batchnorm(converted)
    assert type(reverted[1]) is nn.BatchNorm1d
    assert reverted[1].weight is weight


@pytest.mark.parametrize(
    ("device", "layer"), [("cuda", nn.SyncBatchNorm), ("cpu", GlobalBatchNorm)]
)
def test_the_batch_norm_sync_is_chosen_from_the_training_device(
    device: str, layer: type[nn.Module]
) -> None:
    # The decision needs no GPU: torch's converter only swaps the classes.
    model = sync_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), device)
    assert type(model[1]) is layer


def test_the_plugin_asks_the_trainer_not_the_parameters_where_training_runs() -> None:
    module = BarlowTwinsModule(
        Hyperparameters(backbone="resnet10", image_size=16, batch_size=8), in_channels=1
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    # Lightning attaches the module before the DDP strategy applies the plugin, and applies it
    # before it moves the parameters to the GPU: they are not where training will run.
    module.trainer = trainer
    module.to("meta")
    assert training_device(module) == trainer.strategy.root_device == torch.device("cpu")
    synced = GlobalBatchNormSync().apply(module)
    assert any(isinstance(m, GlobalBatchNorm) for m in synced.modules())
