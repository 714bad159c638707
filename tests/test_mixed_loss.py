from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _distributed import run_distributed
from barlowtwins import BarlowTwinsLoss
from barlowtwins.mixed_loss import MixedBarlowTwinsLoss, MixUp, mix_images


def _standardised(z: torch.Tensor) -> torch.Tensor:
    """Batch-norm standardisation (biased variance, eps 1e-5), as BarlowTwinsLoss uses."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def _reference_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    z_m: torch.Tensor,
    alpha: float,
    perm: torch.Tensor,
    lambda_param: float,
    mix_weight: float,
) -> torch.Tensor:
    """loss_bt + loss_mix of wgcban/mix-bt main.py (train, lines 52-84), six products as there."""
    n, d = z_a.shape
    a, b, m = _standardised(z_a), _standardised(z_b), _standardised(z_m)
    c = a.T @ b / n
    off_diagonal = ~torch.eye(d, dtype=torch.bool)
    loss_bt = (c.diagonal() - 1).pow(2).sum() + lambda_param * c[off_diagonal].pow(2).sum()
    mixed_with_a = m.T @ a / n
    target_a = alpha * (a.T @ a / n) + (1 - alpha) * (b[perm].T @ a / n)
    mixed_with_b = m.T @ b / n
    target_b = alpha * (a.T @ b / n) + (1 - alpha) * (b[perm].T @ b / n)
    loss_mix = (mixed_with_a - target_a).pow(2).sum() + (mixed_with_b - target_b).pow(2).sum()
    return loss_bt + mix_weight * lambda_param * loss_mix


def _embeddings(seed: int, n: int = 24, d: int = 10) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, dtype=torch.float64, generator=gen)
    z_b = z_a + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    z_m = 0.4 * z_a + 0.6 * z_b.roll(3, 0) + 0.3 * torch.randn(n, d, dtype=torch.float64)
    return tuple(z.requires_grad_() for z in (z_a, z_b, z_m))


@pytest.mark.parametrize(("lambda_param", "mix_weight"), [(5e-3, 4.0), (0.0078125, 2.0), (0.5, 1)])
def test_matches_reference_formula_values_and_gradients(
    lambda_param: float, mix_weight: float
) -> None:
    z_a, z_b, z_m = _embeddings(0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    alpha = 0.37

    loss_fn = MixedBarlowTwinsLoss(lambda_param=lambda_param, mix_weight=mix_weight)
    ours = loss_fn(z_a, z_b, z_m, alpha, perm)
    ours_grads = torch.autograd.grad(ours, (z_a, z_b, z_m))
    reference = _reference_loss(z_a, z_b, z_m, alpha, perm, lambda_param, mix_weight)
    reference_grads = torch.autograd.grad(reference, (z_a, z_b, z_m))

    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_terms_split_the_loss_and_the_regulariser_is_not_negligible() -> None:
    z_a, z_b, z_m = _embeddings(2)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    loss_fn = MixedBarlowTwinsLoss(lambda_param=5e-3, mix_weight=4.0, scale_loss=0.5)
    terms = loss_fn.terms(z_a, z_b, z_m, 0.6, perm)
    torch.testing.assert_close(terms.barlow_twins, 0.5 * BarlowTwinsLoss()(z_a, z_b))
    expected_total = 0.5 * _reference_loss(z_a, z_b, z_m, 0.6, perm, 5e-3, 4.0)
    torch.testing.assert_close(terms.barlow_twins + terms.mixed, expected_total)
    assert terms.mixed > 1e-3 * terms.barlow_twins


def test_mix_images_follows_the_reference_mixing() -> None:
    gen = torch.Generator().manual_seed(4)
    x_a, x_b = torch.rand(6, 1, 5, 5, generator=gen), torch.rand(6, 1, 5, 5, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    torch.testing.assert_close(mix_images(x_a, x_b, 0.25, perm), 0.25 * x_a + 0.75 * x_b[perm])


def test_mixup_draws_depend_on_seed_and_step_only() -> None:
    first, again = MixUp(seed=7).draw(32, step=5), MixUp(seed=7).draw(32, step=5)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    other_step, other_seed = MixUp(seed=7).draw(32, step=6), MixUp(seed=8).draw(32, step=5)
    assert other_step[0] != first[0] and not torch.equal(other_step[1], first[1])
    assert other_seed[0] != first[0]
    assert torch.equal(first[1].sort().values, torch.arange(32))


def test_alpha_is_uniform_like_beta_one_one() -> None:
    alphas = torch.tensor([MixUp(seed=0).draw(2, step)[0] for step in range(2000)])
    # Beta(1, 1) = U(0, 1): mean 1/2, variance 1/12; the bounds are 5 standard errors wide.
    assert abs(alphas.mean().item() - 0.5) < 5 * (1 / 12 / 2000) ** 0.5
    assert abs(alphas.var().item() - 1 / 12) < 0.01
    assert 0.0 <= alphas.min() < 0.01 and 0.99 < alphas.max() < 1.0


def _network() -> nn.Module:
    torch.manual_seed(5)
    # Non-linear, so that mixed inputs do not give mixed embeddings; no last bias (the loss is
    # shift-invariant, its gradient would be rounding noise around 0).
    return nn.Sequential(
        nn.Flatten(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6, bias=False)
    ).double()


def _images(seed: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_a = torch.rand(n, 1, 3, 3, dtype=torch.float64, generator=gen)
    x_b = x_a + 0.2 * torch.randn(n, 1, 3, 3, dtype=torch.float64, generator=gen)
    return x_a, x_b


def test_alpha_one_gives_the_barlow_twins_loss() -> None:
    x_a, x_b = _images(6)
    net = _network()
    images = mix_images(x_a, x_b, 1.0, torch.randperm(10))
    assert torch.equal(images, x_a)
    z_a, z_b = net(x_a), net(x_b)
    terms = MixedBarlowTwinsLoss().terms(z_a, z_b, net(images), 1.0, torch.randperm(10))
    assert terms.mixed.item() == 0.0
    torch.testing.assert_close(terms.barlow_twins, BarlowTwinsLoss()(z_a, z_b), rtol=0, atol=0)


def test_alpha_zero_and_identical_views_leave_no_residual() -> None:
    x_a, x_b = _images(7)
    net = _network()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(8))
    loss_fn = MixedBarlowTwinsLoss(mix_weight=1.0, lambda_param=1.0)
    # alpha = 0: the mixed images are the permuted second view, their embeddings z_b[perm].
    zero = loss_fn.terms(net(x_a), net(x_b), net(mix_images(x_a, x_b, 0.0, perm)), 0.0, perm)
    # Identical views with the identity permutation: any mixture is the view itself.
    identity = torch.arange(10)
    same = loss_fn.terms(
        net(x_a), net(x_a), net(mix_images(x_a, x_a, 0.4, identity)), 0.4, identity
    )
    generic = loss_fn.terms(net(x_a), net(x_b), net(mix_images(x_a, x_b, 0.4, perm)), 0.4, perm)
    assert zero.mixed < 1e-20 and same.mixed < 1e-20
    assert generic.mixed > 1e-4


def test_mix_weight_zero_is_barlow_twins() -> None:
    z_a, z_b, z_m = _embeddings(9)
    loss = MixedBarlowTwinsLoss(mix_weight=0.0)(z_a, z_b, z_m, 0.5, torch.randperm(24))
    torch.testing.assert_close(loss, BarlowTwinsLoss()(z_a, z_b), rtol=0, atol=0)


def test_a_second_backward_through_one_forward_is_a_clear_error() -> None:
    z_a, z_b, z_m = _embeddings(10)
    loss = MixedBarlowTwinsLoss()(z_a, z_b, z_m, 0.5, torch.randperm(24))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


def test_computes_in_float32_under_bf16_autocast() -> None:
    z_a, z_b, z_m = (z.detach().float() for z in _embeddings(11))
    perm = torch.randperm(24)
    expected = MixedBarlowTwinsLoss()(z_a, z_b, z_m, 0.3, perm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MixedBarlowTwinsLoss()(z_a.bfloat16(), z_b.bfloat16(), z_m.bfloat16(), 0.3, perm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=3e-2, atol=0)


_Z = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("z_m", "alpha", "perm", "message"),
    [
        (torch.randn(4, 5), 0.5, torch.arange(4), "z_mixed must have the shape"),
        (torch.randn(3, 3), 0.5, torch.arange(4), "z_mixed must have the shape"),
        (_Z, 1.5, torch.arange(4), "alpha must be in"),
        (_Z, -0.1, torch.arange(4), "alpha must be in"),
        (_Z, 0.5, torch.arange(5), "one entry per sample"),
        (_Z, 0.5, torch.arange(4).view(2, 2), "one entry per sample"),
        (_Z, 0.5, torch.tensor([0, 1, 1, 3]), "exactly once"),
        (_Z, 0.5, torch.tensor([0, 1, 2, 4]), "exactly once"),
        (_Z, 0.5, torch.arange(4.0), "integers"),
    ],
)
def test_bad_loss_input_raises_value_error(
    z_m: torch.Tensor, alpha: float, perm: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MixedBarlowTwinsLoss()(_Z, _Z.flip(0), z_m, alpha, perm)


def test_bad_settings_and_images_raise_value_error() -> None:
    with pytest.raises(ValueError, match="mix_weight"):
        MixedBarlowTwinsLoss(mix_weight=-1.0)
    with pytest.raises(ValueError, match="lambda_param"):
        MixedBarlowTwinsLoss(lambda_param=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        MixedBarlowTwinsLoss()(_Z, torch.randn(4, 2), _Z, 0.5, torch.arange(4))
    with pytest.raises(ValueError, match="must be 2-D"):
        z = torch.randn(4, 3, 2)
        MixedBarlowTwinsLoss()(z, z, z, 0.5, torch.arange(4))
    with pytest.raises(ValueError, match="batch size must be >= 2"):
        z = torch.randn(1, 3)
        MixedBarlowTwinsLoss()(z, z, z, 0.5, torch.arange(1))
    with pytest.raises(ValueError, match="same shape"):
        mix_images(torch.rand(4, 1, 2, 2), torch.rand(4, 1, 2, 3), 0.5, torch.arange(4))
    with pytest.raises(ValueError, match="alpha must be in"):
        mix_images(torch.rand(4, 2), torch.rand(4, 2), 2.0, torch.arange(4))
    with pytest.raises(ValueError, match="step must be >= 0"):
        MixUp().draw(8, step=-1)


# Rank 1's shard is smaller and has other statistics; seed and step make the permutation pair
# samples across the two shards (checked in the worker).
_SHARD_SIZES = (6, 4)
_SEED, _STEP = 11, 3


def _global_images() -> tuple[torch.Tensor, torch.Tensor]:
    x_a, x_b = _images(12, sum(_SHARD_SIZES))
    x_a[_SHARD_SIZES[0] :] = x_a[_SHARD_SIZES[0] :] * 3.0 - 1.0
    x_b[_SHARD_SIZES[0] :] = x_b[_SHARD_SIZES[0] :] * 0.5 + 2.0
    return x_a, x_b


def _step(
    model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, gather_distributed: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One Mixed Barlow Twins step's loss, mixed images and embeddings (with their gradients)."""
    mixed = MixUp(seed=_SEED, gather_distributed=gather_distributed)(x_a, x_b, step=_STEP)
    embeddings = tuple(model(x) for x in (x_a, x_b, mixed.images))
    for z in embeddings:
        z.retain_grad()
    loss_fn = MixedBarlowTwinsLoss(
        lambda_param=0.05, mix_weight=4.0, gather_distributed=gather_distributed
    )
    loss = loss_fn(*embeddings, mixed.alpha, mixed.permutation)
    loss.backward()
    return loss, mixed.images, embeddings


def _exactness_worker(rank: int, world_size: int) -> None:
    x_a, x_b = _global_images()
    single = _network()
    expected_loss, expected_images, expected_embeddings = _step(single, x_a, x_b, False)

    start = sum(_SHARD_SIZES[:rank])
    shard = slice(start, start + _SHARD_SIZES[rank])
    perm = MixUp(seed=_SEED).draw(sum(_SHARD_SIZES), _STEP)[1]
    partners = perm[shard]
    assert ((partners < start) | (partners >= shard.stop)).any(), "no cross-rank pair"

    model = DistributedDataParallel(_network())
    loss, images, embeddings = _step(model, x_a[shard], x_b[shard], True)

    assert torch.equal(images, expected_images[shard])
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    for name, z, expected in zip("abm", embeddings, expected_embeddings, strict=True):
        # Every rank holds the global loss: its inputs get world_size times their gradient.
        got = z.grad / world_size
        relative = (got - expected.grad[shard]).norm() / expected.grad[shard].norm()
        assert relative < 1e-10, f"rank {rank}: z_{name} gradient relative error {relative:.3g}"
    for (name, param), expected in zip(
        model.module.named_parameters(), single.parameters(), strict=True
    ):
        relative = (param.grad - expected.grad).norm() / expected.grad.norm()
        assert relative < 1e-10, f"rank {rank}: {name} gradient relative error {relative:.3g}"


def test_gather_distributed_equals_one_process_on_global_batch() -> None:
    run_distributed(_exactness_worker, 2)
