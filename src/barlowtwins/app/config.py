"""The options of ``barlowtwins fit``: parsed and validated once, into a typed config.

Values come, in increasing priority, from the recipe (``--recipe``; the only place where
hyperparameter defaults live), a YAML file (``--config``) and the command line. ``"auto"``
values are then resolved from the data and the hardware, and the whole set is validated by
pydantic: a value of the wrong type or out of range is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from barlowtwins.app.recipes import (
    AUTO,
    DEFAULT_RECIPE,
    FOLDER_RECIPE,
    HYPERPARAMETERS,
    OPTIMIZER_LEARNING_RATES,
    Recipe,
    get_recipe,
)
from barlowtwins.data.spec import DataSpec
from barlowtwins.precision import PRECISIONS, default_precision


class ConfigError(ValueError):
    """An option has a value that cannot work; raised before any training starts."""


class FitConfig(BaseModel):
    """Every option of ``barlowtwins fit``, resolved: no ``"auto"`` and no missing value.

    The hyperparameters (:data:`barlowtwins.app.recipes.HYPERPARAMETERS`) have no defaults
    here: they come from a recipe. Build one with :func:`load_fit_config`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The run.
    recipe: str = Field(description="named preset of every hyperparameter (barlowtwins recipes)")
    data: str = Field(description="fashion-mnist[:train|:test] or an image folder")
    val_data: str | None = Field(
        description="labelled data for the kNN monitor and final score "
        "(fashion-mnist:test when training on fashion-mnist)"
    )
    val_max_samples: int | None = Field(None, ge=2, description="use a subset of val_data")
    data_dir: str | None = Field(None, description="directory of the Fashion-MNIST idx files")
    download: bool = Field(False, description="download Fashion-MNIST when it is not installed")
    max_samples: int | None = Field(None, ge=2, description="train on a subset of this many")
    channels: Literal[1, 3] = Field(description="1 or 3 (1 for fashion-mnist, else 3)")
    output: str = Field("runs/barlowtwins", description="output directory (reruns resume)")
    accelerator: str = Field("auto", description="cpu, gpu, auto, ...")
    devices: int = Field(1, ge=1, description="devices (processes) per node")
    num_nodes: int = Field(1, ge=1, description="nodes (torchrun / SLURM)")
    strategy: Literal["auto", "ddp"] = Field(
        "auto", description="auto: DDP when there is more than one process; ddp: always"
    )
    batch_size_per_device: int | None = Field(
        None,
        ge=1,
        description="images per device and step, instead of --batch-size: the global batch "
        "is this x devices x nodes",
    )
    in_memory: bool | None = Field(
        None,
        description="decode an image folder once into memory (default: when its pixels fit "
        "in 4 GiB), else per batch in DataLoader workers",
    )
    num_workers: int = Field(
        ge=0, description="DataLoader workers (auto: 0 for in-memory data, else per core)"
    )
    knn_k: int = Field(200, ge=1, description="neighbours of the kNN monitor and final score")
    knn_bank_size: int = Field(10000, ge=1, description="training images in the kNN monitor")
    seed: int = Field(0, description="random seed")
    compile: bool = Field(False, description="torch.compile the model")
    plots: bool = Field(True, description="write PNG plots at the end")

    # The method: defaults only in the recipes.
    backbone: str = Field(description="resnet10|resnet18|resnet34|resnet50 or timm:<name>")
    small_image: bool = Field(description="CIFAR-style stem (3x3, no max-pool)")
    zero_init_residual: bool = Field(description="zero-init each residual branch's last BN")
    projector_dims: tuple[int, ...] = Field(min_length=1, description="projector layer sizes")
    lambda_param: float = Field(ge=0, description="off-diagonal weight of the loss")
    scale_loss: float = Field(gt=0, description="factor of the whole loss (solo-learn)")
    mix_weight: float = Field(
        ge=0, description="Mixed Barlow Twins regulariser weight (0: plain Barlow Twins)"
    )
    num_views: int = Field(
        ge=2, description="augmented views per image; the loss averages every pair"
    )
    optimizer: Literal["lars", "sgd", "adamw"] = Field(description="lars, sgd or adamw")
    lr_weights: float = Field(gt=0, description="base LR of weights (x global batch / 256)")
    lr_biases: float = Field(gt=0, description="base LR of biases and norms")
    weight_decay: float = Field(ge=0, description="weight decay of weights")
    momentum: float = Field(ge=0, lt=1, description="momentum (Adam's beta1)")
    lars_eta: float = Field(gt=0, description="LARS trust coefficient")
    lars_clip_lr: bool = Field(description="clip LARS's trust ratio at 1/lr (LARC)")
    warmup_epochs: float = Field(ge=0, description="linear warm-up before the cosine decay")
    final_lr_factor: float = Field(ge=0, le=1, description="cosine decay ends at this x the LR")
    epochs: int = Field(ge=1, description="training epochs")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="optimiser steps per epoch, each from a fresh shuffle (default: all the "
        "data; --time-budget sets it)",
    )
    time_budget: float | None = Field(
        gt=0,
        description="minutes of training: epochs and their steps are sized to fit from a step "
        "timed on the training devices, the epochs re-counted after each one (scoring and "
        "plots come on top)",
    )
    batch_size: int = Field(
        ge=2, description="global batch over all devices; each takes an equal share"
    )
    image_size: int = Field(ge=8, description="side of the views in pixels")
    crop_scale: tuple[float, float] = Field(description="random-resized-crop area range")
    translate: float = Field(
        ge=0, lt=1, description="largest shift of the views, as a fraction of their side"
    )
    erase_prob: float = Field(
        ge=0, le=1, description="probability of random erasing (a box set to the mean)"
    )
    solarize_prob: tuple[float, float] = Field(
        description="probability of solarisation in view A and in view B"
    )
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        description="Lightning precision (auto: bf16-mixed where the hardware runs it fast)"
    )

    @field_validator("projector_dims")
    @classmethod
    def _positive_dims(cls, dims: tuple[int, ...]) -> tuple[int, ...]:
        if min(dims) < 1:
            raise ValueError(f"projector dims must be positive, got {list(dims)}")
        return dims

    @model_validator(mode="before")
    @classmethod
    def _batch_per_device_from_the_global_batch(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("batch_size_per_device") is None:
            try:
                processes = int(values.get("devices", 1)) * int(values.get("num_nodes", 1))
                values = {**values, "batch_size_per_device": int(values["batch_size"]) // processes}
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                pass  # the field validators name the option that is wrong
        return values

    @model_validator(mode="after")
    def _batch_splits_over_the_processes(self) -> FitConfig:
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch size {self.batch_size} (the global batch) does not split over "
                f"{self.world_size} processes: give a multiple of {self.world_size}, or "
                "--batch-size-per-device"
            )
        if self.batch_size_per_device != self.batch_size // self.world_size:
            raise ValueError(
                f"batch size {self.batch_size} over {self.world_size} process(es) is "
                f"{self.batch_size // self.world_size} per device, not "
                f"{self.batch_size_per_device}: give one of the two"
            )
        return self

    @model_validator(mode="after")
    def _two_views_for_mixed_barlow_twins(self) -> FitConfig:
        if self.num_views > 2 and self.mix_weight > 0:
            raise ValueError(
                f"Mixed Barlow Twins (mix_weight > 0) takes 2 views, got num_views {self.num_views}"
            )
        return self

    @field_validator("solarize_prob")
    @classmethod
    def _probabilities(cls, probabilities: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= p <= 1 for p in probabilities):
            raise ValueError(f"solarize prob must lie in [0, 1], got {list(probabilities)}")
        return probabilities

    @field_validator("crop_scale")
    @classmethod
    def _crop_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
        return scale

    @property
    def data_spec(self) -> DataSpec:
        """The training data, parsed."""
        return DataSpec.parse(self.data)

    @property
    def world_size(self) -> int:
        """Number of training processes."""
        return self.devices * self.num_nodes

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (YAML- and checkpoint-safe)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in self.model_dump().items()
        }


# Options whose "auto" is resolved here (the recipe resolves its own from the data).
_RUN_AUTOS = ("precision", "num_workers", "channels", "val_data")
# Data decoded per batch: one DataLoader worker per core keeps the device fed.
_LAZY_FOLDER_WORKERS = max(1, min(8, os.cpu_count() or 1))


def describe_batch(config: FitConfig) -> str:
    """A YAML comment on the global batch, its split over the processes and the learning rates
    it gives (``fit --print-config`` prints it above the values)."""
    from barlowtwins.optim import scaled_learning_rates

    weights, biases = scaled_learning_rates(
        config.optimizer, config.batch_size, config.lr_weights, config.lr_biases
    )
    return (
        f"# global batch {config.batch_size} = {config.world_size} process(es) x "
        f"{config.batch_size_per_device} per device; {config.optimizer} learning rates at "
        f"this batch: weights {weights:g}, biases {biases:g}"
    )


def load_fit_config(path: Path | None, overrides: dict[str, Any]) -> FitConfig:
    """The recipe, then the YAML file at ``path``, then ``overrides``; resolved, validated.

    Args:
        path: A YAML mapping of option: value, or None.
        overrides: Options from the command line (None values are ignored).

    Raises:
        ConfigError: For an unknown option or recipe, a value of the wrong type or out of
            range, or data that does not exist.
    """
    user = _read_yaml(Path(path)) if path is not None else {}
    user.update({key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(user) - set(FitConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see barlowtwins fit --help")
    recipe = _choose_recipe(user)
    data = user.get("data") or recipe.data
    if data is None:
        raise ConfigError(
            f"recipe {recipe.name} has no built-in dataset: give --data (an image folder)"
        )
    try:
        spec = DataSpec.parse(str(data))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    values = {**_recipe_values(recipe, user, spec), **user, "recipe": recipe.name}
    values["data"] = str(data)
    _resolve_run_autos(values, spec)
    if "batch_size_per_device" in user and "batch_size" not in user:
        # The batch per device given alone replaces the recipe's global batch.
        values["batch_size"] = _times_processes(values, user["batch_size_per_device"])
    try:
        config = FitConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_first_error(error)) from None
    _check_environment(config)
    return config


def _choose_recipe(user: dict[str, Any]) -> Recipe:
    name = user.pop("recipe", None)
    if name is None:
        data = user.get("data")
        folder = data is not None and not DataSpec.parse(str(data)).is_fashion_mnist
        name = FOLDER_RECIPE if folder else DEFAULT_RECIPE
    try:
        return get_recipe(str(name))
    except KeyError as error:
        raise ConfigError(error.args[0]) from None


def _recipe_values(recipe: Recipe, user: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """The recipe's values, its ``"auto"`` ones resolved from the data unless overridden."""
    pending = [k for k, v in recipe.values.items() if v == AUTO and user.get(k, AUTO) == AUTO]
    needs_data = recipe.adapt is not None and any(k != "precision" for k in pending)
    summary = None
    if needs_data and spec.path is not None:
        from barlowtwins.data.folders import summarize_folder

        summary = summarize_folder(spec.path)
    values = recipe.resolved(summary)
    if "optimizer" in user and user["optimizer"] != recipe.values["optimizer"]:
        # The recipe's learning rates are for its own optimiser.
        lr_weights, lr_biases = OPTIMIZER_LEARNING_RATES.get(str(user["optimizer"]), (None, None))
        values.update(lr_weights=lr_weights, lr_biases=lr_biases)
    return values


def _resolve_run_autos(values: dict[str, Any], spec: DataSpec) -> None:
    """Resolve, in place, the ``"auto"`` or missing options that follow from data or hardware."""
    for name in _RUN_AUTOS:
        if values.get(name, AUTO) != AUTO:
            continue
        if name == "precision":
            values[name] = default_precision(str(values.get("accelerator", "auto")))
        elif name == "num_workers":
            values[name] = 0 if spec.is_fashion_mnist else _folder_workers(spec, values)
        elif name == "channels":
            values[name] = 1 if spec.is_fashion_mnist else 3
        else:
            test = spec.test_split
            values[name] = None if test is None else str(test)


def _folder_workers(spec: DataSpec, values: dict[str, Any]) -> int:
    """Workers for a folder: none when it is decoded once into memory, else one per core."""
    from barlowtwins.data.folders import fits_in_memory

    assert spec.path is not None
    in_memory = values.get("in_memory")
    if in_memory is None:
        size, channels = int(values["image_size"]), 1 if values.get("channels") == 1 else 3
        in_memory = fits_in_memory(spec.path, image_size=size, channels=channels)
    return 0 if in_memory else _LAZY_FOLDER_WORKERS


def _times_processes(values: dict[str, Any], per_device: Any) -> Any:
    """``per_device`` times the number of processes, or itself where a value is not a number
    (the validation then names the option)."""
    try:
        return int(per_device) * int(values.get("devices", 1)) * int(values.get("num_nodes", 1))
    except (TypeError, ValueError):
        return per_device


_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _first_error(error: ValidationError) -> str:
    """One line for the first problem pydantic found, naming the option."""
    first = error.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "config"
    label = name.replace("_", " ")
    kind, context = first["type"], first.get("ctx", {})
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return f"{label} must be {sign} {context[key]}, got {first['input']}"
    if kind == "literal_error" and name in FitConfig.model_fields:
        choices = ", ".join(map(str, get_args(FitConfig.model_fields[name].annotation)))
        return f"{name} must be one of {choices}, got {first['input']!r}"
    if kind == "value_error":
        return str(context.get("error", first["msg"]))
    if kind == "missing" and len(first["loc"]) > 1:
        return f"option {name} takes two values (low high, or view A view B)"
    if kind == "missing":
        return f"option {name} has no value (the recipe sets every hyperparameter)"
    return f"option {name}: {first['msg'].lower()}, got {first['input']!r}"


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


def _check_environment(config: FitConfig) -> None:
    """Reject what the machine cannot run, before any data is read or process started."""
    from barlowtwins.backbones import available_backbones, build_backbone

    if not config.backbone.startswith("timm:") and config.backbone not in available_backbones():
        build_backbone(config.backbone)  # raises the error that lists the backbones
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


__all__ = ["HYPERPARAMETERS", "ConfigError", "FitConfig", "describe_batch", "load_fit_config"]
