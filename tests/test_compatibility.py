"""A run folder written before the hyperparameters became one object still works everywhere.

``tests/data/run_before_hyperparameters`` was written by ``barlowtwins fit`` and
``barlowtwins evaluate --linear --save-head`` at commit 0a3468a (a timm ``test_efficientnet``
on 64 Fashion-MNIST images, one epoch): its checkpoint keeps the hyperparameters as one flat
mapping, its ``results.json`` and ``evaluation.json`` the shapes of that time. ``embed``,
``evaluate``, ``export`` (the model card included) and a resumed ``fit`` read it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from barlowtwins.app.cli import main
from barlowtwins.evaluation.results import Accuracies
from barlowtwins.runs import RunFolder, load_pretrained, safe_load

_STORED = Path(__file__).with_name("data") / "run_before_hyperparameters"
# The options the stored run was trained with (its config.yaml), for the resume.
_OPTIONS = [
    "--accelerator",
    "cpu",
    "--max-samples",
    "64",
    "--val-max-samples",
    "50",
    "--knn-bank-size",
    "32",
    "--knn-k",
    "5",
    "--backbone",
    "timm:test_efficientnet",
    "--projector-dims",
    "16",
    "16",
    "--batch-size",
    "16",
    "--precision",
    "32",
    "--no-plots",
]


@pytest.fixture
def run(tmp_path: Path) -> RunFolder:
    pytest.importorskip("timm")
    folder = tmp_path / "run"
    shutil.copytree(_STORED, folder)
    return RunFolder(folder)


def test_the_stored_checkpoint_keeps_the_flat_layout(run: RunFolder) -> None:
    saved = safe_load(run.last_checkpoint)["hyper_parameters"]
    assert "hparams" not in saved and saved["backbone"] == "timm:test_efficientnet"


def test_embed_reads_it(run: RunFolder, tmp_path: Path) -> None:
    out = tmp_path / "features.npz"
    args = ["embed", str(run.path), "--data", "fashion-mnist:test", "--max-samples", "20"]
    assert main([*args, "--accelerator", "cpu", "--output", str(out)]) == 0
    assert np.load(out)["embeddings"].shape == (20, 256)


def test_evaluate_reads_it(run: RunFolder, tmp_path: Path) -> None:
    report = tmp_path / "evaluation.json"
    args = ["evaluate", str(run.path), "--max-samples", "100", "--knn-k", "5"]
    assert main([*args, "--accelerator", "cpu", "--json", str(report)]) == 0
    accuracies = Accuracies.from_dict(json.loads(report.read_text()))
    assert accuracies is not None and 0 < accuracies.own_knn["barlow twins"] <= 100


def test_export_and_its_model_card_read_it(run: RunFolder, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    assert (
        main(["export", str(run.path), "--format", "hf", "--output", str(hf), "--with-head"]) == 0
    )
    card = (hf / "README.md").read_text()
    # fit's results (kNN at k=5) and evaluate's probe, each in its old shape.
    assert "kNN top-1 (k=5 T=0.1)" in card and "linear probe top-1" in card and "61.36" in card
    full = tmp_path / "full.safetensors"
    assert main(["export", str(run.path), "--format", "full", "--output", str(full)]) == 0
    classifier = load_pretrained(run.path, with_head=True)
    logits = classifier(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)


def test_a_resumed_fit_trains_on_from_it(
    run: RunFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    before = safe_load(run.last_checkpoint)
    # The run predates the whitened stem, so its checkpoint trained a learned one: today's
    # default recipe (whitened) is refused in one line, the run's own setting resumes.
    assert main(["fit", *_OPTIONS, "--epochs", "2", "--output", str(run.path)]) == 2
    assert "was trained with a different whiten_stem" in capsys.readouterr().err
    options = [*_OPTIONS, "--no-whiten-stem", "--epochs", "2", "--output", str(run.path)]
    assert main(["fit", *options]) == 0
    after = safe_load(run.last_checkpoint)
    assert (before["epoch"], after["epoch"]) == (0, 1)
    assert after["global_step"] == 2 * before["global_step"]
    # Written anew in today's shapes.
    assert after["hyper_parameters"]["hparams"]["backbone"] == "timm:test_efficientnet"
    assert json.loads(run.results.read_text())["knn"]["k"] == 5
