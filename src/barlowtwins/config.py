"""Every option of ``barlowtwins fit``, its defaults, and their validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from barlowtwins.optim import OPTIMIZERS
from barlowtwins.precision import PRECISIONS

# Default crop area ranges. Fashion-MNIST's objects are centred and fill the frame: in runs
# of a few epochs, random crops only slow learning down (test kNN after one epoch, 10k-image
# bank, k=200: 73.8 % with crops of 0.2-1 of the area, 77.7 % at 0.8-1, 78.9 % at 0.9-1,
# 79.7 % without crops), so its default keeps the whole image (flips, brightness, contrast
# and solarisation remain).
FASHION_MNIST_CROP_SCALE = (1.0, 1.0)
FOLDER_CROP_SCALE = (0.2, 1.0)
FASHION_MNIST = "fashion-mnist"
# Base learning rates (weights, biases and norms) per optimiser when none are given.
# LARS at 3 (6 at batch 512) trains short runs best: test kNN after one epoch (117 steps of
# 512, 10k-image bank, k=200; benchmarks/recipe.py) 80.7 % at 0.6, 81.2 at 1, 81.7 at 2,
# 82.0 at 3, 82.1 at 5, 79.5 at 8. AdamW at 2e-3 / 4.8e-3 matched LARS at 0.2 in the same
# test; SGD's 0.06 is lightly's example value, not tuned here.
DEFAULT_LEARNING_RATES = {"lars": (3.0, 0.0144), "sgd": (0.06, 0.06), "adamw": (2e-3, 4.8e-3)}


class ConfigError(ValueError):
    """An option has a value that cannot work; raised before any training starts."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _learning_rate_defaults(column: int) -> str:
    """``"3 for lars, 0.06 for sgd, ..."``: one column of DEFAULT_LEARNING_RATES, for --help."""
    return ", ".join(
        f"{rates[column]:g} for {name}" for name, rates in DEFAULT_LEARNING_RATES.items()
    )


@dataclass
class FitConfig:
    """Options of ``barlowtwins fit``. The defaults are the tuned CPU recipe of the README."""

    data: str = _opt("fashion-mnist", "fashion-mnist[:train|:test] or an image folder")
    val_data: str | None = _opt(
        None,
        "labelled data for the kNN monitor and final score "
        "(default: fashion-mnist:test when training on fashion-mnist)",
    )
    val_max_samples: int | None = _opt(None, "use a subset of the labelled data")
    data_dir: str | None = _opt(None, "directory of the Fashion-MNIST idx files")
    download: bool = _opt(False, "download Fashion-MNIST when it is not installed")
    max_samples: int | None = _opt(None, "train on a subset of this many images")
    image_size: int | None = _opt(
        None, "side of the views (default: 28 for fashion-mnist, else 64)"
    )
    channels: int | None = _opt(None, "1 or 3 (default: 1 for fashion-mnist, else 3)")
    backbone: str = _opt("resnet10", "resnet10|resnet18|resnet34|resnet50 or timm:<name>")
    small_image: bool = _opt(
        False, "CIFAR-style stem (3x3, no max-pool): better on tiny images, ~10x the compute"
    )
    projector_dims: tuple[int, ...] = _opt((1024, 1024, 1024), "projector layer sizes")
    lambda_param: float = _opt(5e-3, "off-diagonal weight of the loss")
    optimizer: str = _opt("lars", f"one of {', '.join(OPTIMIZERS)}")
    lr_weights: float | None = _opt(
        None,
        "base LR of weights (x global batch / 256 for lars/sgd; default: "
        f"{_learning_rate_defaults(0)})",
    )
    lr_biases: float | None = _opt(
        None, f"base LR of biases and norms (default: {_learning_rate_defaults(1)})"
    )
    weight_decay: float = _opt(1.5e-6, "weight decay of weights")
    warmup_epochs: float = _opt(0.2, "linear warm-up before the cosine decay")
    crop_scale: tuple[float, ...] | None = _opt(
        None,
        "random-resized-crop area range (default: 1 1, i.e. no crop, for fashion-mnist, "
        "tuned for short CPU runs; else 0.2 1; paper: 0.08 1)",
    )
    epochs: int = _opt(5, "training epochs")
    # Batch 512 trains as well per epoch as 256 or 128 (one-epoch test kNN within 0.3 points)
    # and runs 1.3x faster per image on CPU than 256.
    batch_size: int = _opt(512, "batch per device")
    output: str = _opt("runs/barlowtwins", "output directory (a rerun resumes from it)")
    accelerator: str = _opt("auto", "cpu, gpu, auto, ...")
    devices: int = _opt(1, "devices (processes) per node")
    num_nodes: int = _opt(1, "nodes (torchrun / SLURM)")
    precision: str | None = _opt(
        None, f"{', '.join(PRECISIONS)} (default: bf16-mixed where fast, else 32-true)"
    )
    num_workers: int = _opt(0, "DataLoader workers (0 suits in-memory data)")
    knn_k: int = _opt(200, "neighbours of the kNN monitor and final score")
    knn_bank_size: int = _opt(10000, "labelled training images in the per-epoch kNN monitor")
    seed: int = _opt(0, "random seed")
    compile: bool = _opt(False, "torch.compile the model")
    plots: bool = _opt(True, "write PNG plots at the end")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (YAML- and checkpoint-safe)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


def load_fit_config(path: Path | None, overrides: dict[str, Any]) -> FitConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update(overrides)
    names = {f.name: f for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see barlowtwins fit --help")
    config = FitConfig(**{key: _coerce(names[key], value) for key, value in values.items()})
    resolve_defaults(config)
    validate(config)
    return config


def resolve_defaults(config: FitConfig) -> None:
    """Fill in, in place, the options whose default depends on others (data, optimiser)."""
    if config.crop_scale is None:
        config.crop_scale = default_crop_scale(config.data)
    lr_weights, lr_biases = DEFAULT_LEARNING_RATES.get(config.optimizer, (None, None))
    if config.lr_weights is None:
        config.lr_weights = lr_weights
    if config.lr_biases is None:
        config.lr_biases = lr_biases


def is_fashion_mnist(data: str) -> bool:
    """Whether a data spec names the built-in Fashion-MNIST (any split)."""
    return data.lower().startswith(FASHION_MNIST)


def default_crop_scale(data: str) -> tuple[float, float]:
    """The crop area range used when none is given, by dataset."""
    return FASHION_MNIST_CROP_SCALE if is_fashion_mnist(data) else FOLDER_CROP_SCALE


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def _coerce(spec: dataclasses.Field[Any], value: Any) -> Any:
    if value is None:
        return None
    kind = str(spec.type)
    try:
        if kind.startswith("tuple[int"):
            return tuple(int(v) for v in _as_list(value))
        if kind.startswith("tuple[float"):
            return tuple(float(v) for v in _as_list(value))
        if kind.startswith("bool"):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("int"):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {spec.name}: cannot use {value!r} ({kind})") from None


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return list(value)


def validate(config: FitConfig) -> None:
    """Reject settings that cannot train, before any data is read or process started."""
    from barlowtwins.backbones import available_backbones

    checks = [
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (
            config.batch_size >= 2,
            f"batch size must be >= 2 per device (batch norm needs 2 samples), "
            f"got {config.batch_size}",
        ),
        (config.devices >= 1, f"devices must be >= 1, got {config.devices}"),
        (config.num_nodes >= 1, f"num_nodes must be >= 1, got {config.num_nodes}"),
        (
            config.max_samples is None or config.max_samples >= 2,
            f"max_samples must be >= 2, got {config.max_samples}",
        ),
        (
            config.image_size is None or config.image_size >= 8,
            f"image size must be >= 8, got {config.image_size}",
        ),
        (config.channels in (None, 1, 3), f"channels must be 1 or 3, got {config.channels}"),
        (
            config.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}",
        ),
        (config.lr_weights > 0 and config.lr_biases > 0, "learning rates must be > 0"),
        (config.weight_decay >= 0, "weight decay must be >= 0"),
        (config.warmup_epochs >= 0, "warmup epochs must be >= 0"),
        (config.lambda_param >= 0, "lambda must be >= 0"),
        (
            len(config.projector_dims) >= 1 and min(config.projector_dims) >= 1,
            f"projector dims must be positive, got {config.projector_dims}",
        ),
        (
            config.crop_scale is None
            or (
                len(config.crop_scale) == 2
                and 0 < config.crop_scale[0] <= config.crop_scale[1] <= 1
            ),
            f"crop scale must be two values 0 < lo <= hi <= 1, got {config.crop_scale}",
        ),
        (
            config.precision is None or config.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}",
        ),
        (config.num_workers >= 0, "num_workers must be >= 0"),
        (config.knn_k >= 1, f"knn_k must be >= 1, got {config.knn_k}"),
        (config.knn_bank_size >= 1, "knn_bank_size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    name = config.backbone
    if not name.startswith("timm:") and name not in available_backbones():
        # Defer to build_backbone for timm names; it raises the listing error otherwise.
        from barlowtwins.backbones import build_backbone

        build_backbone(name)
    _check_devices(config)
    _check_output(Path(config.output))


def _check_devices(config: FitConfig) -> None:
    import torch

    wants_gpu = config.accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        raise ConfigError("accelerator gpu requested but no CUDA device is available")
    if wants_gpu or (config.accelerator == "auto" and torch.cuda.is_available()):
        available, kind = torch.cuda.device_count(), "CUDA devices"
    else:
        available, kind = os.cpu_count() or 1, "CPU cores"
    if config.devices > available:
        raise ConfigError(f"devices={config.devices} but this machine has {available} {kind}")


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory")
    existing = (
        output
        if output.exists()
        else next((parent for parent in output.parents if parent.exists()), Path("."))
    )
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output {output} is not writable")
