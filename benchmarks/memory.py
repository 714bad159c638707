"""Peak memory of a training run: barlowtwins vs lightly at the configuration of throughput.py.

Each side trains in a fresh Python process (so neither inherits the other's allocations):
ResNet-18 with the small-image stem, a 512-2048-2048-2048 projector, ``--batch`` random uint8
32x32 RGB images per step, each library's default pipeline as in ``throughput.py``
(barlowtwins: batched augmentation in the training process, its default precision,
channels-last, LARS; lightly: its BYOL transform on PIL images in the DataLoader, float32,
SGD). After ``--warmup`` + ``--steps`` training steps the process reports its peak resident
set size (``ru_maxrss``: everything the process ever held in RAM at once, Python, torch, data
and DataLoader included; worker processes are not counted, so the default ``--workers 0``
keeps lightly's augmentation inside the measured process). On CUDA the peak of
``torch.cuda.max_memory_allocated`` is compared as well. The two sides alternate over
``--repeats`` fresh processes each; medians are reported.

Run ``python benchmarks/memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
from pathlib import Path

import _common
import throughput
import torch

_TARGET = 1.0
_SIDES = ("barlowtwins", "lightly")
_RESULT = re.compile(r"^peak (\w+) (\d+)$", re.MULTILINE)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument(
        "--num-images", type=int, default=512, help="random images in the dataset (default: 512)"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured training steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before (default: 1)")
    parser.add_argument(
        "--workers", type=int, default=0, help="lightly's DataLoader workers (default: 0)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=_common.PRECISION_CHOICES,
        help="barlowtwins' precision; auto = its default for the device",
    )
    parser.add_argument("--side", choices=_SIDES, help=argparse.SUPPRESS)
    _common.add_common_arguments(parser, repeats=2)
    args = parser.parse_args()
    # Options throughput.py's builders read: its default (the issue's) network.
    args.backbone, args.small_image, args.image_size, _, projector = throughput.ISSUE_NETWORK
    args.projector = list(projector)
    args.no_channels_last = False
    return args


def _train_one_side(args: argparse.Namespace) -> None:
    """Child process: train ``args.side`` and print its peaks."""
    device = _common.setup(args)
    precision = _common.default_precision(device) if args.precision == "auto" else args.precision
    images = torch.randint(
        0,
        256,
        (args.num_images, 3, args.image_size, args.image_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if args.side == "barlowtwins":
        side = throughput.barlowtwins_side(args, images, device, precision)
    else:
        side = throughput.lightly_side(args, images, device)
    for _ in range(args.warmup + args.steps):
        side.step()
    _common.synchronize(device)
    # ru_maxrss is in KiB on Linux.
    print(f"peak rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
    if device.type == "cuda":
        print(f"peak cuda {torch.cuda.max_memory_allocated(device)}")


def _run_side(side: str) -> dict[str, float]:
    """Train ``side`` in a fresh process; its peaks in MiB."""
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--side", side]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{result.stderr[-3000:]}")
    peaks = {kind: int(value) / 2**20 for kind, value in _RESULT.findall(result.stdout)}
    print(f"  {side}: " + ", ".join(f"peak {k} {v:.0f} MiB" for k, v in peaks.items()))
    return peaks


def main() -> None:
    """Alternate fresh training processes of both sides and compare their peak memory."""
    args = _parse_args()
    if args.side is not None:
        _train_one_side(args)
        return
    _common.require_lightly()
    device = _common.setup(args)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0 or args.num_images < args.batch:
        raise SystemExit("need --batch >= 2, --steps >= 1, --warmup >= 0, --num-images >= --batch")
    print(_common.describe_machine(device))
    print(f"batch {args.batch}, {args.warmup} + {args.steps} steps per process\n")
    peaks: dict[str, list[dict[str, float]]] = {side: [] for side in _SIDES}
    for _ in range(args.repeats):
        for side in _SIDES:
            peaks[side].append(_run_side(side))
    comparisons = []
    for kind in peaks["barlowtwins"][0]:
        ours, theirs = (_common.median([run[kind] for run in peaks[side]]) for side in _SIDES)
        comparisons.append(
            _common.Comparison(
                f"peak {kind.upper()} memory of training, batch {args.batch}",
                ours,
                theirs,
                "MiB",
                _TARGET,
                higher_is_better=False,
            )
        )
    _common.print_summary(f"training memory, device {device}:", comparisons)


if __name__ == "__main__":
    main()
