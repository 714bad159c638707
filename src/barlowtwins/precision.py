"""Precision names (Lightning's) and the default choice for the hardware."""

from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true")


def default_precision(accelerator: str) -> str:
    """bf16 autocast where the hardware runs it fast, else float32."""
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"
