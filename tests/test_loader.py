"""The one loader of runs: every place a trained encoder lives, the linear head, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import barlowtwins
from barlowtwins.app.cli import main
from barlowtwins.app.inference import encode
from barlowtwins.data import load_fashion_mnist
from barlowtwins.runs.files import CheckpointError
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import fingerprint, load_trained_encoder

# A run small enough for a test: 128 training images, 2 steps.
TINY = ["--backbone", "resnet10", "--max-samples", "128", "--batch-size", "64"]
TINY += ["--val-max-samples", "200", "--knn-bank-size", "128", "--knn-k", "20"]
TINY += ["--projector-dims", "64", "64", "--precision", "32", "--epochs", "1", "--no-plots"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fit") / "run"
    assert main(["fit", *TINY, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 Fashion-MNIST test images as PNGs in class subfolders named by label (0-9)."""
    folder = tmp_path_factory.mktemp("labelled")
    test = load_fashion_mnist("test").head(60)
    for index, (image, label, _, _) in enumerate(test):
        directory = folder / str(label)
        directory.mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(directory / f"{index}.png")
    return folder


def test_folder_backbone_file_and_checkpoint_hold_the_same_encoder(run: Path) -> None:
    runs = [
        load_trained_encoder(source)
        for source in (run, run / "backbone.pt", run / "checkpoints/last.ckpt")
    ]
    assert len({fingerprint(r.backbone_state) for r in runs}) == 1
    assert len({r.info for r in runs}) == 1
    assert all(r.folder == RunFolder(run) for r in runs)
    assert runs[0].info.backbone == "resnet10" and runs[0].info.in_channels == 1


def test_projector_comes_from_the_checkpoint(run: Path) -> None:
    loaded = load_trained_encoder(run, projector=True)
    assert loaded.source == run / "checkpoints" / "last.ckpt"
    assert loaded.projector_dims == (64, 64)
    model = loaded.model()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 64)


def test_backbone_file_has_no_projector(run: Path) -> None:
    with pytest.raises(CheckpointError, match="holds only the backbone"):
        load_trained_encoder(run / "backbone.pt", projector=True)
    with pytest.raises(CheckpointError, match="holds no projector"):
        load_trained_encoder(run).model()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "is not a run"),
        (lambda d: d / "missing.pt", "checkpoint not found"),
        (lambda d: _write(d / "x.safetensors", b"not safetensors"), "cannot read"),
        (lambda d: _plain_safetensors(d / "plain.safetensors"), "not written by `barlowtwins"),
        (
            lambda d: _write(d / "backbone.pt", b"this is not a checkpoint"),
            "cannot read checkpoint",
        ),
    ],
)
def test_what_is_not_a_run_is_one_clear_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError, match=message):
        load_trained_encoder(make(tmp_path))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _plain_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, path)
    return path


def test_evaluate_saves_a_head_that_reproduces_the_probe(
    run: Path, labelled_folder: Path, tmp_path: Path
) -> None:
    work = tmp_path / "run"
    shutil.copytree(run, work)
    report = tmp_path / "eval.json"
    args = ["evaluate", str(work), "--train", "fashion-mnist", "--max-samples", "300"]
    args += ["--test", str(labelled_folder), "--linear", "--linear-epochs", "20"]
    assert main([*args, "--save-head", "--json", str(report)]) == 0
    accuracy = json.loads(report.read_text())["linear_probe"]["top1"]["barlow twins"]
    saved = json.loads((work / "evaluation.json").read_text())
    assert saved["results"]["linear_probe"]["top1"]["barlow twins"] == accuracy
    assert saved["protocol"]["linear_probe"]["epochs"] == 20
    assert RunFolder(work).linear_head.is_file()

    # The head applies to raw features (its standardisation is folded in): it reproduces the
    # probe's test accuracy on the same images.
    head = load_trained_encoder(work).matching_head()
    features, dataset = encode(work, str(labelled_folder))
    assert dataset.labels is not None and dataset.classes is not None
    predictions = (features @ head.weight.T + head.bias).argmax(dim=1)
    assert 100.0 * (predictions == dataset.labels).float().mean().item() == pytest.approx(accuracy)
    assert head.classes is not None and len(head.classes) == 10

    # load_pretrained(with_head=True) is the torchvision ResNet with that head as its fc.
    classifier = barlowtwins.load_pretrained(work, with_head=True)
    assert classifier.pretrained_cfg["num_classes"] == 10
    assert classifier.pretrained_cfg["label_names"] == list(head.classes)
    encoder = barlowtwins.load_pretrained(work)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), encoder(x) @ head.weight.T + head.bias)


def test_a_head_of_other_weights_is_refused(
    run: Path, labelled_folder: Path, tmp_path: Path
) -> None:
    work = tmp_path / "run"
    shutil.copytree(run, work)
    args = ["evaluate", str(work), "--max-samples", "200", "--test", str(labelled_folder)]
    assert main([*args, "--linear", "--linear-epochs", "2", "--save-head"]) == 0
    state = torch.load(work / "backbone.pt", weights_only=True)
    state["conv1.weight"] += 1.0  # as if the run had been trained further
    torch.save(state, work / "backbone.pt")
    with pytest.raises(CheckpointError, match="trained on other backbone weights"):
        load_trained_encoder(work).matching_head()


def test_save_head_needs_linear(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run), "--save-head"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "barlowtwins: error: --save-head saves the linear probe's head: add --linear"


def test_load_pretrained_carries_the_preprocessing(run: Path) -> None:
    encoder = barlowtwins.load_pretrained(run)
    cfg = encoder.pretrained_cfg
    info = load_trained_encoder(run).info
    assert cfg["input_size"] == (1, 28, 28)
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (info.mean, info.std)
    assert not encoder.training
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 512)
