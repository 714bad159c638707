"""Helpers shared by the side-by-side benchmarks against lightly.

Every benchmark runs barlowtwins and lightly in the same process, alternating the two
(A B A B ...) so that a change in the machine's load hits both sides alike, and ends with one
line per comparison of the form::

    <metric>: barlowtwins <ours> vs lightly <theirs> -> <ratio>x better (target <t>x)

where a ratio above 1 means barlowtwins is better (for times and memory: theirs / ours).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from barlowtwins import precision as _precision

# lightly's Barlow Twins example trains with plain SGD at this learning rate, no schedule.
LIGHTLY_LR = 0.06
# The benchmarks' --precision choices: barlowtwins' default ("auto"), or one it may choose.
PRECISION_CHOICES = ("auto", *_precision.DEFAULT_PRECISIONS)


@dataclass(frozen=True)
class Comparison:
    """One figure measured for both libraries.

    Attributes:
        metric: What was measured, e.g. ``"loss time B=256 D=2048"``.
        ours: barlowtwins' figure.
        theirs: lightly's figure.
        unit: Unit printed after both figures.
        target: Ratio barlowtwins aims for.
        higher_is_better: True for throughputs, False for times and memory.
    """

    metric: str
    ours: float
    theirs: float
    unit: str
    target: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        """How many times better barlowtwins is (> 1: better)."""
        if self.higher_is_better:
            return self.ours / self.theirs
        return self.theirs / self.ours

    def line(self) -> str:
        """The comparison as the benchmarks' final one-line format."""
        return (
            f"{self.metric}: barlowtwins {_figure(self.ours)} {self.unit} vs lightly "
            f"{_figure(self.theirs)} {self.unit} -> {self.ratio:.2f}x better "
            f"(target {self.target:g}x)"
        )


def _figure(value: float) -> str:
    """Three significant digits, without switching to scientific notation."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """Add ``--device``, ``--threads``, ``--repeats`` and ``--seed`` to a benchmark's parser."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (default: all cores)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"interleaved repeats per side; the median is reported (default: {repeats})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--seed``, check ``--device`` and return it.

    Raises:
        SystemExit: If the device is unknown or CUDA is asked for but missing.
    """
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"unknown --device {args.device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"unsupported --device {args.device!r}; use cpu or cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device


def default_precision(device: torch.device) -> str:
    """barlowtwins' default training precision on ``device`` (a Lightning precision name).

    bf16 autocast only where the hardware runs it fast (CUDA, or CPUs with AVX512-BF16/AMX);
    elsewhere, e.g. AVX2 CPUs where bf16 falls back to slow kernels, float32.
    """
    return _precision.default_precision("cuda" if device.type == "cuda" else "cpu")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision name (None for float32)."""
    return _precision.autocast_dtype(precision)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``, or no-op for float32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lightly_two_view_transform(image_size: int) -> Callable[[Image.Image], list[Tensor]]:
    """lightly's BYOL two-view transform (what its Barlow Twins examples use), set to the
    same operations and probabilities as barlowtwins' views of this size.

    Both libraries follow the paper's appendix A (BYOL's augmentations); the one default that
    differs is the blur at 32 px, which barlowtwins drops for tiny images. Copying every
    parameter from :func:`barlowtwins.views.view_config.barlow_twins_views` makes both sides do the
    same work.
    """
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    from barlowtwins import barlow_twins_views

    views = []
    for config, view_class in zip(
        barlow_twins_views(image_size), (BYOLView1Transform, BYOLView2Transform), strict=True
    ):
        views.append(
            view_class(
                input_size=image_size,
                cj_prob=config.color_jitter_prob,
                cj_strength=1.0,
                cj_bright=config.brightness,
                cj_contrast=config.contrast,
                cj_sat=config.saturation,
                cj_hue=config.hue,
                min_scale=config.crop_scale[0],
                random_gray_scale=config.grayscale_prob,
                gaussian_blur=config.blur_prob,
                sigmas=config.blur_sigma,
                solarization_prob=config.solarize_prob,
                hf_prob=config.hflip_prob,
            )
        )
    return BYOLTransform(view_1_transform=views[0], view_2_transform=views[1])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, including its queued device work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def calibrate(fn: Callable[[], object], device: torch.device, min_seconds: float) -> int:
    """Calls of ``fn`` per measurement so that one measurement lasts about ``min_seconds``.

    The first call is a warm-up (kernel selection, allocator growth) and is not counted.
    """
    fn()
    once = timed(fn, device)
    return max(1, math.ceil(min_seconds / max(once, 1e-9)))


def per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` back-to-back calls."""

    def _loop() -> None:
        for _ in range(calls):
            fn()

    return timed(_loop, device) / calls


def interleave(
    runs: dict[str, Callable[[], float]], repeats: int, *, log: bool = True
) -> dict[str, list[float]]:
    """Call each run once per repeat, in turn (A B A B ...), and collect their figures.

    Alternating the sides spreads slow phases of a shared machine over both of them.
    """
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            figures[name].append(run())
            if log:
                print(
                    f"  repeat {repeat + 1}/{repeats} {name}: {figures[name][-1]:.4g}", flush=True
                )
    return figures


def median_seconds_per_call(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    min_seconds: float,
    repeats: int,
    log: bool = True,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved repeats.

    Each function is first calibrated (:func:`calibrate`) so that one repeat lasts about
    ``min_seconds``; then the repeats alternate between the functions (:func:`interleave`).
    """
    counts = {name: calibrate(fn, device, min_seconds) for name, fn in calls.items()}
    times = interleave(
        {
            name: (lambda fn=fn, n=counts[name]: per_call(fn, device, n))
            for name, fn in calls.items()
        },
        repeats,
        log=log,
    )
    return {name: median(values) for name, values in times.items()}


def median(values: list[float]) -> float:
    """Median of the repeats (robust to one repeat slowed down by another process)."""
    return statistics.median(values)


def describe_machine(device: torch.device) -> str:
    """A few lines naming the machine and software the numbers were measured with."""
    import torchvision

    import barlowtwins

    try:
        import lightly

        lightly_version = lightly.__version__
    except ImportError:
        lightly_version = "not installed"
    lines = [
        f"CPU: {_precision.cpu_name()} ({os.cpu_count()} logical cores, "
        f"{len(os.sched_getaffinity(0))} usable, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()})",
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes "
        "share the CPU when it exceeds the core count)",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, barlowtwins {barlowtwins.__version__}, "
        f"lightly {lightly_version}",
        f"torch threads: {torch.get_num_threads()}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset: OpenMP threads spin while waiting)')}",
    ]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        lines.append(f"CUDA device: {torch.cuda.get_device_name(index)}")
    else:
        lines.append("CUDA device: none used")
    return "\n".join(lines)


def require_lightly() -> None:
    """Exit with a clear message unless lightly (the ``bench`` extra) is importable."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise SystemExit(
            'lightly is not installed; install the benchmark extra: pip install -e ".[bench]"'
        ) from None


def print_summary(header: str, comparisons: list[Comparison]) -> None:
    """Print the closing comparison lines (the benchmark's last output)."""
    print(f"\n{header}")
    for comparison in comparisons:
        print(comparison.line())
    sys.stdout.flush()
