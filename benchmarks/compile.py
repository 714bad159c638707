"""What ``torch.compile`` buys ``barlowtwins fit``'s training step, and what compiling costs.

The issue "Quality per CPU-minute" asks whether compiling the training step pays on a CPU: a
default run trains about 585 steps in 6-7 minutes on 2 cores, so the compile time must be
won back within those steps. This times the step of the fit's network (ResNet-10, standard
stem, 28 px grey-scale views, batch 512, projector 1024-1024-1024, LARS, channels-last, the
default precision for the device) on pre-made views, three ways, in interleaved repeats:

* ``eager``: the step as ``fit`` runs it today (with the CPU weight gradient of
  :class:`barlowtwins.nn.convolution.SmallOutputConv2d` on a CPU);
* ``compiled``: ``torch.compile`` (inductor) of the same model, with plain convolutions;
* ``compiled+small-output``: ``torch.compile`` of the model with ``SmallOutputConv2d``.

The loss and the optimiser stay eager in every variant. The compile time is the first
compiled step's time minus an eager step's (forward and backward graphs are built there). It
prints each variant's step time, its speed against ``eager`` and the break-even: after how
many steps the compile time is paid back, and the minutes a 585-step run would save.

Run ``python benchmarks/compile.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _common
import torch
from torch import Tensor

from barlowtwins import BarlowTwins, BarlowTwinsLoss, build_backbone, build_optimizer

# The default run's steps: 5 epochs of 117 batches of 512 Fashion-MNIST training images.
DEFAULT_RUN_STEPS = 585
# Each variant's (SmallOutputConv2d on a CPU, torch.compile).
VARIANTS = {
    "compiled": {"small_output": False, "compiled": True},
    "compiled+small-output": {"small_output": True, "compiled": True},
}
_EAGER = {"small_output": True, "compiled": False}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=512, help="images per step (default: 512)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=_common.PRECISION_CHOICES,
        help="training precision; auto = barlowtwins' default for the device",
    )
    parser.add_argument(
        "--mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (default: default)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="what to time besides eager (default: all)",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="length of one timed repeat of each variant (default: 2)",
    )
    _common.add_common_arguments(parser, repeats=5)
    return parser.parse_args()


def _step_function(
    device: torch.device,
    views: tuple[Tensor, Tensor],
    dtype: torch.dtype | None,
    *,
    small_output: bool,
    compiled: bool,
    mode: str,
) -> Callable[[], object]:
    """One training step of a freshly built fit network on ``views``."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(
        "resnet10",
        in_channels=1,
        small_output_convolutions=small_output and device.type == "cpu",
    )
    model = BarlowTwins(backbone, feature_dim, (1024, 1024, 1024)).to(
        device, memory_format=torch.channels_last
    )
    optimizer = build_optimizer(model, name="lars", batch_size=len(views[0]), lr_weights=3.0)
    criterion = BarlowTwinsLoss(0.01)
    network = torch.compile(model, mode=mode) if compiled else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _common.autocast(device, dtype):
            loss = criterion(network(views[0]), network(views[1]))
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = _parse_args()
    device = _common.setup(args)
    precision = _common.default_precision(device) if args.precision == "auto" else args.precision
    dtype = _common.autocast_dtype(precision)
    print(_common.describe_machine(device))
    print(f"precision: {precision}, batch {args.batch}, torch.compile mode {args.mode}\n")
    views = tuple(
        torch.randn(args.batch, 1, 28, 28, device=device).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    )
    variants = {"eager": _EAGER, **{name: VARIANTS[name] for name in args.variants}}
    steps: dict[str, Callable[[], object]] = {}
    first_step: dict[str, float] = {}
    for name, options in variants.items():
        step = _step_function(device, views, dtype, mode=args.mode, **options)  # type: ignore[arg-type]
        start = time.perf_counter()
        step()
        _common.synchronize(device)
        first_step[name] = time.perf_counter() - start
        print(f"{name}: first step {first_step[name]:.1f} s", flush=True)
        steps[name] = step
    seconds = _common.median_seconds_per_call(steps, device, min_seconds=2.0, repeats=args.repeats)
    eager = seconds["eager"]
    print()
    for name, per_step in seconds.items():
        line = f"{name}: {per_step * 1000:.0f} ms a step, {eager / per_step:.2f}x eager's speed"
        if name != "eager":
            compile_seconds = first_step[name] - first_step["eager"]
            saved = eager - per_step
            run_saving = (DEFAULT_RUN_STEPS * saved - compile_seconds) / 60
            if saved > 0:
                line += (
                    f"; compiling took {compile_seconds:.0f} s, paid back after "
                    f"{compile_seconds / saved:.0f} steps; a {DEFAULT_RUN_STEPS}-step run "
                    f"{'saves' if run_saving > 0 else 'loses'} {abs(run_saving):.2f} min"
                )
            else:
                line += f"; compiling took {compile_seconds:.0f} s and never pays back"
        print(line)


if __name__ == "__main__":
    main()
