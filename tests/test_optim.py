"""Tests of LARS, parameter splitting, learning-rate scaling and the warm-up cosine schedule."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from barlowtwins.optim import (
    LARS,
    OPTIMIZERS,
    WarmupCosine,
    build_optimizer,
    build_warmup_cosine_scheduler,
    scale_lr,
    split_parameters,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, final_factor: float = 0.001
) -> float:
    """The schedule written out once more: linear warm-up to 1, then the cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return final_factor
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    q = 0.5 * (1.0 + math.cos(math.pi * progress))
    return q + final_factor * (1.0 - q)


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=gen)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def _reference_lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    eta: float,
    exclude: bool,
) -> None:
    """Plain per-parameter LARS, written independently of the foreach implementation."""
    for p, g, mu in zip(params, grads, buffers, strict=True):
        g = g.clone()
        if not exclude:
            g = g + weight_decay * p
            p_norm, g_norm = p.norm(), g.norm()
            trust = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
            g = trust * g
        mu.mul_(momentum).add_(g)
        p.sub_(lr * mu)


def test_split_parameters_puts_biases_and_norms_apart() -> None:
    model = _model()
    weights, rest = split_parameters(model)
    assert {id(p) for p in weights} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in rest} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }


def test_lars_groups_from_build_optimizer_exclude_biases_and_norms() -> None:
    model = _model()
    opt = build_optimizer(model, batch_size=256, weight_decay=0.1)
    weights_group, excluded_group = opt.param_groups
    assert not weights_group["lars_exclude"] and weights_group["weight_decay"] == 0.1
    assert excluded_group["lars_exclude"] and excluded_group["weight_decay"] == 0.0
    assert len(excluded_group["params"]) == 4


def test_excluded_params_get_plain_momentum_sgd_without_weight_decay() -> None:
    model = _model()
    opt = build_optimizer(model, batch_size=512, lr_biases=0.01, weight_decay=0.5, momentum=0.9)
    excluded = opt.param_groups[1]["params"]
    lr = opt.param_groups[1]["lr"]
    assert lr == pytest.approx(0.02)
    start = [p.detach().clone() for p in excluded]
    buffers = [torch.zeros_like(p) for p in excluded]
    for seed in range(3):
        _backward(model, seed)
        grads = [p.grad.clone() for p in excluded]
        opt.step()
        for i, (expected, g) in enumerate(zip(start, grads, strict=True)):
            buffers[i] = 0.9 * buffers[i] + g
            start[i] = expected - lr * buffers[i]
    for p, expected in zip(excluded, start, strict=True):
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("weight_decay", [0.0, 1.5e-2])
def test_lars_foreach_step_matches_reference(weight_decay: float) -> None:
    model = _model()
    reference = _model()
    weights, rest = split_parameters(model)
    opt = LARS(
        [{"params": weights}, {"params": rest, "lars_exclude": True, "weight_decay": 0.0}],
        lr=0.3,
        weight_decay=weight_decay,
        momentum=0.8,
        eta=0.02,
    )
    ref_weights, ref_rest = split_parameters(reference)
    ref_buffers = {id(p): torch.zeros_like(p) for p in reference.parameters()}
    for seed in range(4):
        _backward(model, seed)
        _backward(reference, seed)
        opt.step()
        with torch.no_grad():
            for group, exclude, decay in ((ref_weights, False, weight_decay), (ref_rest, True, 0)):
                _reference_lars_step(
                    group,
                    [p.grad for p in group],
                    [ref_buffers[id(p)] for p in group],
                    lr=0.3,
                    weight_decay=decay,
                    momentum=0.8,
                    eta=0.02,
                    exclude=exclude,
                )
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_lars_does_not_modify_gradients() -> None:
    model = _model()
    opt = LARS(model.parameters(), lr=0.1, weight_decay=0.1)
    _backward(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_lars_zero_norms_give_finite_updates() -> None:
    zero_param = nn.Parameter(torch.zeros(3, 4))
    zero_grad = nn.Parameter(torch.ones(2, 2))
    zero_param.grad = torch.ones(3, 4)
    zero_grad.grad = torch.zeros(2, 2)
    opt = LARS([zero_param, zero_grad], lr=0.5, momentum=0.0, eta=0.001)
    opt.step()
    # Trust ratio falls back to 1: a zero parameter moves by lr * grad, a zero gradient not at all.
    torch.testing.assert_close(zero_param.detach(), torch.full((3, 4), -0.5))
    torch.testing.assert_close(zero_grad.detach(), torch.ones(2, 2))


def test_lars_skips_params_without_grad_and_rejects_sparse() -> None:
    used, unused = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    used.grad = torch.ones(2, 2)
    opt = LARS([used, unused], lr=0.1)
    opt.step()
    assert unused not in opt.state
    torch.testing.assert_close(unused.detach(), torch.ones(2, 2))
    assert not torch.equal(used.detach(), torch.ones(2, 2))

    embedding = nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        LARS(embedding.parameters(), lr=0.1).step()


def test_lars_closure_returns_loss() -> None:
    model = _model()
    opt = LARS(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), Tensor)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "eta": 0}, "eta"),
    ],
)
def test_lars_rejects_bad_hyperparameters(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LARS(_model().parameters(), **kwargs)


def test_lars_state_dict_round_trip_continues_identically() -> None:
    model = _model()
    opt = build_optimizer(model, batch_size=256)
    for seed in range(2):
        _backward(model, seed)
        opt.step()

    clone = _model()
    clone.load_state_dict(model.state_dict())
    clone_opt = build_optimizer(clone, batch_size=256)
    # Through bytes, as a checkpoint would: loading an in-memory state dict shares its tensors.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone_opt.load_state_dict(torch.load(buffer))
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], clone_opt.state[q]["momentum_buffer"]
        )

    _backward(model, 7)
    _backward(clone, 7)
    opt.step()
    clone_opt.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_scale_lr_is_linear_in_global_batch() -> None:
    assert scale_lr(0.2, 256) == pytest.approx(0.2)
    assert scale_lr(0.2, 2048) == pytest.approx(1.6)
    assert scale_lr(0.0048, 128) == pytest.approx(0.0024)
    with pytest.raises(ValueError, match="batch_size"):
        scale_lr(0.2, 0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_each_name_steps(name: str) -> None:
    # No bias directly before batch norm here: its gradient would be round-off only.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, 3))
    opt = build_optimizer(model, name=name, batch_size=512, lr_weights=0.2, lr_biases=0.01)
    expected = (0.2, 0.01) if name == "adamw" else (0.4, 0.02)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(list(expected))
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx(list(expected))
    assert opt.param_groups[1]["weight_decay"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 0)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_build_optimizer_types_and_unknown_name() -> None:
    model = _model()
    assert isinstance(build_optimizer(model, batch_size=64), LARS)
    assert isinstance(build_optimizer(model, name="sgd", batch_size=64), torch.optim.SGD)
    assert isinstance(build_optimizer(model, name="adamw", batch_size=64), torch.optim.AdamW)
    with pytest.raises(ValueError, match="lars, sgd, adamw"):
        build_optimizer(model, name="adam", batch_size=64)


def test_build_optimizer_drops_empty_group() -> None:
    opt = build_optimizer(nn.Linear(3, 2, bias=False), batch_size=256)
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer(nn.ReLU(), batch_size=256)


def test_warmup_cosine_key_values() -> None:
    schedule = WarmupCosine(warmup_steps=10, total_steps=110, final_factor=0.001)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5 + 0.5 * 0.001)
    assert schedule(110) == pytest.approx(0.001)
    assert schedule(500) == pytest.approx(0.001)
    assert WarmupCosine(warmup_steps=0, total_steps=4)(0) == pytest.approx(1.0)


def test_warmup_cosine_is_monotone() -> None:
    schedule = WarmupCosine(warmup_steps=7, total_steps=50)
    values = [schedule(s) for s in range(60)]
    warmup, decay = values[:7], values[6:]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert all(0 < v <= 1 for v in values)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": 5, "total_steps": 0},
        {"warmup_steps": 6, "total_steps": 5},
        {"warmup_steps": -1, "total_steps": 5},
        {"warmup_steps": 1, "total_steps": 5, "final_factor": 2.0},
    ],
)
def test_warmup_cosine_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WarmupCosine(**kwargs)


def test_scheduler_follows_warmup_cosine_per_step() -> None:
    model = _model()
    opt = build_optimizer(model, batch_size=512)
    peak = [g["lr"] for g in opt.param_groups]
    scheduler = build_warmup_cosine_scheduler(opt, warmup_steps=3, total_steps=12)
    for step in range(14):
        factor = _warmup_cosine(step, warmup_steps=3, total_steps=12)
        for group, lr in zip(opt.param_groups, peak, strict=True):
            assert group["lr"] == pytest.approx(lr * factor)
        _backward(model, step)
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(peak[0] * 0.001)
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))


def test_warmup_cosine_object_equals_the_formula_until_its_end_moves() -> None:
    kw = {"warmup_steps": 7, "total_steps": 50, "final_factor": 0.01}
    schedule = WarmupCosine(**kw)
    assert [schedule(s) for s in range(60)] == [_warmup_cosine(s, **kw) for s in range(60)]


@pytest.mark.parametrize("new_end", [30, 120])
def test_moving_the_end_continues_the_decay_without_a_jump(new_end: int) -> None:
    schedule = WarmupCosine(warmup_steps=10, total_steps=60, final_factor=0.001)
    before = [schedule(s) for s in range(26)]
    schedule.end_at(new_end, step=25)
    after = [schedule(s) for s in range(new_end + 5)]
    # The steps taken keep their factors, the next one too; then the decay runs to the new end.
    assert after[:26] == pytest.approx(before, rel=1e-12)
    assert all(a > b for a, b in itertools.pairwise(after[25:new_end]))
    assert after[new_end - 1] > 0.001 and after[new_end:] == [0.001] * 5
    # Twice over, the second move continues from the first.
    factor = schedule(new_end - 3)
    schedule.end_at(new_end + 10, step=new_end - 3)
    assert (
        schedule(new_end - 3) == pytest.approx(factor, rel=1e-12)
        and schedule(new_end + 10) == 0.001
    )


def test_moving_the_end_during_warm_up_keeps_or_shortens_it() -> None:
    kept = WarmupCosine(warmup_steps=10, total_steps=60)
    kept.end_at(20, step=4)
    assert [kept(s) for s in range(11)] == [
        _warmup_cosine(s, warmup_steps=10, total_steps=20) for s in range(11)
    ]
    cut = WarmupCosine(warmup_steps=10, total_steps=60, final_factor=0.001)
    cut.end_at(6, step=3)
    assert [cut(s) for s in range(8)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 0.001, 0.001]


def test_moving_the_end_rejects_an_end_not_ahead_or_a_finished_decay() -> None:
    schedule = WarmupCosine(warmup_steps=2, total_steps=10)
    with pytest.raises(ValueError, match="must be > step=5"):
        schedule.end_at(5, step=5)
    with pytest.raises(ValueError, match="the decay ended at step 10"):
        schedule.end_at(20, step=10)


def test_a_moved_schedule_survives_the_schedulers_state_dict() -> None:
    model = _model()
    opt = build_optimizer(model, batch_size=256)
    scheduler = build_warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=10)
    for step in range(5):
        _backward(model, step)
        opt.step()
        scheduler.step()
    scheduler.lr_lambdas[0].end_at(30, step=5)
    state = scheduler.state_dict()

    fresh_opt = build_optimizer(_model(), batch_size=256)
    fresh_opt.load_state_dict(opt.state_dict())
    fresh = build_warmup_cosine_scheduler(fresh_opt, warmup_steps=2, total_steps=10)
    fresh.load_state_dict(state)
    for _ in range(10):
        scheduler.step()
        fresh.step()
        assert fresh.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert fresh.lr_lambdas[0].total_steps == 30


@pytest.mark.parametrize("moved", [False, True])
def test_a_resume_keeps_a_moved_schedule_and_else_the_new_runs_own(moved: bool) -> None:
    def scheduler(total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        opt = build_optimizer(_model(), batch_size=256)
        return build_warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=total_steps)

    saved = scheduler(10)
    for _ in range(4):
        saved.optimizer.step()
        saved.step()
    if moved:  # as TimeBudget does: the run itself decided on 30 steps
        saved.lr_lambdas[0].end_at(30, step=4)
    # Rerun with a config of 20 steps (say, --epochs raised on resume).
    resumed = scheduler(20)
    resumed.load_state_dict(saved.state_dict())
    expected = 30 if moved else 20
    assert resumed.last_epoch == 4 and resumed.lr_lambdas[0].total_steps == expected
    resumed.optimizer.step()
    resumed.step()
    factor = resumed.get_last_lr()[0] / resumed.base_lrs[0]
    reference = saved.lr_lambdas[0] if moved else WarmupCosine(warmup_steps=2, total_steps=20)
    assert factor == pytest.approx(reference(5))
