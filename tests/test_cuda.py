"""CUDA paths (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from barlowtwins import BarlowTwinsLoss, BatchedBarlowTwinsAugment
from barlowtwins.model import BarlowTwins

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_is_float32_under_cuda_autocast(dtype: torch.dtype) -> None:
    z_a = torch.randn(256, 8192, device="cuda")
    z_b = z_a + 0.1 * torch.randn_like(z_a)
    expected = BarlowTwinsLoss()(z_a, z_b)
    with torch.autocast("cuda", dtype=dtype):
        got = BarlowTwinsLoss()(z_a.to(dtype), z_b.to(dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)


def test_training_step_on_cuda_with_bf16() -> None:
    model = BarlowTwins.from_name("resnet18", small_image=True, projector_dims=(512, 512)).cuda()
    model = model.to(memory_format=torch.channels_last)
    augment = BatchedBarlowTwinsAugment(32)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    view_a, view_b = augment(images)
    assert view_a.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss()(model(view_a), model(view_b))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_one_gpu_ddp_trains_with_syncbatchnorm_and_scores_on_the_gpu(tmp_path: Path) -> None:
    output = tmp_path / "run"
    arguments = ["fit", "--accelerator", "gpu", "--devices", "1", "--strategy", "ddp"]
    arguments += ["--max-samples", "512", "--val-max-samples", "256", "--knn-bank-size", "256"]
    arguments += ["--epochs", "1", "--batch-size", "128", "--no-plots", "--output", str(output)]
    result = subprocess.run(
        [sys.executable, "-m", "barlowtwins", *arguments], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert results["hardware"]["batch_norm"] == "SyncBatchNorm"
    assert results["scored_on"].startswith("cuda")
