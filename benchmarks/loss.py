"""Barlow Twins loss, forward + backward: barlowtwins vs lightly, side by side.

Both losses get the same embeddings ``z_a, z_b`` of shape (B, D) and run forward and backward
(gradients for both inputs), in two settings:

1. **Equal precision**, the comparison with a target: float32 embeddings, no autocast, both
   sides compute in float32.
2. **Default paths under mixed precision** (``--mixed-precision``, default bf16 autocast):
   the embeddings are bfloat16, as a projector under autocast returns them, and each side runs
   as it does in training. lightly's matrix product then runs in bfloat16; barlowtwins' loss
   computes in float32 by design. Only the time is compared; next to it each side's
   relative error shows what the speed costs. Without fast bf16 (AVX2 CPUs) torch emulates it
   and these times say nothing about bf16 hardware; the script says so when that is the case.

Every line names its precision, and every loss value is checked against float64: the
relative error is ``|loss - loss64| / loss64``, where ``loss64`` is barlowtwins' loss in
float64 of the very same embeddings (``tests/test_loss.py`` checks that path against the
paper's pseudocode to 1e-12 and against an independent Gram-matrix form).

The figures are

* time: median over interleaved repeats (barlowtwins, lightly, barlowtwins, ...) of the mean
  time per call, each repeat lasting at least ``--min-seconds``;
* peak memory: the most memory the call holds at once beyond the inputs, gradients included.
  On CUDA this is ``torch.cuda.max_memory_allocated`` minus what was allocated before. On CPU
  torch has no such counter, so the call runs once under ``torch.profiler`` with
  ``profile_memory=True``: every allocation and free of torch's CPU allocator is recorded with
  its size and time, and the peak of their running sum is the same quantity CUDA's counter
  reports (tensors' bytes; not the allocator's caching or page rounding). It is exact and
  deterministic, unlike the process's resident set size, which glibc's caching of freed
  blocks blurs.

Both are also put next to a bare ``z_a.T @ z_b`` of the same size, the floor of any
implementation: a forward + backward needs at least three such products (``c`` and one
gradient per input), and memory at least the ``D x D`` matrix ``c``.

``--scaling`` prints a table of barlowtwins alone over D in 1024..8192 and B in 64..512
(float32).

Run ``python benchmarks/loss.py --help`` for the options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _common
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from barlowtwins import BarlowTwinsLoss

_MIB = 2**20
# The targets: at least as fast and as lean as lightly.
_TIME_TARGET = 1.0
_MEMORY_TARGET = 1.0
_SCALING_DIMS = (1024, 2048, 4096, 8192)
_SCALING_BATCHES = (64, 128, 256, 512)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=256, help="batch size B (default: 256)")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=[2048, 8192],
        help="embedding sizes D to compare (default: 2048 8192)",
    )
    parser.add_argument(
        "--mixed-precision",
        default="bf16-mixed",
        choices=["bf16-mixed", "16-mixed", "none"],
        help="autocast of the second part, each side's default path (default: bf16-mixed; "
        "none skips it). The first part, the comparison with a target, is always float32",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.2,
        help="each timed repeat calls the loss until it has run this long (default: 0.2)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead of the comparison, print barlowtwins' float32 time and memory for D in "
        "1024..8192 and B in 64..512",
    )
    _common.add_common_arguments(parser, repeats=5)
    return parser.parse_args()


def _embeddings(
    batch: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor]:
    """Two leaf batches of embeddings that need gradients, as a projector's outputs would."""
    generator = torch.Generator(device).manual_seed(seed)
    z_a, z_b = (
        torch.randn(batch, dim, generator=generator, device=device).to(dtype).requires_grad_()
        for _ in range(2)
    )
    return z_a, z_b


def _loss_call(
    loss_fn: torch.nn.Module, z_a: Tensor, z_b: Tensor, autocast_dtype: torch.dtype | None
) -> Callable[[], None]:
    """One forward + backward of ``loss_fn``; the input gradients are allocated anew each time."""

    def _call() -> None:
        z_a.grad = z_b.grad = None
        with _common.autocast(z_a.device, autocast_dtype):
            loss = loss_fn(z_a, z_b)
        loss.backward()

    return _call


def _gemm_call(z_a: Tensor, z_b: Tensor) -> Callable[[], None]:
    """The bare cross-product ``z_a.T @ z_b``, the loss's unavoidable core."""

    def _call() -> None:
        with torch.no_grad():
            torch.mm(z_a.T, z_b)

    return _call


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Most bytes ``fn`` holds at once beyond what was allocated before it (see module doc)."""
    fn()  # warm-up: one-time buffers of the first call do not count
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocator events are "[memory]" records whose nbytes is + for an allocation, - for a free.
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak


def _float64_loss(z_a: Tensor, z_b: Tensor) -> float:
    """The reference value: barlowtwins' loss of the same embeddings in float64."""
    with torch.no_grad():
        return BarlowTwinsLoss()(z_a.double(), z_b.double()).item()


def _value(
    loss_fn: torch.nn.Module, z_a: Tensor, z_b: Tensor, autocast_dtype: torch.dtype | None
) -> Tensor:
    """The loss as the side returns it on its path (autocast or not)."""
    with torch.no_grad(), _common.autocast(z_a.device, autocast_dtype):
        return loss_fn(z_a, z_b)


def _relative_error(value: Tensor, reference: float) -> float:
    return abs(value.double().item() - reference) / abs(reference)


def _equal_precision(
    args: argparse.Namespace, device: torch.device, losses: dict[str, torch.nn.Module]
) -> list[_common.Comparison]:
    """Part 1: both sides in float32; time and memory against the targets."""
    comparisons: list[_common.Comparison] = []
    for dim in args.dims:
        shape = f"B={args.batch} D={dim}"
        print(
            f"\nequal precision, {shape}: float32 embeddings, no autocast; timing "
            f"{args.repeats} interleaved repeats (seconds per call)"
        )
        z_a, z_b = _embeddings(args.batch, dim, device, torch.float32, args.seed)
        reference = _float64_loss(z_a, z_b)
        calls = {name: _loss_call(fn, z_a, z_b, None) for name, fn in losses.items()}
        calls["gemm"] = _gemm_call(z_a, z_b)
        seconds = _common.median_seconds_per_call(
            calls, device, min_seconds=args.min_seconds, repeats=args.repeats
        )
        memory = {name: _peak_bytes(fn, device) / _MIB for name, fn in calls.items()}
        for name, loss_fn in losses.items():
            value = _value(loss_fn, z_a, z_b, None)
            print(
                f"  {name} (float32, returns {_dtype_name(value)}): "
                f"{seconds[name] * 1e3:.1f} ms = {seconds[name] / seconds['gemm']:.2f} "
                f"bare GEMMs (floor: 3), peak {memory[name]:.1f} MiB = "
                f"{memory[name] / memory['gemm']:.2f}x the D x D matrix c (floor: 1), "
                f"loss relative error vs float64 {_relative_error(value, reference):.1e}"
            )
        print(f"  bare z_a.T @ z_b: {seconds['gemm'] * 1e3:.1f} ms, {memory['gemm']:.1f} MiB")
        comparisons += [
            _common.Comparison(
                f"loss fwd+bwd time, equal precision (float32) {shape}",
                seconds["barlowtwins"] * 1e3,
                seconds["lightly"] * 1e3,
                "ms",
                _TIME_TARGET,
                higher_is_better=False,
            ),
            _common.Comparison(
                f"loss fwd+bwd peak memory, equal precision (float32) {shape}",
                memory["barlowtwins"],
                memory["lightly"],
                "MiB",
                _MEMORY_TARGET,
                higher_is_better=False,
            ),
        ]
    return comparisons


def _default_paths(
    args: argparse.Namespace,
    device: torch.device,
    losses: dict[str, torch.nn.Module],
    precision: str,
) -> list[str]:
    """Part 2: each side's own path under autocast; time and relative error, no target."""
    dtype = _common.autocast_dtype(precision)
    assert dtype is not None  # "none" never reaches here
    dtype_name = str(dtype).removeprefix("torch.")
    summaries = []
    for dim in args.dims:
        shape = f"B={args.batch} D={dim}"
        print(
            f"\ndefault paths under {precision} autocast, {shape}: {dtype_name} embeddings; "
            f"timing {args.repeats} interleaved repeats (seconds per call)"
        )
        z_a, z_b = _embeddings(args.batch, dim, device, dtype, args.seed)
        reference = _float64_loss(z_a, z_b)
        calls = {name: _loss_call(fn, z_a, z_b, dtype) for name, fn in losses.items()}
        seconds = _common.median_seconds_per_call(
            calls, device, min_seconds=args.min_seconds, repeats=args.repeats
        )
        described = {}
        for name, loss_fn in losses.items():
            value = _value(loss_fn, z_a, z_b, dtype)
            described[name] = (
                f"{seconds[name] * 1e3:.1f} ms ({precision}, returns {_dtype_name(value)}, "
                f"relative error vs float64 {_relative_error(value, reference):.1e})"
            )
            print(f"  {name}: {described[name]}")
        summaries.append(
            f"loss fwd+bwd time, default paths under {precision} autocast {shape}: "
            f"barlowtwins {described['barlowtwins']} vs lightly {described['lightly']} -> "
            f"{seconds['lightly'] / seconds['barlowtwins']:.2f}x (no target: unequal precision)"
        )
    return summaries


def _dtype_name(value: Tensor) -> str:
    return str(value.dtype).removeprefix("torch.")


def _scaling(args: argparse.Namespace, device: torch.device) -> None:
    """Print a Markdown table of barlowtwins' float32 loss time and memory over D and B."""
    loss_fn = BarlowTwinsLoss()
    print(f"\nbarlowtwins loss fwd+bwd, float32, median of {args.repeats} repeats")
    print("| D | B | time (ms) | / bare GEMM | peak memory (MiB) | / D x D matrix |")
    print("|---:|---:|---:|---:|---:|---:|")
    for dim in _SCALING_DIMS:
        for batch in _SCALING_BATCHES:
            z_a, z_b = _embeddings(batch, dim, device, torch.float32, args.seed)
            calls = {"loss": _loss_call(loss_fn, z_a, z_b, None), "gemm": _gemm_call(z_a, z_b)}
            seconds = _common.median_seconds_per_call(
                calls, device, min_seconds=args.min_seconds, repeats=args.repeats, log=False
            )
            loss_s, gemm_s = seconds["loss"], seconds["gemm"]
            loss_mib, gemm_mib = (_peak_bytes(calls[name], device) / _MIB for name in calls)
            print(
                f"| {dim} | {batch} | {loss_s * 1e3:.1f} | {loss_s / gemm_s:.2f} | "
                f"{loss_mib:.1f} | {loss_mib / gemm_mib:.2f} |",
                flush=True,
            )


def main() -> None:
    """Run the comparison (or the scaling table) and print the results."""
    args = _parse_args()
    if not args.scaling:
        _common.require_lightly()
    device = _common.setup(args)
    if args.batch < 2 or any(dim < 1 for dim in args.dims):
        raise SystemExit(f"need --batch >= 2 and --dims >= 1, got {args.batch} and {args.dims}")
    print(_common.describe_machine(device))
    if args.scaling:
        _scaling(args, device)
        return
    from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss

    losses = {"barlowtwins": BarlowTwinsLoss(), "lightly": LightlyBarlowTwinsLoss()}
    comparisons = _equal_precision(args, device, losses)
    summaries = []
    if args.mixed_precision != "none":
        fast = _common.default_precision(device)
        if fast != args.mixed_precision:
            print(
                f"\nnote: {args.mixed_precision} is not fast on this device (barlowtwins' "
                f"default here is {fast}); torch emulates it, so the times below are not "
                "those of hardware with native support. The relative errors are."
            )
        summaries = _default_paths(args, device, losses, args.mixed_precision)
    _common.print_summary(f"loss, device {device}:", comparisons)
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
