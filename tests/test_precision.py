"""Precision names, the default choice on this machine, and both default paths of ``fit``
(bf16 autocast and float32) end to end, whichever one this machine's CPU would pick."""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import barlowtwins.precision
from barlowtwins.app.config import ConfigError, load_fit_config
from barlowtwins.app.fit import fit
from barlowtwins.evaluation.results import Accuracies
from barlowtwins.precision import (
    BF16_CPU_FLAGS,
    DEFAULT_PRECISIONS,
    PRECISIONS,
    autocast,
    autocast_dtype,
    cpu_name,
    cpu_supports_bf16,
    default_precision,
    read_cpu_flags,
)
from barlowtwins.runs.loader import load_trained_encoder

# Two processors of an AVX512-BF16 machine, shortened; the second lacks one flag.
_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9454
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
bogomips\t: 5491.74

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
"""


def test_read_cpu_flags_keeps_the_flags_every_processor_has() -> None:
    assert read_cpu_flags(_CPUINFO) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert read_cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == frozenset()
    assert read_cpu_flags("") == frozenset()


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
    reason="needs an x86-64 Linux /proc/cpuinfo",
)
def test_read_cpu_flags_reads_this_machine() -> None:
    # Every x86-64 processor has SSE2 (it is part of the architecture's baseline).
    assert "sse2" in read_cpu_flags()


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_tile", "amx_bf16"}, True),
        ({"avx2", "avx512f", "avx512_vnni"}, False),
        (set(), False),
    ],
)
def test_cpu_bf16_follows_the_flags(flags: set[str], native: bool) -> None:
    assert cpu_supports_bf16(flags) is native
    assert default_precision("cpu", cpu_flags=flags) == ("bf16-mixed" if native else "32-true")


def test_default_precision_reads_this_machine_when_not_told() -> None:
    assert default_precision("cpu") == default_precision("cpu", cpu_flags=read_cpu_flags())
    for accelerator in ("auto", "cpu", "gpu"):
        for flags in (set(), BF16_CPU_FLAGS):
            assert default_precision(accelerator, cpu_flags=flags) in DEFAULT_PRECISIONS


def test_every_accepted_precision_has_an_autocast_meaning() -> None:
    # fit scores its encoder in the precision it trained in: each name must map.
    assert set(DEFAULT_PRECISIONS) <= set(PRECISIONS)
    meaning = {name: autocast_dtype(name) for name in PRECISIONS}
    assert meaning == {
        "32": None,
        "32-true": None,
        "bf16-mixed": torch.bfloat16,
        "16-mixed": torch.float16,
    }
    assert autocast_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match=r"precision must be one of .*got '16'"):
        autocast_dtype("16")
    # Lightning takes these, but fit's float32 views cannot feed bf16 or float64 weights.
    for name in ("bf16-true", "64", "fp8"):
        with pytest.raises(ConfigError, match="precision must be one of 32, 32-true, bf16-mixed"):
            load_fit_config(None, {"precision": name})


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)],
)
def test_autocast_computes_in_the_named_dtype(precision: str, dtype: torch.dtype) -> None:
    layer = nn.Linear(8, 4)
    with autocast("cpu", precision):
        out = layer(torch.randn(2, 8))
    assert out.dtype == dtype


class _BackboneDtypes(Callback):
    """Records the trainer's precision and the dtype of every backbone output, by phase:
    training steps, the kNN monitor (eval mode during fit), and the final scoring (after)."""

    def __init__(self) -> None:
        self.precision = ""
        self.dtypes: dict[str, set[torch.dtype]] = {
            "train": set(),
            "monitor": set(),
            "score": set(),
        }
        self._fitting = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.precision = str(trainer.precision)
        self._fitting = True
        # The hook stays on the backbone, which fit scores after training.
        pl_module.backbone.register_forward_hook(self._record)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fitting = False

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        phase = "train" if module.training else "monitor" if self._fitting else "score"
        self.dtypes[phase].add(output.dtype)


@pytest.mark.parametrize(
    ("cpu_has_bf16", "precision", "dtype"),
    [(True, "bf16-mixed", torch.bfloat16), (False, "32-true", torch.float32)],
)
def test_fit_trains_saves_and_scores_on_either_default_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu_has_bf16: bool,
    precision: str,
    dtype: torch.dtype,
) -> None:
    # The CPU probe, not the CPU, decides: both paths run on every machine.
    monkeypatch.setattr(barlowtwins.precision, "cpu_supports_bf16", lambda _=None: cpu_has_bf16)
    output = tmp_path / "run"
    config = load_fit_config(
        None,
        {
            "accelerator": "cpu",
            "backbone": "resnet10",
            "max_samples": 64,
            "val_max_samples": 100,
            "batch_size": 16,
            "knn_bank_size": 64,
            "knn_k": 10,
            "projector_dims": (64, 64),
            "epochs": 1,
            "plots": False,
            "output": str(output),
        },
    )
    assert config.hparams.precision == precision  # "auto", resolved by the probe
    recorder = _BackboneDtypes()
    results = fit(config, callbacks=[recorder])

    assert recorder.precision == precision
    assert recorder.dtypes == {"train": {dtype}, "monitor": {dtype}, "score": {dtype}}
    with open(output / "metrics.csv", newline="") as handle:
        losses = [
            float(r["train_loss_epoch"])
            for r in csv.DictReader(handle)
            if r.get("train_loss_epoch")
        ]
    assert len(losses) == 1 and math.isfinite(losses[0])
    run = load_trained_encoder(output / "backbone.pt")
    backbone, info = run.encoder(), run.info
    weights = list(backbone.state_dict().values())
    # Mixed precision keeps float32 weights; only the forward pass ran in bfloat16.
    assert all(
        w.dtype == torch.float32 and bool(w.isfinite().all())
        for w in weights
        if w.is_floating_point()
    )
    assert info.backbone == "resnet10"
    assert results["test_images"] == 100
    accuracies = Accuracies.from_dict(results)
    assert accuracies is not None
    for name in ("barlow twins", "random init", "raw pixels"):
        assert 0.0 < accuracies.own_knn[name] <= 100.0


def test_cpu_name_reads_the_model_name_line() -> None:
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: sse\n"
    )
    assert cpu_name(cpuinfo) == "AMD EPYC 9B14"
    assert cpu_name("processor\t: 0\n")  # no model name line: the platform's words
