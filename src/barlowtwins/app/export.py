"""``barlowtwins export``: a trained encoder in formats other tools load without barlowtwins.

Formats (:data:`FORMATS`):

* ``safetensors``: the encoder's ``state_dict`` with its source library's keys, so a plain
  torchvision ``ResNet`` or ``timm.create_model(...)`` of the same layout loads it with
  ``strict=True``; the header says how to build that module (``build``), the input size, the
  channels and the normalisation.
* ``onnx``: the encoder as an ONNX graph with a dynamic batch axis; the normalisation is part
  of the graph, so it takes images scaled to [0, 1].
* ``hf``: a folder in the Hugging Face model-repository layout: ``config.json``,
  ``model.safetensors`` (the ``safetensors`` export), ``README.md`` (the model card of
  :mod:`barlowtwins.app.model_card`) and the run's plots.
* ``full``: backbone and projector, keys ``backbone.*`` and ``projector.*`` of
  :class:`barlowtwins.BarlowTwins`, to continue training or fine-tune elsewhere.

With ``with_head``, a head stored in the run becomes the module's classifier (``fc`` of a
torchvision ResNet, timm's classifier): the export is a classifier, not an encoder followed by
a random ``fc``. ``"linear"`` (or ``True``) takes the linear head of ``evaluate --linear
--save-head`` on the run's backbone; ``"finetuned"`` takes the classifier of ``barlowtwins
finetune``, whose backbone was trained with its head (``finetuned.safetensors``).

Every output is written under a temporary name next to its target and renamed into place, so a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from barlowtwins.app.model_card import model_card
from barlowtwins.encoder import (
    LinearHead,
    attach_head,
    build_code,
    classifier_name,
    feature_dim,
    is_timm,
    timm_name,
)
from barlowtwins.runs.files import (
    WriteError,
    atomic_write,
    current_umask,
    file_system_refusal,
)
from barlowtwins.runs.loader import (
    CLASSIFIER_CONTENT,
    ENCODER_CONTENT,
    FINETUNED_HEAD,
    FINETUNED_KEY,
    FORMAT_KEY,
    FULL_CONTENT,
    HF_CONFIG,
    HF_PLOTS,
    HF_WEIGHTS,
    LINEAR_HEAD,
    TrainedEncoder,
    load_finetuned,
    load_trained_encoder,
)

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
# ONNX Runtime against PyTorch on the export-time check (float32).
_ONNX_MAX_RELATIVE_DIFFERENCE = 1e-4


class ExportError(ValueError):
    """An export cannot be made; the message is one user-facing line."""


def export(
    run_path: str | Path,
    format: str,
    output: str | Path,
    *,
    with_head: bool | str = False,
    force: bool = False,
) -> Path:
    """Export the encoder of a run.

    Args:
        run_path: Anything :func:`barlowtwins.runs.loader.load_trained_encoder` reads.
        format: One of :data:`FORMATS`.
        output: The file (``safetensors``, ``onnx``, ``full``) or folder (``hf``) to write.
        with_head: Export a classifier: ``"linear"`` (or ``True``) with the linear head
            saved by ``evaluate --linear --save-head``, ``"finetuned"`` the classifier saved
            by ``finetune`` (backbone and head); ``False`` the encoder alone.
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
    if with_head not in (False, True, LINEAR_HEAD, FINETUNED_HEAD):
        raise ExportError(f"--with-head takes {LINEAR_HEAD} or {FINETUNED_HEAD}, got {with_head!r}")
    if with_head and format == "full":
        raise ExportError("--with-head applies to the safetensors, onnx and hf formats")
    output = Path(output)
    _check_target(output, format, force)
    run = (
        load_finetuned(run_path)
        if with_head == FINETUNED_HEAD
        else load_trained_encoder(run_path, projector=format == "full")
    )
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
        try:
            write(tmp)
        except Exception as error:
            cause = file_system_refusal(tmp, error)
            if cause is None:
                raise
            raise WriteError(f"cannot write {output}: {cause}") from None
        os.chmod(tmp, 0o777 & ~current_umask())
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


def header(
    run: TrainedEncoder, encoder: nn.Module, *, content: str, head: LinearHead | None = None
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
        "library": "timm" if is_timm(info) else "torchvision",
        "in_channels": str(info.in_channels),
        "small_image": json.dumps(info.small_image),
        "image_size": str(info.image_size),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "feature_dim": str(feature_dim(info, encoder)),
        "normalization": "not included: feed (images in [0, 1] - mean) / std, per channel",
        "build": build_code(info, encoder, head.num_classes if head else 0),
    }
    if timm_name(info) is not None:
        metadata["timm_model"] = str(timm_name(info))
    if FINETUNED_KEY in run.metadata:
        # A fine-tuned classifier's exports say so, and how it was trained.
        metadata[FINETUNED_KEY] = run.metadata[FINETUNED_KEY]
    if head is not None:
        metadata["classifier"] = classifier_name(encoder)
        metadata["num_classes"] = str(head.num_classes)
        metadata["classes"] = json.dumps(list(head.classes) if head.classes else None)
    return metadata


def _encoder_tensors(
    run: TrainedEncoder, head: LinearHead | None
) -> tuple[nn.Module, dict[str, Tensor]]:
    encoder = run.encoder()
    tensors = dict(run.backbone_state)
    if head is not None:
        prefix = classifier_name(encoder)
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"] = head.weight, head.bias
    return encoder, {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def _write_safetensors(run: TrainedEncoder, head: LinearHead | None, target: Path) -> None:
    from safetensors.torch import save_file

    encoder, tensors = _encoder_tensors(run, head)
    content = CLASSIFIER_CONTENT if head is not None else ENCODER_CONTENT
    save_file(tensors, target, metadata=header(run, encoder, content=content, head=head))


def save_classifier(run: TrainedEncoder, target: Path) -> Path:
    """Write ``run``'s backbone and head as ``export --format safetensors --with-head`` does,
    atomically; ``finetune`` saves its classifier so, and the header keeps the protocol that
    ``run.metadata`` holds under ``"finetuned"``.

    Raises:
        CheckpointError: If ``run`` has no head, or one trained on other backbone weights.
    """
    head = run.matching_head()
    atomic_write(target, lambda tmp: _write_safetensors(run, head, tmp))
    return target


def _write_full(run: TrainedEncoder, target: Path) -> None:
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


def _write_onnx(run: TrainedEncoder, head: LinearHead | None, target: Path) -> None:
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


def hf_config(run: TrainedEncoder, encoder: nn.Module, head: LinearHead | None) -> dict[str, Any]:
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
        "architecture": timm_name(info) or info.backbone,
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


def _write_hf(run: TrainedEncoder, head: LinearHead | None, folder: Path) -> None:
    atomic_write(folder / HF_WEIGHTS, lambda tmp: _write_safetensors(run, head, tmp))
    encoder = run.encoder()  # without the head: its features describe the backbone
    (folder / HF_CONFIG).write_text(json.dumps(hf_config(run, encoder, head), indent=2) + "\n")
    plots: list[str] = []
    if run.folder is not None and run.folder.plots.is_dir():
        (folder / HF_PLOTS).mkdir()
        for png in sorted(run.folder.plots.glob("*.png")):
            shutil.copy2(png, folder / HF_PLOTS / png.name)
            plots.append(png.name)
    (folder / "README.md").write_text(model_card(run, encoder, head, plots))
