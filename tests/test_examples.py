"""Each example of the seed page runs end to end on a small Fashion-MNIST subset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--epochs", "1", "--max-samples", "128", "--batch-size", "32", "--image-size", "16"]


def _run(args: list[str], timeout: float = 300, **env: str) -> str:
    result = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def test_pytorch_example() -> None:
    output = _run([sys.executable, "examples/pytorch/barlowtwins.py", *QUICK])
    assert re.search(r"epoch: 00, loss: \d+\.\d+", output)


def test_lightning_example() -> None:
    output = _run([sys.executable, "examples/pytorch_lightning/barlowtwins.py", *QUICK])
    assert "`Trainer.fit` stopped: `max_epochs=1` reached" in output


@pytest.mark.slow
def test_lightning_distributed_example_on_two_cpu_processes() -> None:
    example = "examples/pytorch_lightning_distributed/barlowtwins.py"
    # Hidden GPUs: with one, the example would start one process per GPU, not two on the CPU.
    output = _run([sys.executable, example, *QUICK], CUDA_VISIBLE_DEVICES="")
    losses = re.findall(r"rank (\d): train_loss (\S+)", output)
    assert sorted(rank for rank, _ in losses) == ["0", "1"], output[-2000:]
    # Every rank holds the global loss.
    assert losses[0][1] == losses[1][1]


@pytest.mark.slow
def test_two_node_torchrun_on_loopback() -> None:
    """Two 'nodes' of one process each, rendezvous on 127.0.0.1, through Lightning."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "examples/pytorch_lightning_distributed/barlowtwins.py",
                *QUICK,
                "--devices",
                "1",
                "--num-nodes",
                "2",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Hidden GPUs: both "nodes" run here as local rank 0, and would share GPU 0.
            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        )
        for rank in range(2)
    ]
    outputs = []
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-4000:]
        outputs.append(out)
    losses = [re.search(r"rank (\d): train_loss (\S+)", out) for out in outputs]
    assert all(losses), outputs
    assert {m.group(1) for m in losses} == {"0", "1"}
    assert losses[0].group(2) == losses[1].group(2)
