"""The ``barlowtwins`` command on small real data: fit, resume, embed, evaluate, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models.resnet import BasicBlock, ResNet

from barlowtwins.app.cli import main
from barlowtwins.backbones import adapt_stem
from barlowtwins.evaluation.results import Accuracies
from barlowtwins.training.callbacks import TRAIN_MINUTES

# What fit counts as this machine's cores when it checks --devices on the CPU.
_CORES = os.cpu_count() or 1
# A run small enough for CI: 256 training images, 1000 labelled test images.
TINY = [
    "--backbone",
    "resnet10",
    "--max-samples",
    "256",
    "--val-max-samples",
    "1000",
    "--batch-size",
    "64",
    "--knn-bank-size",
    "256",
    "--knn-k",
    "20",
    "--projector-dims",
    "256",
    "256",
    "--precision",
    "32",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fit") / "run"
    assert main(["fit", *TINY, "--epochs", "1", "--output", str(output)]) == 0
    return output


def test_fit_writes_everything(fitted: Path) -> None:
    for name in (
        "backbone.pt",
        "backbone.json",
        "metrics.csv",
        "results.json",
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (fitted / name).is_file(), name
    plots = sorted(p.name for p in (fitted / "plots").glob("*.png"))
    assert plots == [
        "cross_correlation.png",
        "duplicates.png",
        "embedding_tsne.png",
        "health.png",
        "knn_accuracy.png",
        "loss.png",
        "neighbours.png",
    ]
    assert (fitted / "plots" / "duplicates.csv").is_file()  # the pairs duplicates.png shows
    results = json.loads((fitted / "results.json").read_text())
    # The summary scores both standard protocols beside the run's own --knn-k 20 (T=0.1).
    accuracies = Accuracies.from_dict(results)
    assert accuracies is not None and accuracies.knn_k == 20
    assert [p.label for p in accuracies.protocols] == ["k=20 T=0.07", "k=20 T=0.1", "k=200 T=0.1"]
    for scores in accuracies.knn.values():
        assert set(scores) == {"barlow twins", "random init", "raw pixels"}
        assert all(10.0 < accuracy <= 100.0 for accuracy in scores.values())
    assert results["test_images"] == 1000


def test_backbone_loads_strictly_into_torchvision(fitted: Path) -> None:
    state = torch.load(fitted / "backbone.pt", weights_only=True)
    model = adapt_stem(ResNet(BasicBlock, [1, 1, 1, 1]), in_channels=1, small_image=False)
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 512)


def test_rerun_resumes_from_last_checkpoint(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    output = tmp_path / "run"
    shutil.copytree(fitted, output)
    assert main(["fit", *TINY, "--epochs", "2", "--output", str(output), "--no-plots"]) == 0
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The first run's epoch 0 is kept, the rerun only trained epoch 1.
    assert {row["epoch"] for row in rows} == {"0", "1"}
    # The training clock goes on from the checkpoint's minutes: one reading per epoch.
    minutes = [float(row[TRAIN_MINUTES]) for row in rows if row.get(TRAIN_MINUTES)]
    assert len(minutes) == 2 and 0 < minutes[0] < minutes[1]
    # The progress bar shows the loss, not the log folder's meaningless version number.
    captured = capsys.readouterr()
    progress = captured.out + captured.err
    assert "train_loss" in progress and "v_num" not in progress
    ckpt = torch.load(output / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1


@pytest.mark.parametrize("source", ["backbone.pt", "checkpoints/last.ckpt", "."])
def test_embed(fitted: Path, tmp_path: Path, source: str) -> None:
    out = tmp_path / "test.npz"
    assert (
        main(
            [
                "embed",
                str(fitted / source),
                "--data",
                "fashion-mnist:test",
                "--max-samples",
                "100",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    arrays = np.load(out)
    assert arrays["embeddings"].shape == (100, 512)
    assert arrays["embeddings"].dtype == np.float32
    assert arrays["labels"].shape == (100,)


def test_embed_image_folder_records_paths(fitted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 20, 200)).save(folder / f"{i}.png")
    out = tmp_path / "folder.npz"
    assert main(["embed", str(fitted), "--data", str(folder), "--output", str(out)]) == 0
    arrays = np.load(out)
    assert arrays["embeddings"].shape == (3, 512)
    assert "labels" not in arrays
    assert [Path(p).name for p in arrays["paths"]] == ["0.png", "1.png", "2.png"]


def test_evaluate_knn_and_linear(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(fitted / "backbone.pt"),
                "--max-samples",
                "500",
                "--knn-k",
                "20",
                "--linear",
                "--linear-epochs",
                "5",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    results = json.loads(report.read_text())
    # The shape fit's results.json has.
    assert 10 < results["knn"]["protocols"]["k=20 T=0.07"]["top1"]["barlow twins"] <= 100
    assert 10 < results["linear_probe"]["top1"]["barlow twins"] <= 100
    assert results["linear_probe"]["epochs"] == 5
    assert "Linear probe" in capsys.readouterr().out


def test_print_config_merges_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 7\nbatch_size: 32\nlambda-param: 0.01\n")
    assert main(["fit", "--config", str(config), "--batch-size", "16", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["epochs"], printed["batch_size"], printed["lambda_param"]) == (7, 16, 0.01)
    assert printed["data"] == "fashion-mnist"


@pytest.mark.parametrize(
    ("args", "crop_scale"),
    [
        ([], [1.0, 1.0]),
        (["--data", "FOLDER"], [0.08, 1.0]),
        (["--crop-scale", "0.08", "1"], [0.08, 1.0]),
    ],
)
def test_print_config_shows_the_crop_scale_in_effect(
    args: list[str], crop_scale: list[float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "image.png")
    args = [str(tmp_path) if arg == "FOLDER" else arg for arg in args]
    assert main(["fit", *args, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["crop_scale"] == crop_scale


@pytest.mark.parametrize(
    ("args", "learning_rates"),
    [
        ([], (3.0, 0.0144)),
        (["--optimizer", "adamw"], (0.002, 0.0048)),
        (["--optimizer", "sgd", "--lr-biases", "0.01"], (0.06, 0.01)),
        (["--optimizer", "adamw", "--lr-weights", "0.001"], (0.001, 0.0048)),
    ],
)
def test_print_config_shows_the_optimizers_learning_rates(
    args: list[str], learning_rates: tuple[float, float], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr_weights"], printed["lr_biases"]) == learning_rates


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--backbone", "resnet9000"], "unknown backbone 'resnet9000'"),
        (["fit", "--epochs", "0"], "epochs must be >= 1"),
        (["fit", "--batch-size", "1"], "batch size must be >= 2"),
        # One more process than this machine has cores, whatever it has.
        (
            [
                "fit",
                "--accelerator",
                "cpu",
                "--batch-size-per-device",
                "64",
                "--devices",
                str(_CORES + 1),
            ],
            f"devices={_CORES + 1} but this machine has {_CORES} CPU cores",
        ),
        # Lightning has it, but fit's float32 views cannot feed float64 weights.
        (["fit", "--precision", "64"], "precision must be one of"),
        (["fit", "--solarize-prob", "0.3"], "option solarize_prob takes two values"),
        (["fit", "--solarize-prob", "0", "1.5"], "solarize prob must lie in [0, 1]"),
        (["fit", "--max-samples", "100", "--batch-size", "128"], "larger than the dataset"),
        (["fit", "--data", "/nonexistent/folder", "--image-size", "32"], "/nonexistent/folder"),
        (
            ["embed", "/nonexistent.pt", "--data", "fashion-mnist", "--output", "x.npz"],
            "checkpoint not found",
        ),
    ],
)
def test_bad_input_is_one_line_error(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if args[0] == "fit":
        args = [*args, "--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("barlowtwins: error:") and message in err
    assert len(err.splitlines()) == 1


def test_output_that_is_a_file_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    assert main(["fit", "--output", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "backbone.pt"
    bad.write_bytes(b"this is not a checkpoint")
    assert (
        main(["embed", str(bad), "--data", "fashion-mnist", "--output", str(tmp_path / "x.npz")])
        == 2
    )
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "barlowtwins",
            "fit",
            "--epochs",
            "-3",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "barlowtwins: error: epochs must be >= 1, got -3"
