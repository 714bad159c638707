"""Barlow Twins loss, forward + backward: barlowtwins vs lightly, side by side.

Both losses get the same embeddings ``z_a, z_b`` of shape (B, D) and run forward and backward
(gradients for both inputs). The figures are

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

``--scaling`` prints a table of barlowtwins alone over D in 1024..8192 and B in 64..512.

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
        "--precision",
        default="auto",
        choices=_common.PRECISION_CHOICES,
        help="embeddings' dtype and autocast; auto = barlowtwins' default for the device "
        "(float32 on CPUs without fast bf16)",
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
        help="instead of the comparison, print barlowtwins' time and memory for D in "
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


def _compare(args: argparse.Namespace, device: torch.device, precision: str) -> None:
    from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss

    dtype = _common.autocast_dtype(precision)
    input_dtype = dtype or torch.float32
    ours, theirs = BarlowTwinsLoss(), LightlyBarlowTwinsLoss()
    comparisons: list[_common.Comparison] = []
    for dim in args.dims:
        shape = f"B={args.batch} D={dim}"
        print(f"\n{shape}: timing {args.repeats} interleaved repeats (seconds per call)")
        z_a, z_b = _embeddings(args.batch, dim, device, input_dtype, args.seed)
        calls = {
            "barlowtwins": _loss_call(ours, z_a, z_b, dtype),
            "lightly": _loss_call(theirs, z_a, z_b, dtype),
            "gemm": _gemm_call(z_a, z_b),
        }
        seconds = _common.median_seconds_per_call(
            calls, device, min_seconds=args.min_seconds, repeats=args.repeats
        )
        memory = {name: _peak_bytes(fn, device) / _MIB for name, fn in calls.items()}
        for name in ("barlowtwins", "lightly"):
            print(
                f"  {name}: {seconds[name] * 1e3:.1f} ms = {seconds[name] / seconds['gemm']:.2f} "
                f"bare GEMMs (floor: 3), peak {memory[name]:.1f} MiB = "
                f"{memory[name] / memory['gemm']:.2f}x the D x D matrix c (floor: 1)"
            )
        print(f"  bare z_a.T @ z_b: {seconds['gemm'] * 1e3:.1f} ms, {memory['gemm']:.1f} MiB")
        comparisons += [
            _common.Comparison(
                f"loss fwd+bwd time {shape}",
                seconds["barlowtwins"] * 1e3,
                seconds["lightly"] * 1e3,
                "ms",
                _TIME_TARGET,
                higher_is_better=False,
            ),
            _common.Comparison(
                f"loss fwd+bwd peak memory {shape}",
                memory["barlowtwins"],
                memory["lightly"],
                "MiB",
                _MEMORY_TARGET,
                higher_is_better=False,
            ),
        ]
    _common.print_summary(f"loss, precision {precision}, device {device}:", comparisons)


def _scaling(args: argparse.Namespace, device: torch.device, precision: str) -> None:
    """Print a Markdown table of barlowtwins' loss time and memory over D and B."""
    dtype = _common.autocast_dtype(precision)
    loss_fn = BarlowTwinsLoss()
    print(f"\nbarlowtwins loss fwd+bwd, precision {precision}, median of {args.repeats} repeats")
    print("| D | B | time (ms) | / bare GEMM | peak memory (MiB) | / D x D matrix |")
    print("|---:|---:|---:|---:|---:|---:|")
    for dim in _SCALING_DIMS:
        for batch in _SCALING_BATCHES:
            z_a, z_b = _embeddings(batch, dim, device, dtype or torch.float32, args.seed)
            calls = {"loss": _loss_call(loss_fn, z_a, z_b, dtype), "gemm": _gemm_call(z_a, z_b)}
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
    precision = _common.default_precision(device) if args.precision == "auto" else args.precision
    print(_common.describe_machine(device))
    print(f"precision: {precision} (embeddings {_common.autocast_dtype(precision) or 'float32'})")
    if args.scaling:
        _scaling(args, device, precision)
    else:
        _compare(args, device, precision)


if __name__ == "__main__":
    main()
