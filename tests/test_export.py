"""`barlowtwins export`: every format written from a real run and loaded back by other tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import barlowtwins
from barlowtwins.app.cli import main
from barlowtwins.app.export import FORMATS, relative_difference
from barlowtwins.backbones import build_backbone
from barlowtwins.encoder import EncoderInfo
from barlowtwins.runs.files import save_encoder
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import load_trained_encoder

TINY = ["--backbone", "resnet10", "--max-samples", "128", "--batch-size", "64"]
TINY += ["--val-max-samples", "200", "--knn-bank-size", "128", "--knn-k", "20"]
TINY += ["--projector-dims", "64", "64", "--precision", "32", "--epochs", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fit with plots, and a linear head saved by `evaluate --linear --save-head`."""
    output = tmp_path_factory.mktemp("fit") / "run"
    assert main(["fit", *TINY, "--output", str(output)]) == 0
    evaluate = ["evaluate", str(output), "--max-samples", "300", "--linear"]
    assert main([*evaluate, "--linear-epochs", "5", "--save-head"]) == 0
    return output


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """backbone.pt + backbone.json of a (random-init) 1-channel timm resnet10t."""
    pytest.importorskip("timm")
    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    backbone, _ = build_backbone("timm:resnet10t", in_channels=1)
    info = EncoderInfo("timm:resnet10t", 1, False, 32, (0.5,), (0.25,))
    save_encoder(backbone, info, RunFolder(folder))
    return folder


def _export(source: Path, format: str, output: Path, *extra: str) -> None:
    assert main(["export", str(source), "--format", format, "--output", str(output), *extra]) == 0


def _build(code: str) -> torch.nn.Module:
    """Run the build lines an export records (plain torchvision / timm) and return `model`."""
    namespace: dict[str, object] = {}
    exec(code, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    return model


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-5, atol=1e-6)


def test_safetensors_loads_strictly_into_plain_torchvision(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.safetensors"
    _export(run, "safetensors", out)
    with safe_open(out, framework="pt") as handle:
        header = handle.metadata()
    assert (header["architecture"], header["in_channels"], header["image_size"]) == (
        "resnet10",
        "1",
        "28",
    )
    info = load_trained_encoder(run).info
    assert tuple(json.loads(header["mean"])) == info.mean
    assert tuple(json.loads(header["std"])) == info.std
    assert "barlowtwins" not in header["build"]  # plain torchvision lines
    model = _build(header["build"])
    model.load_state_dict(load_file(out), strict=True)
    _same_outputs(model, barlowtwins.load_pretrained(run), (1, 28, 28))


def test_safetensors_with_head_is_a_torchvision_classifier(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "classifier.safetensors"
    _export(run, "safetensors", out, "--with-head")
    with safe_open(out, framework="pt") as handle:
        header = handle.metadata()
    assert header["num_classes"] == "10" and header["classifier"] == "fc"
    assert header["feature_dim"] == "512"
    assert json.loads(header["classes"])[0] == "T-shirt/top"
    model = _build(header["build"])
    model.load_state_dict(load_file(out), strict=True)
    _same_outputs(model, barlowtwins.load_pretrained(run, with_head=True), (1, 28, 28))
    # The exported file is itself a run source.
    _same_outputs(barlowtwins.load_pretrained(out, with_head=True), model, (1, 28, 28))


def test_timm_backbone_loads_strictly_into_timm(timm_run: Path, tmp_path: Path) -> None:
    import timm

    out = tmp_path / "timm.safetensors"
    _export(timm_run, "safetensors", out)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    model.load_state_dict(load_file(out), strict=True)
    _same_outputs(model, barlowtwins.load_pretrained(timm_run), (1, 32, 32))
    with safe_open(out, framework="pt") as handle:
        built = _build(handle.metadata()["build"])
    built.load_state_dict(load_file(out), strict=True)


def test_timm_reads_the_hf_folder_offline(
    timm_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hf"
    _export(timm_run, "hf", folder)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    _same_outputs(model, barlowtwins.load_pretrained(folder), (1, 32, 32))
    assert tuple(model.pretrained_cfg["mean"]) == (0.5,)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_timm_builds_the_standard_torchvision_resnets_with_the_same_keys(name: str) -> None:
    import timm

    ours, _ = build_backbone(name, in_channels=1)
    theirs = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1)
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in theirs.state_dict().items()}


def test_timm_reads_the_hf_folder_of_a_torchvision_resnet18(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", in_channels=3)
    info = EncoderInfo("resnet18", 3, False, 32, (0.5,) * 3, (0.25,) * 3)
    save_encoder(backbone, info, RunFolder(tmp_path))
    _export(tmp_path, "hf", tmp_path / "hf")
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)
    _same_outputs(model, barlowtwins.load_pretrained(tmp_path), (3, 32, 32))


def test_onnx_matches_pytorch_with_a_dynamic_batch(run: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "encoder.onnx"
    _export(run, "onnx", out, "--with-head")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["normalization"].startswith("included")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    classifier = barlowtwins.load_pretrained(run, with_head=True)
    cfg = classifier.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    for batch in (1, 5):
        images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = classifier((images - mean) / std)
        assert logits.shape == (batch, 10)
        assert relative_difference(torch.from_numpy(logits), expected) < 1e-4


def test_hf_folder_loads_offline_and_carries_a_model_card(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hf"
    _export(run, "hf", folder)
    assert sorted(p.name for p in (folder / "plots").glob("*.png")) == sorted(
        p.name for p in (run / "plots").glob("*.png")
    )
    _same_outputs(
        barlowtwins.load_pretrained(folder), barlowtwins.load_pretrained(run), (1, 28, 28)
    )
    config = json.loads((folder / "config.json").read_text())
    model = _build(config["barlowtwins"]["build"])
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    _same_outputs(model, barlowtwins.load_pretrained(run), (1, 28, 28))

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "barlowtwins"
    assert "self-supervised-learning" in card.data.tags
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    results = json.loads((run / "results.json").read_text())
    knn = {r.metric_name: r.metric_value for r in card.data.eval_results}
    trained = results["knn"]["protocols"]["k=20 T=0.07"]["top1"]["barlow twins"]
    assert knn["kNN top-1 (k=20 T=0.07)"] == round(trained, 2)
    evaluation = json.loads((run / "evaluation.json").read_text())
    probe = evaluation["results"]["linear_probe"]["top1"]["barlow twins"]
    assert knn["linear probe top-1"] == round(probe, 2)
    text = card.text
    assert "barlowtwins.load_pretrained(" in text and "load_state_dict(load_file(" in text
    assert "projector_dims:" in text  # the run's config.yaml
    assert results["hardware"]["device"] in text
    assert "![health](plots/health.png)" in text


def test_hf_folder_with_head_describes_the_classifier(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    _export(run, "hf", folder, "--with-head")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_features"], config["num_classes"]) == (512, 10)
    assert config["label_names"][-1] == "Ankle boot"
    classifier = barlowtwins.load_pretrained(folder, with_head=True)
    _same_outputs(classifier, barlowtwins.load_pretrained(run, with_head=True), (1, 28, 28))
    model = _build(config["barlowtwins"]["build"])
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    _same_outputs(model, classifier, (1, 28, 28))


def test_full_rebuilds_barlow_twins(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.safetensors"
    _export(run, "full", out)
    state = load_file(out)
    assert {key.split(".")[0] for key in state} == {"backbone", "projector"}
    model = barlowtwins.BarlowTwins.from_name(
        "resnet10", in_channels=1, small_image=False, projector_dims=(64, 64)
    )
    model.load_state_dict(state, strict=True)
    _same_outputs(model, load_trained_encoder(run, projector=True).model(), (1, 28, 28))
    _same_outputs(load_trained_encoder(out, projector=True).model(), model, (1, 28, 28))


def test_help_names_every_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}:" in text for name in FORMATS)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "pickle"], "unknown format 'pickle'; choose one of"),
        (["--format", "full", "--with-head"], "--with-head applies to"),
    ],
)
def test_bad_options_are_one_line_errors(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["export", str(run), *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("barlowtwins: error: ") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out.safetensors"
    assert (
        main(["export", str(tmp_path / "empty"), "--format", "safetensors", "--output", str(out)])
        == 2
    )
    assert "is not a run" in capsys.readouterr().err
    assert not out.exists()


def test_no_head_to_export_is_refused(
    timm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.safetensors"
    args = ["export", str(timm_run), "--format", "safetensors", "--output", str(out), "--with-head"]
    assert main(args) == 2
    assert "no linear head" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format", ["safetensors", "hf"])
def test_an_existing_target_needs_force(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], format: str
) -> None:
    out = tmp_path / "target"
    _export(run, format, out)
    stamp = os.stat(out).st_mtime_ns
    assert main(["export", str(run), "--format", format, "--output", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert os.stat(out).st_mtime_ns == stamp
    _export(run, format, out, "--force")
    assert _leftovers(tmp_path) == []
    assert load_trained_encoder(out).info == load_trained_encoder(run).info


def test_force_never_replaces_a_folder_that_is_not_an_export(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--format", "hf", "--output", str(precious), "--force"]) == 2
    assert "not an earlier hf export" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_embed_reads_an_export(run: Path, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "encoder.safetensors"
    _export(run, "safetensors", out)
    for source, name in ((run, "a.npz"), (out, "b.npz")):
        args = ["embed", str(source), "--data", "fashion-mnist:test", "--max-samples", "20"]
        assert main([*args, "--output", str(tmp_path / name)]) == 0
    a, b = (np.load(tmp_path / name)["embeddings"] for name in ("a.npz", "b.npz"))
    np.testing.assert_array_equal(a, b)
