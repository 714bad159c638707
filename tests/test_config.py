"""Tests for barlowtwins.app.config and the data spec: one parse, typed, resolved values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from barlowtwins.app.cli import main
from barlowtwins.app.config import ConfigError, load_fit_config
from barlowtwins.data import DataSpec, fits_in_memory, load_data
from conftest import ImageFolderFactory


def _printed(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["fit", *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_folder_gets_the_folder_recipe_resolved(
    image_folder: ImageFolderFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = image_folder("my_photos", size=(90, 70), suffix=".jpg")
    printed = _printed(["--data", str(photos)], capsys)
    # Not the Fashion-MNIST CPU recipe: solo-learn's, with the view size from the images
    # (median shorter side 70 px -> 64 px views) and no value left as null or auto.
    assert printed["recipe"] == "folder"
    assert (printed["backbone"], printed["lars_eta"], printed["image_size"]) == (
        "resnet18",
        0.02,
        64,
    )
    assert printed["channels"] == 3 and printed["val_data"] is None
    assert printed["precision"] in ("32-true", "bf16-mixed", "16-mixed")
    # Only the device choices may stay "auto": Lightning's accelerator, and DDP when there
    # is more than one process.
    assert [k for k, v in printed.items() if v == "auto"] == ["accelerator", "strategy"]
    assert all(printed[k] is not None for k in ("image_size", "batch_size", "epochs"))


def test_the_run_trains_at_the_printed_view_size(
    tmp_path: Path, image_folder: ImageFolderFactory
) -> None:
    data = image_folder("photos", count=16)
    out = tmp_path / "run"
    args = ["fit", "--data", str(data), "--image-size", "24", "--backbone", "resnet10"]
    args += ["--projector-dims", "16", "16", "--batch-size", "8", "--epochs", "1"]
    assert main([*args, "--precision", "32", "--no-plots", "--output", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 24
    saved = torch.load(out / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["hparams"]["image_size"] == 24


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plots: ture\n", "option plots: input should be a valid boolean"),
        ("projector_dims: [1024.7, 512]\n", "option projector_dims: input should be a valid int"),
        ("epochs: three\n", "option epochs: input should be a valid integer"),
        ("optimiser: lars\n", "unknown option(s) optimiser"),
        ("recipe: imagenet\n", "unknown recipe 'imagenet'"),
    ],
)
def test_a_yaml_value_of_the_wrong_type_is_a_one_line_error(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert main(["fit", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("barlowtwins: error:") and message in err
    assert len(err.splitlines()) == 1


def test_a_recipe_without_a_dataset_needs_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe cifar10 has no built-in dataset"):
        load_fit_config(None, {"recipe": "cifar10", "output": str(tmp_path)})


def test_recipe_then_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("recipe: paper\nepochs: 7\nbatch_size: 32\n")
    resolved = load_fit_config(
        config, {"batch_size": "16", "data": "fashion-mnist", "output": str(tmp_path)}
    )
    assert (
        resolved.recipe,
        resolved.hparams.backbone,
        resolved.hparams.epochs,
        resolved.hparams.batch_size,
    ) == (
        "paper",
        "resnet50",
        7,
        16,
    )


@pytest.mark.parametrize(
    ("text", "kind", "split"),
    [
        ("fashion-mnist", "fashion-mnist", "train"),
        ("FASHION-MNIST:Test", "fashion-mnist", "test"),
        ("fashion-mnist-png/", "folder", None),
        ("./fashion-mnist", "folder", None),
        ("data/fashion-mnist:test", "folder", None),
    ],
)
def test_data_spec_is_parsed_once_one_way(text: str, kind: str, split: str | None) -> None:
    spec = DataSpec.parse(text)
    assert (spec.kind, spec.split) == (kind, split)


def test_a_folder_named_like_fashion_mnist_is_a_folder_everywhere(
    tmp_path: Path,
    image_folder: ImageFolderFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    image_folder("fashion-mnist-png", size=(28, 28))
    printed = _printed(["--data", "fashion-mnist-png"], capsys)
    assert (printed["recipe"], printed["channels"], printed["val_data"]) == ("folder", 3, None)
    assert len(load_data("fashion-mnist-png", image_size=28)) == 12


def test_folders_decoded_per_batch_get_dataloader_workers(
    image_folder: ImageFolderFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder("photos", count=4)
    assert fits_in_memory(data, image_size=64, channels=3)
    assert not fits_in_memory(data, image_size=64, channels=3, limit_bytes=4 * 3 * 64 * 64 - 1)
    assert _printed(["--data", str(data)], capsys)["num_workers"] == 0  # decoded once
    assert _printed(["--num-workers", "3", "--data", str(data)], capsys)["num_workers"] == 3


def test_the_paper_recipe_trains_its_global_batch_on_any_number_of_devices(
    image_folder: ImageFolderFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder("imagenet-like", count=4)
    base = ["fit", "--recipe", "paper", "--data", str(data), "--accelerator", "cpu"]
    for devices, per_device in ((1, 2048), (2, 1024)):
        assert main([*base, "--devices", str(devices), "--print-config"]) == 0
        text = capsys.readouterr().out
        printed = yaml.safe_load(text)
        assert (printed["batch_size"], printed["batch_size_per_device"]) == (2048, per_device)
        # The paper's rates (0.2 and 0.0048 per 256 images) at its global batch of 2048.
        assert (printed["lr_weights"], printed["lr_biases"]) == (0.2, 0.0048)
        assert text.startswith(
            f"# global batch 2048 = {devices} process(es) x {per_device} per device; lars "
            "learning rates at this batch: weights 1.6, biases 0.0384\n"
        )


def test_the_batch_per_device_alone_sets_the_global_batch(tmp_path: Path) -> None:
    config = load_fit_config(
        None,
        {"accelerator": "cpu", "devices": 2, "batch_size_per_device": 96, "output": str(tmp_path)},
    )
    assert (config.hparams.batch_size, config.batch_size_per_device, config.world_size) == (
        192,
        96,
        2,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"batch_size": 100, "num_nodes": 3},
            "batch size 100 (the global batch) does not split over 3 processes: give a "
            "multiple of 3, or --batch-size-per-device",
        ),
        (
            {"batch_size": 512, "batch_size_per_device": 100, "devices": 2},
            "batch size 512 over 2 process(es) is 256 per device, not 100: give one of the two",
        ),
    ],
)
def test_a_batch_that_cannot_split_is_a_one_line_error(
    tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_fit_config(None, {"accelerator": "cpu", **options, "output": str(tmp_path)})
    assert str(error.value) == message
