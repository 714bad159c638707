"""training.callbacks: the weight average (``--ema-decay``) on a real run and its resume."""

from __future__ import annotations

from pathlib import Path

import torch

from barlowtwins.app.config import load_fit_config
from barlowtwins.app.fit import fit
from barlowtwins.runs.files import safe_load
from barlowtwins.runs.loader import load_trained_encoder


def _tiny_fit(output: Path, epochs: int, ema_decay: float) -> None:
    config = load_fit_config(
        None,
        {
            "accelerator": "cpu",
            "precision": "32",
            "backbone": "resnet10",
            "max_samples": 64,
            "val_max_samples": 32,
            "batch_size": 16,
            "knn_k": 5,
            "projector_dims": (32, 32),
            "epochs": epochs,
            "ema_decay": ema_decay,
            "plots": False,
            "output": str(output),
        },
    )
    fit(config)


def _backbone_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".backbone." in f".{k}" and v.is_floating_point()}


def test_the_average_is_what_the_run_saves_exports_and_resumes(tmp_path: Path) -> None:
    output = tmp_path / "run"
    _tiny_fit(output, epochs=1, ema_decay=0.5)
    checkpoint = safe_load(output / "checkpoints" / "last.ckpt")
    averaged = _backbone_weights(checkpoint["state_dict"])
    current = _backbone_weights(checkpoint["current_model_state"])
    assert averaged.keys() == current.keys() and averaged
    # Four steps of a 0.5 average differ from the last step's weights.
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged)

    exported = load_trained_encoder(output / "backbone.pt").encoder().state_dict()
    for name, value in exported.items():
        if value.is_floating_point():
            matches = [k for k in averaged if k.endswith(f"backbone.{name}")]
            assert len(matches) == 1, name
            torch.testing.assert_close(value, averaged[matches[0]], rtol=0, atol=0)

    # The rerun resumes the average and the raw weights, and trains on.
    _tiny_fit(output, epochs=2, ema_decay=0.5)
    resumed = safe_load(output / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 8 and "current_model_state" in resumed


def test_without_the_average_the_checkpoint_holds_the_trained_weights_only(
    tmp_path: Path,
) -> None:
    _tiny_fit(tmp_path / "run", epochs=1, ema_decay=0.0)
    checkpoint = safe_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert "current_model_state" not in checkpoint and "averaging_state" not in checkpoint
