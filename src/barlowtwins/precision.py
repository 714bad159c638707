"""Precision names in one place: which ones ``fit`` accepts, which one it picks by default on
this machine, and what each one means for autocast.

The names are Lightning's ``Trainer(precision=...)`` values
(https://lightning.ai/docs/pytorch/stable/common/precision_basic.html): ``*-mixed`` runs the
forward pass under ``torch.autocast`` with float32 weights, ``32`` is plain float32.
"""

from __future__ import annotations

import platform
from collections.abc import Collection
from pathlib import Path
from typing import Literal, get_args

import torch

# Every value ``fit --precision`` accepts. Lightning's "bf16-true" and "64-true" are left out:
# their bfloat16 / float64 weights meet the float32 views of the augmentation, and the first
# training step fails ("Input type (torch.FloatTensor) and weight type ... should be the same").
Precision = Literal["32", "32-true", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# The values default_precision() chooses from.
DEFAULT_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# Autocast dtype of each name (None: no autocast). "bf16" is the short spelling that
# extract_features has always taken for "bf16-mixed".
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "32": None,
    "32-true": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}
# /proc/cpuinfo flags of native bfloat16 arithmetic on x86: AVX512-BF16 (Intel Cooper Lake and
# later, AMD Zen 4) and AMX-BF16 (Intel Sapphire Rapids). Without them torch's CPU bf16 runs
# on slow fallback kernels (benchmarks/README.md), so float32 is the faster choice there.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_CPUINFO = Path("/proc/cpuinfo")


def _read_cpuinfo() -> str:
    """This machine's ``/proc/cpuinfo``; empty where there is none (macOS, Windows)."""
    try:
        return _CPUINFO.read_text()
    except OSError:
        return ""


def cpu_name(cpuinfo: str | None = None) -> str:
    """The processor's model name from ``/proc/cpuinfo`` (or the platform's own words).

    Args:
        cpuinfo: The text of a ``/proc/cpuinfo``; read from this machine when ``None``.
    """
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    for key, _, value in (line.partition(":") for line in cpuinfo.splitlines()):
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def read_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags that every processor of ``/proc/cpuinfo`` lists.

    Args:
        cpuinfo: The text of a ``/proc/cpuinfo``; read from this machine when ``None``.

    Returns:
        The words of the ``flags`` lines (x86) common to all processors; empty where the file
        is missing or unreadable, as on macOS and Windows, or has no ``flags`` line.
    """
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    per_processor = [
        frozenset(value.split())
        for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
        if key.strip() == "flags"
    ]
    return frozenset.intersection(*per_processor) if per_processor else frozenset()


def cpu_supports_bf16(cpu_flags: Collection[str] | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (see ``BF16_CPU_FLAGS``).

    Args:
        cpu_flags: The CPU's feature flags; :func:`read_cpu_flags` of this machine when
            ``None``.
    """
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    return not BF16_CPU_FLAGS.isdisjoint(flags)


def default_precision(accelerator: str, *, cpu_flags: Collection[str] | None = None) -> str:
    """``fit``'s precision when none is given: bf16 autocast where the hardware runs it fast.

    On CUDA, bf16 autocast, or fp16 autocast on GPUs without bf16 (before Ampere); on CPUs
    with native bf16 (:func:`cpu_supports_bf16`), bf16 autocast; else float32.

    Args:
        accelerator: ``fit``'s ``--accelerator`` (``auto``, ``cpu``, ``gpu``, ...).
        cpu_flags: The CPU's feature flags; this machine's when ``None``.

    Returns:
        One of ``DEFAULT_PRECISIONS``.
    """
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if _cuda_supports_bf16() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16(cpu_flags) else "32-true"


def _cuda_supports_bf16() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively: compute capability 8.0
    (Ampere) and later, and every ROCm device.

    ``torch.cuda.is_bf16_supported()`` also answers True for older GPUs, where bf16 is only
    emulated, slowly (pytorch/pytorch#148322), and cuDNN has no bf16 convolutions
    (huggingface/diffusers#14129).
    """
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability()[0] >= 8


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a precision name, or ``None`` for no autocast.

    Raises:
        ValueError: If ``precision`` is not a known name.
    """
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"precision must be one of {', '.join(_AUTOCAST_DTYPES)}; got {precision!r}"
        )
    return _AUTOCAST_DTYPES[precision]


def autocast(device_type: str, precision: str) -> torch.autocast:
    """``torch.autocast`` on ``device_type`` as ``precision`` asks (disabled for 32).

    Raises:
        ValueError: If ``precision`` is not a known name.
    """
    dtype = autocast_dtype(precision)
    # The dtype of a disabled autocast is unused; bfloat16 is one every device type accepts.
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
