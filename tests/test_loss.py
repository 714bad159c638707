from __future__ import annotations

import pytest
import torch
from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _distributed import run_distributed
from barlowtwins import BarlowTwinsLoss
from barlowtwins.loss import cross_correlation, multi_view_loss

# The paper's projector width (Zbontar et al. 2021, section 2).
_PAPER_DIM = 8192


def _paper_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """Algorithm 1 of the paper, written with an explicit mask (BatchNorm-style statistics)."""
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + 1e-5)
    z_b_norm = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + 1e-5)
    c = z_a_norm.T @ z_b_norm / n
    c_diff = (c - torch.eye(d, dtype=c.dtype)).pow(2)
    off_diagonal = ~torch.eye(d, dtype=torch.bool)
    c_diff[off_diagonal] *= lambda_param
    return c_diff.sum()


def _official_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """The released code's form (facebookresearch/barlowtwins, main.py), in the inputs' dtype.

    A batch norm without affine parameters in training mode standardises each view, and
    ``c = bn(z_a).T @ bn(z_b) / N``; its sums are torch's own reductions.
    """
    batch_norm = nn.BatchNorm1d(z_a.size(1), affine=False, dtype=z_a.dtype)
    c = batch_norm(z_a).T @ batch_norm(z_b) / z_a.size(0)
    on_diag = (torch.diagonal(c) - 1).square().sum()
    off_diag = c.fill_diagonal_(0).square().sum()
    return on_diag + lambda_param * off_diag


def _float64_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """Eq. 1 in float64 through the B x B Gram matrices instead of the D x D matrix c.

    ``||A^T B||^2 = sum((A A^T) * (B B^T))``: B^2 D products instead of B D^2, so a float64
    reference at D = 8192 takes milliseconds, and it shares no code path with the loss.
    """
    a, b = (
        (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        for z in (z_a.double(), z_b.double())
    )
    n = z_a.size(0)
    diagonal = (a * b).sum(0) / n
    squares = ((a @ a.T) * (b @ b.T)).sum() / n**2
    return (1 - diagonal).square().sum() + lambda_param * (squares - diagonal.square().sum())


def _views(batch: int, dim: int, noise: float | None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Independent views (``noise`` None) or ``z_b = z_a + noise * N(0, 1)``, float32."""
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(batch, dim, generator=gen)
    if noise is None:
        return z_a, torch.randn(batch, dim, generator=gen)
    return z_a, z_a + noise * torch.randn(batch, dim, generator=gen)


@pytest.mark.parametrize(
    ("batch", "noise", "lambda_param"),
    [
        (32, None, 5e-3),
        (32, 0.01, 5e-3),
        (256, None, 5e-3),
        (256, 0.01, 5e-3),
        # The invariance term alone with c_ii within 1e-4 of 1: 1 - c_ii must not cancel.
        (32, 0.01, 0.0),
        (256, 0.001, 0.0),
    ],
)
def test_float32_loss_equals_float64_at_paper_size(
    batch: int, noise: float | None, lambda_param: float
) -> None:
    z_a, z_b = _views(batch, _PAPER_DIM, noise)
    got = BarlowTwinsLoss(lambda_param=lambda_param)(z_a, z_b)
    expected = _float64_loss(z_a, z_b, lambda_param)
    assert got.dtype == torch.float32
    relative = ((got.double() - expected).abs() / expected).item()
    assert relative < 1e-6, (
        f"float32 loss {got.item()} vs float64 {expected.item()}: {relative:.2e}"
    )


def test_gram_reference_agrees_with_the_d_by_d_form_in_float64() -> None:
    z_a, z_b = (z.double() for z in _views(16, 40, 0.1))
    torch.testing.assert_close(
        _float64_loss(z_a, z_b, 5e-3), _paper_loss(z_a, z_b, 5e-3), rtol=1e-12, atol=0
    )


def test_float32_cross_correlation_equals_float64() -> None:
    z_a, z_b = _views(64, 2048, 0.01)
    got = cross_correlation(z_a, z_b)
    expected = cross_correlation(z_a.double(), z_b.double())
    assert got.dtype == torch.float32
    error = torch.linalg.vector_norm(got.double() - expected) / torch.linalg.vector_norm(expected)
    assert error < 1e-6


def test_cross_correlation_is_float32_under_bf16_autocast() -> None:
    z_a, z_b = _views(32, 64, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_correlation(z_a, z_b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, cross_correlation(z_a, z_b))


def test_float32_value_equals_the_official_code_under_allclose() -> None:
    z_a, z_b = _views(32, _PAPER_DIM, None)
    assert torch.allclose(BarlowTwinsLoss()(z_a, z_b), _official_loss(z_a, z_b, 5e-3))


def test_float32_value_equals_lightly_under_allclose() -> None:
    z_a, z_b = _views(32, _PAPER_DIM, 0.1)
    ours = BarlowTwinsLoss(lambda_param=5e-3)(z_a, z_b)
    assert torch.allclose(ours, LightlyBarlowTwinsLoss(lambda_param=5e-3)(z_a, z_b))


def test_float32_affine_map_of_one_view_keeps_the_loss_under_allclose() -> None:
    # Invariant up to the batch-norm epsilon: 8e-6 relative here, in float64 as in float32.
    x, _ = _views(32, 1024, None)
    loss_fn = BarlowTwinsLoss()
    assert torch.allclose(loss_fn(x, x), loss_fn(x, 2 * x + 4))


def test_gather_distributed_without_torch_distributed_is_rejected_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[None] = []

    def unavailable() -> bool:
        calls.append(None)
        return False

    monkeypatch.setattr(torch.distributed, "is_available", unavailable)
    with pytest.raises(ValueError, match=r"needs torch\.distributed"):
        BarlowTwinsLoss(gather_distributed=True)
    assert len(calls) == 1
    BarlowTwinsLoss(gather_distributed=False)  # needs no torch.distributed


def test_gather_distributed_is_accepted_where_torch_distributed_exists() -> None:
    assert torch.distributed.is_available()
    assert BarlowTwinsLoss(gather_distributed=True).gather_distributed


@pytest.mark.parametrize("lambda_param", [5e-3, 0.0051, 0.5])
def test_matches_paper_pseudocode_values_and_gradients(lambda_param: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(32, 20, dtype=torch.float64, generator=gen).requires_grad_()
    z_b = z_a.detach() * 0.5 + torch.randn(32, 20, dtype=torch.float64, generator=gen)
    z_b.requires_grad_()

    ours = BarlowTwinsLoss(lambda_param=lambda_param)(z_a, z_b)
    ours_grads = torch.autograd.grad(ours, (z_a, z_b))
    reference = _paper_loss(z_a, z_b, lambda_param)
    reference_grads = torch.autograd.grad(reference, (z_a, z_b))

    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradient_flows_to_one_input_when_the_other_is_frozen() -> None:
    gen = torch.Generator().manual_seed(1)
    z_a = torch.randn(16, 12, dtype=torch.float64, generator=gen).requires_grad_()
    target = torch.randn(16, 12, dtype=torch.float64, generator=gen)
    loss_fn = BarlowTwinsLoss()
    (got,) = torch.autograd.grad(loss_fn(z_a, target) * 3.0, z_a)
    (expected,) = torch.autograd.grad(_paper_loss(z_a, target, 5e-3) * 3.0, z_a)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_repeated_forward_backward_gives_the_same_gradients() -> None:
    z_a = torch.randn(8, 6, requires_grad=True)
    z_b = torch.randn(8, 6, requires_grad=True)
    loss_fn = BarlowTwinsLoss()
    first = torch.autograd.grad(loss_fn(z_a, z_b), (z_a, z_b))
    second = torch.autograd.grad(loss_fn(z_a, z_b), (z_a, z_b))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_a_second_backward_through_one_forward_is_a_clear_error() -> None:
    z_a = torch.randn(8, 6, requires_grad=True)
    loss = BarlowTwinsLoss()(z_a, torch.randn(8, 6))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


def test_identical_standardised_views_give_zero_on_diagonal_term() -> None:
    z = torch.randn(64, 8, dtype=torch.float64)
    loss = BarlowTwinsLoss(lambda_param=0.0)(z, z)
    # c_ii = var / (var + eps), so the on-diagonal term is tiny but not exactly zero.
    assert 0 <= loss.item() < 1e-8


def test_invariant_to_per_feature_affine_maps() -> None:
    gen = torch.Generator().manual_seed(1)
    z_a = torch.randn(16, 6, dtype=torch.float64, generator=gen)
    z_b = torch.randn(16, 6, dtype=torch.float64, generator=gen)
    scale = torch.rand(6, dtype=torch.float64, generator=gen) * 10 + 1
    shift = torch.randn(6, dtype=torch.float64, generator=gen) * 100
    loss_fn = BarlowTwinsLoss()
    # Exact up to the batch-norm epsilon, which weighs less as the variance grows.
    torch.testing.assert_close(
        loss_fn(z_a * scale + shift, z_b), loss_fn(z_a, z_b), rtol=1e-5, atol=0
    )


def test_computes_in_float32_under_bf16_autocast() -> None:
    gen = torch.Generator().manual_seed(2)
    z_a = torch.randn(64, 512, generator=gen)
    z_b = z_a + 0.1 * torch.randn(64, 512, generator=gen)
    expected = BarlowTwinsLoss()(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = BarlowTwinsLoss()(z_a.bfloat16(), z_b.bfloat16())
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs, not the arithmetic of the loss.
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)


def test_float64_input_stays_float64() -> None:
    z = torch.randn(4, 3, dtype=torch.float64)
    assert BarlowTwinsLoss()(z, z.flip(0)).dtype == torch.float64


@pytest.mark.parametrize(
    ("z_a", "z_b", "message"),
    [
        (torch.randn(1, 4), torch.randn(1, 4), "batch size must be >= 2"),
        (torch.randn(4, 3), torch.randn(4, 5), "same shape"),
        (torch.randn(5, 3), torch.randn(4, 3), "same shape"),
        (torch.randn(4, 3, 2), torch.randn(4, 3, 2), "must be 2-D"),
        (torch.randn(4), torch.randn(4), "must be 2-D"),
    ],
)
def test_bad_input_raises_value_error(z_a: torch.Tensor, z_b: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BarlowTwinsLoss()(z_a, z_b)


def test_negative_lambda_is_rejected() -> None:
    with pytest.raises(ValueError, match="lambda_param"):
        BarlowTwinsLoss(lambda_param=-1.0)


# Shards with different statistics and sizes: rank 1's inputs are shifted and scaled.
_SHARD_SIZES = (6, 4)


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x_a = torch.randn(sum(_SHARD_SIZES), 5, dtype=torch.float64, generator=gen)
    x_b = x_a + 0.3 * torch.randn(sum(_SHARD_SIZES), 5, dtype=torch.float64, generator=gen)
    x_a[_SHARD_SIZES[0] :] = x_a[_SHARD_SIZES[0] :] * 4.0 + 3.0
    x_b[_SHARD_SIZES[0] :] = x_b[_SHARD_SIZES[0] :] * 0.2 - 5.0
    return x_a, x_b


def _projection() -> torch.nn.Linear:
    torch.manual_seed(4)
    # No bias: the loss is shift-invariant, so a bias gradient is rounding noise around 0.
    return torch.nn.Linear(5, 7, bias=False).double()


def _check_replicated_batch() -> None:
    """Every rank holds the same batch, so the global batch is that batch repeated.

    Repeating a batch changes neither its statistics nor c: the global loss is the
    single-process loss. Each rank's input gradient is world_size times its copy's share,
    i.e. the single-process gradient, which DDP's average leaves as it is.
    """
    z_a, z_b = _views(16, 64, 0.5, seed=5)
    single = [z.clone().requires_grad_() for z in (z_a, z_b)]
    expected = BarlowTwinsLoss()(*single)
    expected.backward()
    local = [z.clone().requires_grad_() for z in (z_a, z_b)]
    loss = BarlowTwinsLoss(gather_distributed=True)(*local)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(local, single, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def _exactness_worker(rank: int, world_size: int) -> None:
    # One pool of processes for both checks: starting one costs ~10-25 s on this machine.
    _check_replicated_batch()
    x_a, x_b = _global_inputs()

    single = _projection()
    expected_loss = BarlowTwinsLoss()(single(x_a), single(x_b))
    expected_loss.backward()

    start = sum(_SHARD_SIZES[:rank])
    shard = slice(start, start + _SHARD_SIZES[rank])
    model = DistributedDataParallel(_projection())
    loss = BarlowTwinsLoss(gather_distributed=True)(model(x_a[shard]), model(x_b[shard]))
    loss.backward()

    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    got, expected = model.module.weight.grad, single.weight.grad
    relative = (got - expected).norm() / expected.norm()
    assert relative < 1e-10, f"rank {rank}: gradient relative error {relative:.3g}"
    _check_three_views(shard)


def _check_three_views(shard: slice) -> None:
    """The mean over view pairs is exact too: W shards of 3 views equal 1 process."""
    x_a, x_b = _global_inputs()
    x_c = x_a.flip(1) + 0.1 * x_b
    single = _projection()
    expected_loss = multi_view_loss(BarlowTwinsLoss(), [single(x) for x in (x_a, x_b, x_c)])
    expected_loss.backward()
    model = DistributedDataParallel(_projection())
    criterion = BarlowTwinsLoss(gather_distributed=True)
    loss = multi_view_loss(criterion, [model(x[shard]) for x in (x_a, x_b, x_c)])
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    got, expected = model.module.weight.grad, single.weight.grad
    assert (got - expected).norm() / expected.norm() < 1e-10


def test_gather_distributed_equals_one_process_on_global_batch() -> None:
    """Float32 replicated batches (lightly's case), then float64 shards of different sizes."""
    run_distributed(_exactness_worker, 2)


def _naive_allreduce_worker(rank: int, world_size: int) -> None:
    """The official code's recipe (in-place all_reduce of c) loses a factor W in gradients."""
    import torch.distributed as dist

    x_a, x_b = _global_inputs()
    single = _projection()
    BarlowTwinsLoss()(single(x_a), single(x_b)).backward()
    expected = single.weight.grad

    shard = slice(0, 6) if rank == 0 else slice(6, 10)
    model = DistributedDataParallel(_projection())
    z_a, z_b = model(x_a[shard]), model(x_b[shard])
    # Stand-in for the anchors: global statistics are already exact here, only c is summed.
    z_a = (z_a - z_a.detach().mean(0)) / z_a.detach().std(0)
    z_b = (z_b - z_b.detach().mean(0)) / z_b.detach().std(0)
    c = z_a.T @ z_b / 10
    dist.all_reduce(c)
    ((1 - c.diagonal()).square().sum()).backward()
    ratio = model.module.weight.grad.norm() / expected.norm()
    # Not a check of our code: documents why the differentiable collective is needed.
    assert ratio < 0.9, f"expected the naive all_reduce to shrink gradients, ratio {ratio:.3f}"


def test_naive_in_place_all_reduce_is_not_exact() -> None:
    run_distributed(_naive_allreduce_worker, 2)


def test_multi_view_loss_is_the_mean_over_pairs() -> None:
    z = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss = BarlowTwinsLoss()
    assert multi_view_loss(loss, z[:2]) == loss(z[0], z[1])
    pairs = loss(z[0], z[1]) + loss(z[0], z[2]) + loss(z[1], z[2])
    torch.testing.assert_close(multi_view_loss(loss, z), pairs / 3)
    with pytest.raises(ValueError, match="at least two views"):
        multi_view_loss(loss, z[:1])
