"""``barlowtwins export``: a trained encoder in formats other tools load without barlowtwins.

Formats (:data:`FORMATS`):

* ``safetensors``: the encoder's ``state_dict`` with its source library's keys, so a plain
  torchvision ``ResNet`` or ``timm.create_model(...)`` of the same layout loads it with
  ``strict=True``; the header says how to build that module (``build``), the input size, the
  channels and the normalisation.
* ``onnx``: the encoder as an ONNX graph with a dynamic batch axis; the normalisation is part
  of the graph, so it takes images scaled to [0, 1].
* ``hf``: a folder in the Hugging Face model-repository layout: ``config.json``,
  ``model.safetensors`` (the ``safetensors`` export), ``README.md`` (the model card, with YAML
  front matter as ``huggingface_hub`` reads it) and the run's plots.
* ``full``: backbone and projector, keys ``backbone.*`` and ``projector.*`` of
  :class:`barlowtwins.BarlowTwins`, to continue training or fine-tune elsewhere.

With ``with_head``, the linear head that ``evaluate --linear --save-head`` stored in the run
becomes the module's classifier (``fc`` of a torchvision ResNet, timm's classifier): the
export is a classifier, not an encoder followed by a random ``fc``.

Every output is written under a temporary name next to its target and renamed into place, so a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from barlowtwins.app.runs import (
    CLASSIFIER_CONTENT,
    ENCODER_CONTENT,
    EVALUATION_RESULTS,
    FORMAT_KEY,
    FULL_CONTENT,
    HF_CONFIG,
    HF_WEIGHTS,
    LinearHead,
    Run,
    attach_head,
    classifier_name,
    load_run,
)
from barlowtwins.training.checkpoint import EncoderInfo, atomic_write

#: The formats of ``barlowtwins export --format``, with what each one writes.
FORMATS: dict[str, str] = {
    "safetensors": "the encoder's weights with torchvision's / timm's keys, build recipe and "
    "preprocessing in the header",
    "onnx": "the encoder as ONNX, dynamic batch axis, normalisation included (input: images "
    "in [0, 1])",
    "hf": "a Hugging Face model folder: config.json, model.safetensors, README.md model card, "
    "plots",
    "full": "backbone and projector (keys backbone.* and projector.* of barlowtwins.BarlowTwins)",
}
# torchvision ResNets whose layout timm builds under the same name with the same keys, so the
# Hugging Face folder of such an encoder also loads with timm (not with the small-image stem).
_SAME_IN_TIMM = frozenset({"resnet18", "resnet34", "resnet50"})
_TIMM_PREFIX = "timm:"
# ONNX Runtime against PyTorch on the export-time check (float32).
_ONNX_MAX_RELATIVE_DIFFERENCE = 1e-4
_PLOTS = "plots"


class ExportError(ValueError):
    """An export cannot be made; the message is one user-facing line."""


def export(
    run_path: str | Path,
    format: str,
    output: str | Path,
    *,
    with_head: bool = False,
    force: bool = False,
) -> Path:
    """Export the encoder of a run.

    Args:
        run_path: Anything :func:`barlowtwins.app.runs.load_run` reads.
        format: One of :data:`FORMATS`.
        output: The file (``safetensors``, ``onnx``, ``full``) or folder (``hf``) to write.
        with_head: Include the linear head saved by ``evaluate --linear --save-head``.
        force: Replace an existing output (a folder only if it is an earlier ``hf`` export).

    Returns:
        ``output``.

    Raises:
        ExportError: On an unknown format, an existing output without ``force``, a missing
            head or optional dependency.
        CheckpointError: If ``run_path`` is not a run.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if with_head and format == "full":
        raise ExportError("--with-head applies to the safetensors, onnx and hf formats")
    output = Path(output)
    _check_target(output, format, force)
    run = load_run(run_path, projector=format == "full")
    head = run.matching_head() if with_head else None
    output.parent.mkdir(parents=True, exist_ok=True)
    if format == "hf":
        _replace_folder(output, lambda tmp: _write_hf(run, head, tmp))
        return output
    writers: dict[str, Callable[[Path], None]] = {
        "safetensors": lambda tmp: _write_safetensors(run, head, tmp),
        "onnx": lambda tmp: _write_onnx(run, head, tmp),
        "full": lambda tmp: _write_full(run, tmp),
    }
    atomic_write(output, writers[format])
    return output


def _check_target(output: Path, format: str, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise ExportError(f"{output} exists; pass --force to replace it")
    if format == "hf":
        if not _is_hf_export(output):
            raise ExportError(f"{output} exists and is not an earlier hf export; not replacing it")
    elif not output.is_file():
        raise ExportError(f"{output} exists and is not a file; not replacing it")


def _is_hf_export(folder: Path) -> bool:
    try:
        return "barlowtwins" in json.loads((folder / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def _replace_folder(output: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then swap it into place."""
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if not output.exists():
            os.replace(tmp, output)
            return
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
        os.replace(output, old / output.name)
        try:
            os.replace(tmp, output)
        except OSError:
            os.replace(old / output.name, output)  # put the previous export back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_timm(run: Run) -> bool:
    """Whether the run's backbone is a timm model (else a torchvision ResNet)."""
    from barlowtwins.backbones import available_backbones

    return run.info.backbone not in available_backbones()


def timm_name(run: Run) -> str | None:
    """The name ``timm.create_model`` builds this encoder under, or ``None``."""
    if is_timm(run):
        return run.info.backbone.removeprefix(_TIMM_PREFIX)
    if run.info.backbone in _SAME_IN_TIMM and not run.info.small_image:
        return run.info.backbone
    return None


def build_code(run: Run, encoder: nn.Module, num_classes: int = 0) -> str:
    """Python lines that build the matching module of the source library, as ``model``.

    torchvision ResNets are spelled as ``ResNet(block, layers)`` with the stem of
    :func:`barlowtwins.backbones.adapt_stem` written out, so the lines need neither
    barlowtwins nor a name for ``resnet10``.
    """
    info = run.info
    if is_timm(run):
        return (
            "import timm\n"
            f"model = timm.create_model({timm_name(run)!r}, pretrained=False, "
            f"num_classes={num_classes}, in_chans={info.in_channels})"
        )
    resnet: Any = encoder  # a torchvision ResNet: its stages and stem are attributes
    block = type(resnet.layer1[0]).__name__
    layers = [len(getattr(encoder, f"layer{i}")) for i in range(1, 5)]
    lines = [
        "import torch",
        f"from torchvision.models.resnet import {block}, ResNet",
        "",
        f"model = ResNet({block}, {layers}"
        + (f", num_classes={num_classes})" if num_classes else ")"),
    ]
    width = resnet.conv1.out_channels
    if info.small_image:
        lines += [
            f"model.conv1 = torch.nn.Conv2d({info.in_channels}, {width}, kernel_size=3, stride=1, "
            "padding=1, bias=False)",
            "model.maxpool = torch.nn.Identity()",
        ]
    elif info.in_channels != 3:
        lines.append(
            f"model.conv1 = torch.nn.Conv2d({info.in_channels}, {width}, kernel_size=7, stride=2, "
            "padding=3, bias=False)"
        )
    if not num_classes:
        lines.append("model.fc = torch.nn.Identity()")
    return "\n".join(lines)


def header(
    run: Run, encoder: nn.Module, *, content: str, head: LinearHead | None = None
) -> dict[str, str]:
    """The safetensors header of an export: what it holds and how to rebuild and feed it.

    Every value is a string (the safetensors format allows no other); lists and booleans are
    JSON.
    """
    from barlowtwins import __version__

    info = run.info
    metadata = {
        FORMAT_KEY: content,
        "barlowtwins_version": __version__,
        "architecture": info.backbone,
        "library": "timm" if is_timm(run) else "torchvision",
        "in_channels": str(info.in_channels),
        "small_image": json.dumps(info.small_image),
        "image_size": str(info.image_size),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "feature_dim": str(_feature_dim(run, encoder)),
        "normalization": "not included: feed (images in [0, 1] - mean) / std, per channel",
        "build": build_code(run, encoder, head.num_classes if head else 0),
    }
    if timm_name(run) is not None:
        metadata["timm_model"] = str(timm_name(run))
    if head is not None:
        metadata["classifier"] = classifier_name(encoder)
        metadata["num_classes"] = str(head.num_classes)
        metadata["classes"] = json.dumps(list(head.classes) if head.classes else None)
    return metadata


def _feature_dim(run: Run, encoder: nn.Module) -> int:
    with torch.no_grad():
        size = run.info.image_size
        return int(encoder(torch.zeros(2, run.info.in_channels, size, size)).flatten(1).shape[1])


def _encoder_tensors(run: Run, head: LinearHead | None) -> tuple[nn.Module, dict[str, Tensor]]:
    encoder = run.encoder()
    tensors = dict(run.backbone_state)
    if head is not None:
        prefix = classifier_name(encoder)
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"] = head.weight, head.bias
    return encoder, {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def _write_safetensors(run: Run, head: LinearHead | None, target: Path) -> None:
    from safetensors.torch import save_file

    encoder, tensors = _encoder_tensors(run, head)
    content = CLASSIFIER_CONTENT if head is not None else ENCODER_CONTENT
    save_file(tensors, target, metadata=header(run, encoder, content=content, head=head))


def _write_full(run: Run, target: Path) -> None:
    from safetensors.torch import save_file

    model = run.model()
    metadata = header(run, model.get_submodule("backbone"), content=FULL_CONTENT)
    metadata["projector_dims"] = json.dumps(list(run.projector_dims or ()))
    metadata["build"] = (
        "import barlowtwins\n"
        f"model = barlowtwins.BarlowTwins.from_name({run.info.backbone!r}, "
        f"in_channels={run.info.in_channels}, small_image={run.info.small_image}, "
        f"projector_dims={tuple(run.projector_dims or ())})"
    )
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, target, metadata=metadata)


class Normalized(nn.Module):
    """``module((images - mean) / std)``: the preprocessing of training, inside the graph."""

    def __init__(self, module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Features (or logits) of images scaled to [0, 1], shape (B, C, H, W)."""
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return self.module((images - mean) / std).flatten(1)


def _write_onnx(run: Run, head: LinearHead | None, target: Path) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ModuleNotFoundError as error:
        raise ExportError(
            f'the onnx format needs {error.name}: pip install "barlowtwins[onnx]"'
        ) from None
    encoder = run.encoder()
    if head is not None:
        attach_head(encoder, head)
    graph = Normalized(encoder, run.info.mean, run.info.std).eval()
    size, channels = run.info.image_size, run.info.in_channels
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    output_name = "logits" if head is not None else "features"
    with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=["images"],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    metadata = header(
        run, encoder, content=CLASSIFIER_CONTENT if head else ENCODER_CONTENT, head=head
    )
    metadata["normalization"] = (
        "included: feed images scaled to [0, 1]; the graph subtracts mean and divides by std"
    )
    metadata.pop("build")
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, target)
    _check_onnx(target, graph, example)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Hide the INFO lines the ONNX graph optimiser logs for every pass it runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_onnx(path: Path, graph: nn.Module, example: Tensor) -> None:
    """Run the saved graph with ONNX Runtime, when installed, against PyTorch."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.cat([example, example.flip(0), torch.rand_like(example)])
    (got,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = graph(batch)
    difference = relative_difference(torch.from_numpy(got), expected)
    if difference > _ONNX_MAX_RELATIVE_DIFFERENCE:
        raise ExportError(
            f"the ONNX graph differs from PyTorch by {difference:.2e} (relative); not written"
        )


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """``max |got - expected| / max |expected|``: the error relative to the output's scale."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((got - expected).abs().max() / scale)


def hf_config(run: Run, encoder: nn.Module, head: LinearHead | None) -> dict[str, Any]:
    """``config.json`` of the Hugging Face folder, in timm's layout plus a ``barlowtwins`` key.

    timm's fields (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``,
    ``model_args``) let ``timm.create_model("local-dir:FOLDER", pretrained=True)`` build and
    load timm backbones and the torchvision ResNets that timm builds identically.
    """
    info = run.info
    num_classes = head.num_classes if head else 0
    content = CLASSIFIER_CONTENT if head is not None else ENCODER_CONTENT
    meta = header(run, encoder, content=content, head=head)
    config: dict[str, Any] = {
        "architecture": timm_name(run) or info.backbone,
        "num_classes": num_classes,
        "num_features": int(meta["feature_dim"]),
        "model_args": {"in_chans": info.in_channels},
        "pretrained_cfg": {
            "input_size": [info.in_channels, info.image_size, info.image_size],
            "fixed_input_size": False,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(info.mean),
            "std": list(info.std),
            "num_classes": num_classes,
            "classifier": classifier_name(encoder),
        },
        "barlowtwins": {key: _json_value(value) for key, value in meta.items()},
    }
    if head is not None and head.classes:
        config["label_names"] = list(head.classes)
    return config


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _write_hf(run: Run, head: LinearHead | None, folder: Path) -> None:
    atomic_write(folder / HF_WEIGHTS, lambda tmp: _write_safetensors(run, head, tmp))
    encoder = run.encoder()  # without the head: its features describe the backbone
    (folder / HF_CONFIG).write_text(json.dumps(hf_config(run, encoder, head), indent=2) + "\n")
    plots: list[str] = []
    if run.directory is not None and (run.directory / _PLOTS).is_dir():
        (folder / _PLOTS).mkdir()
        for png in sorted((run.directory / _PLOTS).glob("*.png")):
            shutil.copy2(png, folder / _PLOTS / png.name)
            plots.append(png.name)
    (folder / "README.md").write_text(model_card(run, encoder, head, plots))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return content if isinstance(content, dict) else None


def model_card(run: Run, encoder: nn.Module, head: LinearHead | None, plots: list[str]) -> str:
    """The ``README.md`` of the Hugging Face folder, from what the run folder recorded.

    The YAML front matter follows the Hugging Face model card conventions (``library_name``,
    ``tags``, ``datasets``, ``metrics``, ``pipeline_tag``, ``model-index`` with the measured
    results). Nothing is filled in that the run did not record.
    """
    info = run.info
    directory = run.directory
    config = _read_yaml(directory / "config.yaml") if directory else None
    results = _read_json(directory / "results.json") if directory else None
    evaluation = _read_json(directory / EVALUATION_RESULTS) if directory else None
    if evaluation is not None and "results" not in evaluation:
        # `evaluate --json RUN/evaluation.json` writes the results alone.
        evaluation = {"results": evaluation, "protocol": {}}
    data = str(config.get("data", "")) if config else ""
    fashion = data.split(":")[0] == "fashion-mnist"
    dataset_name = "Fashion-MNIST" if fashion else (data or "unrecorded data")
    library = "timm" if is_timm(run) else "torchvision"
    metrics = _card_metrics(results, evaluation)

    front: dict[str, Any] = {
        "library_name": "barlowtwins",
        "tags": [
            "barlowtwins",
            "barlow-twins",
            "self-supervised-learning",
            "image-feature-extraction",
            library,
            info.backbone.removeprefix(_TIMM_PREFIX),
        ],
        "pipeline_tag": "image-classification" if head else "image-feature-extraction",
    }
    if fashion:
        front["datasets"] = ["zalando-datasets/fashion_mnist"]
    if metrics:
        front["metrics"] = ["accuracy"]
        front["model-index"] = [
            {
                "name": f"barlowtwins-{info.backbone.removeprefix(_TIMM_PREFIX)}",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": name},
                        "dataset": {
                            "name": dataset_name,
                            "type": "zalando-datasets/fashion_mnist" if fashion else data,
                            "split": "test",
                        },
                        "metrics": [{"type": "accuracy", "value": value, "name": name}],
                    }
                    for name, value in metrics
                ],
            }
        ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = "classifier" if head else "encoder"
    lines += [
        f"# Barlow Twins {info.backbone} {title}" + (f" ({dataset_name})" if data else ""),
        "",
        "A "
        + ("torchvision ResNet" if library == "torchvision" else "timm model")
        + f" (`{info.backbone}`, {info.in_channels} input channel"
        + ("s" if info.in_channels > 1 else "")
        + f", {'small-image stem, ' if info.small_image else ''}"
        + f"{_feature_dim(run, encoder)}-d features) pretrained with "
        "Barlow Twins (Zbontar et al. 2021, [arXiv 2103.03230](https://arxiv.org/abs/2103.03230))"
        " by the [barlowtwins](https://pypi.org/project/barlowtwins/) library"
        + (
            f", with a linear classifier over {head.num_classes} classes trained on its frozen "
            "features."
            if head
            else "."
        ),
        "",
    ]
    lines += _training_section(config, results)
    lines += _results_section(results, evaluation)
    lines += _health_section(directory / "metrics.csv" if directory else None, info, config)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(name).stem}](plots/{name})" for name in plots]
        lines.append("")
    lines += _loading_section(run, encoder, head)
    return "\n".join(lines) + "\n"


def _card_metrics(
    results: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> list[tuple[str, float]]:
    metrics: list[tuple[str, float]] = []
    knn = (results or {}).get("knn") or {}
    for k, scores in (knn.get("at_k") or {}).items():
        if "barlow twins" in scores:
            metrics.append((f"kNN top-1 (k={k})", round(float(scores["barlow twins"]), 2)))
    probe = ((evaluation or {}).get("results") or {}).get("linear probe top-1 %")
    if probe is not None:
        metrics.append(("linear probe top-1", round(float(probe), 2)))
    return metrics


def _training_section(config: dict[str, Any] | None, results: dict[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    if config is None:
        return [*lines, "The run folder recorded no `config.yaml`: the recipe is unknown.", ""]
    results = results or {}
    hardware = results.get("hardware")
    if isinstance(hardware, dict):
        hardware = (
            f"{hardware.get('device')} ({hardware.get('accelerator')}), "
            f"{hardware.get('devices')} device(s) x {hardware.get('num_nodes')} node(s), "
            f"precision {hardware.get('precision')}, torch {hardware.get('torch')}"
        )
    facts = [
        ("data", f"`{config.get('data')}`"),
        ("training images", results.get("train_images")),
        ("epochs", config.get("epochs")),
        ("batch", _batch_fact(config)),
        ("optimizer", f"{config.get('optimizer')}, base lr {config.get('lr_weights')} (weights)"),
        ("projector", config.get("projector_dims")),
        ("lambda", config.get("lambda_param")),
        (
            "training time",
            f"{results['training_minutes']} min" if "training_minutes" in results else None,
        ),
        ("hardware", hardware or "not recorded by this run"),
    ]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts if value is not None]
    lines += [
        "",
        "The whole recipe, the run's `config.yaml` (`barlowtwins fit --config` reruns it):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return lines


def _batch_fact(config: dict[str, Any]) -> str:
    """The batch of a run's config: global since ``batch_size_per_device`` exists, per process
    in the config of a run from before."""
    split = f"{config.get('devices')} device(s) x {config.get('num_nodes')} node(s)"
    per_device = config.get("batch_size_per_device")
    if per_device is None:
        return f"{config.get('batch_size')} per process x {split}"
    return f"{config.get('batch_size')} global = {per_device} per device x {split}"


def _results_section(
    results: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> list[str]:
    lines = ["## Results", ""]
    knn = (results or {}).get("knn")
    if knn:
        columns = list(knn["at_k"])
        encoders = list(knn["at_k"][columns[0]])
        lines += [
            f"Weighted kNN top-1 accuracy (%) on {knn['test_images']} test images: cosine "
            f"similarity, temperature {knn['temperature']}, all "
            f"{(results or {}).get('train_images')} training images vote "
            "(measured by `barlowtwins fit` at the end of training):",
            "",
            "| encoder | " + " | ".join(f"k={k}" for k in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        lines += [
            f"| {name} | " + " | ".join(f"{knn['at_k'][k][name]:.2f}" for k in columns) + " |"
            for name in encoders
        ]
        lines.append("")
    if evaluation:
        protocol = evaluation.get("protocol") or {}
        where = (
            f" (train data `{protocol.get('train')}`, test data `{protocol.get('test')}`)"
            if protocol
            else " (its protocol was not recorded)"
        )
        lines += [f"`barlowtwins evaluate`{where}:", "", "| metric | value |", "|---|---:|"]
        lines += [
            f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in evaluation.get("results", {}).items()
        ]
        lines.append("")
        if protocol:
            lines += ["Protocol: `" + json.dumps(protocol) + "`", ""]
    if not knn and not evaluation:
        lines += ["No accuracy was measured for this run.", ""]
    return lines


def _last_logged(metrics_csv: Path) -> dict[str, tuple[int, float]]:
    """The last logged value (and its step) of every column of a Lightning metrics.csv."""
    last: dict[str, tuple[int, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    last[name] = (int(row["step"]), float(value))
    return last


def _health_section(
    metrics_csv: Path | None, info: EncoderInfo, config: dict[str, Any] | None
) -> list[str]:
    if metrics_csv is None or not metrics_csv.is_file():
        return []
    from barlowtwins import health

    try:
        last = _last_logged(metrics_csv)
    except (OSError, ValueError, KeyError):
        return []
    dims = (config or {}).get("projector_dims") or []
    rows = []
    if health.LOSS_PER_FEATURE in last:
        step, value = last[health.LOSS_PER_FEATURE]
        rows.append(f"| loss / D | {value:.4f} | step {step} |")
    if health.INVARIANCE in last and dims:
        step, value = last[health.INVARIANCE]
        rows.append(f"| invariance term / D | {value / dims[-1]:.4f} | step {step} |")
    if health.EMBEDDING_STD in last:
        step, value = last[health.EMBEDDING_STD]
        healthy = f" (healthy: 1/sqrt(D) = {dims[-1] ** -0.5:.4f})" if dims else ""
        rows.append(f"| embedding std{healthy} | {value:.4f} | step {step} |")
    if health.EFFECTIVE_RANK in last:
        step, value = last[health.EFFECTIVE_RANK]
        rows.append(f"| effective rank of held-out features | {value:.1f} | step {step} |")
    if not rows:
        return []
    return [
        "## Training health",
        "",
        "Last logged values (`metrics.csv` of the run; what they mean: "
        "`docs/is_it_working.md` of barlowtwins):",
        "",
        "| metric | value | when |",
        "|---|---:|---|",
        *rows,
        "",
    ]


def _loading_section(run: Run, encoder: nn.Module, head: LinearHead | None) -> list[str]:
    info = run.info
    output = "logits" if head else "features"
    lines = [
        "## Use",
        "",
        "Inputs: images resized to "
        f"{info.image_size}x{info.image_size}, {info.in_channels} channel(s), scaled to [0, 1], "
        f"then normalised per channel with mean {list(info.mean)} and std {list(info.std)}.",
        "",
        "With barlowtwins (offline; `pretrained_cfg` carries the input size and normalisation):",
        "",
        "```python",
        "import barlowtwins",
        "",
        'model = barlowtwins.load_pretrained("PATH/TO/THIS/FOLDER"'
        + (", with_head=True)" if head else ")")
        + f"  # returns {output}",
        "```",
        "",
        "By hand, with " + ("timm" if is_timm(run) else "torchvision") + " and safetensors only:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        build_code(run, encoder, head.num_classes if head else 0),
        f'model.load_state_dict(load_file("PATH/TO/THIS/FOLDER/{HF_WEIGHTS}"))  # strict',
        "model.eval()",
        "```",
        "",
    ]
    if timm_name(run) is not None:
        lines += [
            "timm also reads this folder itself (its `local-dir:` source, timm 1.0.31):",
            "",
            "```python",
            "import timm",
            "",
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
            "```",
            "",
        ]
    return lines
