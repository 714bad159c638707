"""`barlowtwins finetune` on small real data: the subset, the training, the baselines, the saved
classifier and its exports, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import barlowtwins
from barlowtwins.app.cli import main
from barlowtwins.app.export import relative_difference
from barlowtwins.backbones import build_backbone
from barlowtwins.data import load_data, load_fashion_mnist
from barlowtwins.encoder import EncoderInfo
from barlowtwins.evaluation import extract_features, linear_probe
from barlowtwins.evaluation.finetune import (
    FinetuneSettings,
    balanced_subset,
    finetune_classifier,
    new_head,
)
from barlowtwins.runs.files import save_encoder
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import fingerprint, load_finetuned, load_trained_encoder
from barlowtwins.views.eval_view import prepare_images

INFO = EncoderInfo("resnet10", 1, False, 28, (0.286,), (0.353,))
# 40 labels of 500 training images, two steps per epoch, scored on a 100-image folder.
FINETUNE = ["--labels", "40", "--max-samples", "500", "--batch-size", "20"]
FINETUNE += ["--precision", "32", "--accelerator", "cpu"]


def _backbone(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone, _ = build_backbone(INFO.backbone, in_channels=1)
    return backbone


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (backbone.pt + backbone.json) of a ResNet-10 other than the baseline's."""
    folder = tmp_path_factory.mktemp("run")
    save_encoder(_backbone(seed=1), INFO, RunFolder(folder))
    return folder


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 100 Fashion-MNIST test images as PNGs in class subfolders 0-9."""
    folder = tmp_path_factory.mktemp("test")
    for index, (image, label, _, _) in enumerate(load_fashion_mnist("test").head(100)):
        (folder / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / str(label) / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def finetuned(
    encoder_run: Path, test_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run = tmp_path_factory.mktemp("finetuned") / "run"
    shutil.copytree(encoder_run, run)
    args = ["finetune", str(run), *FINETUNE, "--epochs", "2", "--test", str(test_folder)]
    assert main(args) == 0
    return run


def _subset_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_subset_is_class_balanced_and_fixed_by_its_seed() -> None:
    labels = load_fashion_mnist("train").labels
    assert labels is not None
    chosen = balanced_subset(labels, 600, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [60] * 10
    uneven = torch.bincount(labels[balanced_subset(labels, 605, seed=0)])
    assert uneven.sum() == 605 and set(uneven.tolist()) == {60, 61}
    assert torch.equal(chosen, balanced_subset(labels, 600, seed=0))
    assert not torch.equal(chosen, balanced_subset(labels, 600, seed=1))
    assert torch.equal(chosen, chosen.unique())  # sorted, no image twice


def test_finetune_writes_its_subset_results_and_classifier(finetuned: Path) -> None:
    folder = RunFolder(finetuned)
    rows = _subset_rows(folder.finetune_labels)
    assert len(rows) == 40
    assert sorted(row["class"] for row in rows) == sorted(
        [name for name in load_fashion_mnist("test").classes or []] * 4
    )
    record = json.loads(folder.finetune_results.read_text())
    results, protocol = record["results"], record["protocol"]
    assert (results["labels"], results["train_images"], results["test_images"]) == (40, 500, 100)
    assert set(results["labels_per_class"].values()) == {4}
    assert (results["finetune"]["epochs"], results["finetune"]["steps"]) == (2, 4)
    for scores in (results["finetune"]["top1"], results["linear_probe"]["top1"]):
        assert all(0.0 <= value <= 100.0 for value in scores.values())
    assert set(results["finetune"]["top1"]) == {"barlow twins", "random init"}
    assert protocol["settings"]["lr_backbone"] == FinetuneSettings().lr_backbone
    assert "translate" in protocol["augmentation"]  # 28 px: pad-and-crop, not resized crops


def test_the_same_seed_or_the_subset_file_gives_the_same_subset(
    finetuned: Path, test_folder: Path, tmp_path: Path
) -> None:
    quick = ["finetune", str(finetuned), *FINETUNE, "--epochs", "1", "--no-baseline"]
    quick += ["--test", str(test_folder)]
    written = RunFolder(finetuned).finetune_labels.read_bytes()
    assert main([*quick, "--output", str(tmp_path / "again")]) == 0
    assert RunFolder(tmp_path / "again").finetune_labels.read_bytes() == written
    assert main([*quick, "--seed", "1", "--output", str(tmp_path / "seed1")]) == 0
    assert RunFolder(tmp_path / "seed1").finetune_labels.read_bytes() != written
    from_file = [a for a in quick if a not in ("--labels", "40")]
    from_file += ["--subset", str(RunFolder(finetuned).finetune_labels)]
    assert main([*from_file, "--output", str(tmp_path / "file")]) == 0
    assert RunFolder(tmp_path / "file").finetune_labels.read_bytes() == written


def test_finetuning_changes_the_backbone_and_the_linear_probe_does_not(
    encoder_run: Path, finetuned: Path
) -> None:
    # The command: the run's encoder is untouched, the saved classifier's backbone moved.
    pretrained = fingerprint(load_trained_encoder(finetuned).backbone_state)
    assert pretrained == fingerprint(load_trained_encoder(encoder_run).backbone_state)
    assert fingerprint(load_finetuned(finetuned).backbone_state) != pretrained
    # The library: the probe reads frozen features; fine-tuning trains the same backbone.
    data = load_data("fashion-mnist:train", max_samples=200)
    assert data.labels is not None
    labelled = data.subset(balanced_subset(data.labels, 20))
    backbone = _backbone(seed=1)
    before = fingerprint(backbone.state_dict())
    common = {"mean": INFO.mean, "std": INFO.std, "image_size": 28}
    features = extract_features(backbone, labelled, **common)
    assert labelled.labels is not None
    linear_probe(features, labelled.labels, features, labelled.labels, num_classes=10, epochs=5)
    assert fingerprint(backbone.state_dict()) == before
    settings = FinetuneSettings(epochs=1, batch_size=10)
    head = new_head(512, 10, std=0.01, seed=0)
    result = finetune_classifier(
        backbone, head, labelled, labelled, settings, device=torch.device("cpu"), **common
    )
    assert result.steps == 2 and fingerprint(backbone.state_dict()) != before


def _test_images(test_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The test folder in the evaluation view: float images in [0, 1] and labels."""
    data = load_data(str(test_folder), image_size=28, channels=1)
    assert isinstance(data.images, torch.Tensor) and data.labels is not None  # in memory
    return data.images.float() / 255, data.labels


def test_export_with_the_finetuned_head_reproduces_its_logits_and_accuracy(
    finetuned: Path, test_folder: Path, tmp_path: Path
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    images, labels = _test_images(test_folder)
    classifier = barlowtwins.load_pretrained(finetuned, with_head="finetuned")
    with torch.no_grad():
        logits = classifier(prepare_images((images * 255).to(torch.uint8), INFO.mean, INFO.std))
    recorded = json.loads(RunFolder(finetuned).finetune_results.read_text())["results"]
    accuracy = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(recorded["finetune"]["top1"]["barlow twins"])

    out = tmp_path / "classifier.safetensors"
    args = ["export", str(finetuned), "--format", "safetensors", "--output", str(out)]
    assert main([*args, "--with-head", "finetuned"]) == 0
    with safe_open(out, framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["finetuned"])["labels"] == 40
    namespace: dict[str, object] = {}
    exec(header["build"], namespace)  # plain torchvision lines
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    model.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        rebuilt = model.eval()(prepare_images((images * 255).to(torch.uint8), INFO.mean, INFO.std))
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)

    graph = tmp_path / "classifier.onnx"
    args = ["export", str(finetuned), "--format", "onnx", "--output", str(graph)]
    assert main([*args, "--with-head", "finetuned"]) == 0
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {"images": images.numpy()})
    assert relative_difference(torch.from_numpy(from_onnx), logits) < 1e-4


def test_the_model_card_reports_the_finetuned_classifier(finetuned: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    folder = tmp_path / "hf"
    args = ["export", str(finetuned), "--format", "hf", "--output", str(folder)]
    assert main([*args, "--with-head", "finetuned"]) == 0
    card = ModelCard.load(folder / "README.md")
    recorded = json.loads(RunFolder(finetuned).finetune_results.read_text())["results"]
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    top1 = recorded["finetune"]["top1"]["barlow twins"]
    assert scores["fine-tuned top-1 (40 labels)"] == round(top1, 2)
    assert "fine-tuned classifier" in card.text and "## Fine-tuning with few labels" in card.text
    assert (
        f"| fine-tuned from random init | {recorded['finetune']['top1']['random init']:.2f} |"
        in (card.text)
    )


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes: c0 with 3 images, c1 with 10."""
    folder = tmp_path_factory.mktemp("uneven")
    for index, (image, _, _, _) in enumerate(load_fashion_mnist("test").head(13)):
        directory = folder / ("c0" if index < 3 else "c1")
        directory.mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(directory / f"{index}.png")
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--percent", "0"], "--percent must lie in (0, 100], got 0"),
        (["--percent", "150"], "--percent must lie in (0, 100], got 150"),
        (["--percent", "0.01", "--max-samples", "500"], "0.01 % of 500 images is less than one"),
        (["--labels", "10", "--train", "UNEVEN"], "asked for 5 labels of class 'c0', which has 3"),
        (["--labels", "1", "--train", "UNEVEN"], "choose between 2 (one per class) and 13"),
        (["--labels", "5", "--train", "FLAT"], "--train data has no labels"),
    ],
)
def test_bad_input_is_a_one_line_error(
    encoder_run: Path,
    uneven_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, (image, _, _, _) in enumerate(load_fashion_mnist("test").head(4)):
        Image.fromarray(image[0].numpy()).save(flat / f"{index}.png")
    places = {"UNEVEN": str(uneven_folder), "FLAT": str(flat)}
    args = [places.get(arg, arg) for arg in args]
    output = tmp_path / "out"
    assert main(["finetune", str(encoder_run), *args, "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("barlowtwins: error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not output.exists()


def test_exporting_a_finetuned_head_that_was_never_trained_is_refused(
    encoder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.safetensors"
    args = ["export", str(encoder_run), "--format", "onnx", "--output", str(out)]
    assert main([*args, "--with-head", "finetuned"]) == 2
    err = capsys.readouterr().err
    assert "no fine-tuned classifier in" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
