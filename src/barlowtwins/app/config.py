"""The options of ``barlowtwins fit``: parsed and validated once, into a typed config.

Values come, in increasing priority, from the recipe (``--recipe``; the only place where
hyperparameter defaults live), a YAML file (``--config``) and the command line. ``"auto"``
values are then resolved from the data and the hardware, and the whole set is validated by
pydantic: a value of the wrong type or out of range is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from barlowtwins.app.recipes import (
    DEFAULT_RECIPE,
    FOLDER_RECIPE,
    OPTIMIZER_LEARNING_RATES,
    Recipe,
    get_recipe,
)
from barlowtwins.data.spec import DataSpec
from barlowtwins.hparams import AUTO, BOUNDS, Hyperparameters
from barlowtwins.precision import default_precision
from barlowtwins.runs.files import read_small_yaml


class ConfigError(ValueError):
    """An option has a value that cannot work; raised before any training starts."""


class FitConfig(BaseModel):
    """Every option of ``barlowtwins fit``, resolved: no ``"auto"`` and no missing value.

    The run's options (data, output, devices, seed, ...) and, in ``hparams``, the method's
    :class:`~barlowtwins.hparams.Hyperparameters`, which have no defaults here: they come from
    a recipe. Build one with :func:`load_fit_config`. :meth:`to_dict` writes both as one flat
    mapping, as ``config.yaml`` and the command line spell them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(description="named preset of every hyperparameter (barlowtwins recipes)")
    data: str = Field(
        description="fashion-mnist[:train|:test], an image folder, or shards (the folder "
        "barlowtwins shards wrote, or s3://bucket/prefix)"
    )
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
    ddp_timeout_minutes: float = Field(
        10,
        gt=0,
        description="how long a process waits for the others in a collective before the job "
        "fails (a hung or lost rank); long enough for the slowest checkpoint or kNN monitor",
    )
    compile: bool = Field(False, description="torch.compile the model")
    plots: bool = Field(True, description="write PNG plots at the end")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="optimiser steps per epoch, each from a fresh shuffle (default: all the "
        "data; --time-budget sets it)",
    )
    checkpoint_every_n_steps: int | None = Field(
        None,
        ge=1,
        description="also write checkpoints/last.ckpt every N optimiser steps, inside epochs: "
        "a rerun after a crash resumes from there (mid-epoch exactly with shards)",
    )
    s3_endpoint: str | None = Field(
        None, description="endpoint URL of s3:// shards (default: boto3's, e.g. AWS_ENDPOINT_URL)"
    )
    hparams: Hyperparameters = Field(description="the method's hyperparameters")

    @model_validator(mode="before")
    @classmethod
    def _batch_per_device_from_the_global_batch(cls, values: Any) -> Any:
        method = values.get("hparams") if isinstance(values, dict) else None
        if isinstance(method, Hyperparameters) and values.get("batch_size_per_device") is None:
            try:
                processes = int(values.get("devices", 1)) * int(values.get("num_nodes", 1))
                values = {**values, "batch_size_per_device": int(method.batch_size) // processes}
            except (TypeError, ValueError, ZeroDivisionError):
                pass  # the field validators name the option that is wrong
        return values

    @model_validator(mode="after")
    def _batch_splits_over_the_processes(self) -> FitConfig:
        batch = int(self.hparams.batch_size)
        if batch % self.world_size:
            raise ValueError(
                f"batch size {batch} (the global batch) does not split over "
                f"{self.world_size} processes: give a multiple of {self.world_size}, or "
                "--batch-size-per-device"
            )
        if self.batch_size_per_device != batch // self.world_size:
            raise ValueError(
                f"batch size {batch} over {self.world_size} process(es) is "
                f"{batch // self.world_size} per device, not "
                f"{self.batch_size_per_device}: give one of the two"
            )
        return self

    @model_validator(mode="after")
    def _resolved(self) -> FitConfig:
        if self.hparams.unresolved():
            raise ValueError(f"option {self.hparams.unresolved()[0]} is still auto")
        return self

    @property
    def data_spec(self) -> DataSpec:
        """The training data, parsed."""
        return DataSpec.parse(self.data)

    @property
    def world_size(self) -> int:
        """Number of training processes."""
        return self.devices * self.num_nodes

    def to_dict(self) -> dict[str, Any]:
        """The run's options and the hyperparameters as one flat mapping of plain types (YAML-
        and checkpoint-safe)."""
        return {**self.model_dump(exclude={"hparams"}), **self.hparams.to_dict()}

    def with_hparams(self, **changes: Any) -> FitConfig:
        """A copy whose hyperparameters have ``changes``."""
        return self.model_copy(update={"hparams": self.hparams.replace(**changes)})


def _without_auto(annotation: Any) -> Any:
    """A field's type as a resolved config holds it: ``int | Literal["auto"]`` gives ``int``."""
    kept = [arg for arg in get_args(annotation) if arg != Literal["auto"]]
    if get_origin(annotation) not in (Union, UnionType) or len(kept) == len(get_args(annotation)):
        return annotation
    return kept[0] if len(kept) == 1 else Union[tuple(kept)]  # noqa: UP007 (built at run time)


def _hyperparameter_schema() -> type[BaseModel]:
    """A pydantic model of the hyperparameters' resolved values, made from their fields: it
    turns the strings of the command line and YAML into the fields' types and names the option
    a wrong value belongs to."""
    hints = get_type_hints(Hyperparameters)
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(Hyperparameters):
        bounds = {name: spec.metadata[name] for name in BOUNDS if name in spec.metadata}
        fields[spec.name] = (
            _without_auto(hints[spec.name]),
            Field(description=spec.metadata["help"], **bounds),
        )
    return create_model(  # type: ignore[call-overload, no-any-return]
        "HyperparameterValues", __config__=ConfigDict(extra="forbid"), **fields
    )


_HYPERPARAMETER_SCHEMA = _hyperparameter_schema()
#: Every option of ``fit``, as the command line and ``config.yaml`` spell them: the run's,
#: then the hyperparameters (one flat namespace).
OPTIONS: dict[str, FieldInfo] = {
    **{name: info for name, info in FitConfig.model_fields.items() if name != "hparams"},
    **_HYPERPARAMETER_SCHEMA.model_fields,
}


# Options whose "auto" is resolved here (the recipe resolves its own from the data).
_RUN_AUTOS = ("precision", "num_workers", "channels", "val_data")
# Data decoded per batch: one DataLoader worker per core keeps the device fed.
_LAZY_FOLDER_WORKERS = max(1, min(8, os.cpu_count() or 1))


def describe_batch(config: FitConfig) -> str:
    """A YAML comment on the global batch, its split over the processes and the learning rates
    it gives (``fit --print-config`` prints it above the values)."""
    from barlowtwins.optim import scaled_learning_rates

    method = config.hparams
    weights, biases = scaled_learning_rates(
        method.optimizer, int(method.batch_size), method.lr_weights, method.lr_biases
    )
    return (
        f"# global batch {method.batch_size} = {config.world_size} process(es) x "
        f"{config.batch_size_per_device} per device; {method.optimizer} learning rates at "
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
    unknown = sorted(set(user) - set(OPTIONS))
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
    method = {name: values.pop(name) for name in Hyperparameters.names() if name in values}
    try:
        resolved = _HYPERPARAMETER_SCHEMA.model_validate(method).model_dump()
        config = FitConfig.model_validate({**values, "hparams": Hyperparameters(**resolved)})
    except ValidationError as error:
        raise ConfigError(_first_error(error)) from None
    except ValueError as error:  # Hyperparameters' own checks of values that fit their types
        raise ConfigError(str(error)) from None
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
    pending = [k for k in recipe.hparams.unresolved() if user.get(k, AUTO) == AUTO]
    needs_data = recipe.adapt is not None and any(k != "precision" for k in pending)
    summary = None
    if needs_data and spec.path is not None:
        from barlowtwins.data.folders import summarize_folder

        summary = summarize_folder(spec.path)
    elif needs_data and spec.shards is not None:
        from barlowtwins.data.streaming import summarize_shards

        summary = summarize_shards(spec.shards, user.get("s3_endpoint"))
    values = recipe.resolved(summary).to_dict()
    if "optimizer" in user and user["optimizer"] != recipe.hparams.optimizer:
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
            values[name] = (
                0
                if spec.is_fashion_mnist
                else _LAZY_FOLDER_WORKERS
                if spec.is_shards
                else _folder_workers(spec, values)
            )
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
    if kind == "literal_error" and name in OPTIONS:
        choices = ", ".join(map(str, get_args(OPTIONS[name].annotation)))
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
        content = read_small_yaml(path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def _check_environment(config: FitConfig) -> None:
    """Reject what the machine cannot run, before any data is read or process started."""
    from barlowtwins.backbones import available_backbones, build_backbone

    backbone = config.hparams.backbone
    if not backbone.startswith("timm:") and backbone not in available_backbones():
        build_backbone(backbone)  # raises the error that lists the backbones
    _check_devices(config)
    _check_output(Path(config.output))


def _check_devices(config: FitConfig) -> None:
    import torch
    from lightning.pytorch.accelerators import AcceleratorRegistry

    # Lightning's own names, and "gpu" (CUDA here); a name it does not know, or hardware this
    # machine lacks, fails here rather than in the Trainer after the data is loaded.
    known = {*AcceleratorRegistry.available_accelerators(), "gpu", "auto"}
    if config.accelerator not in known:
        raise ConfigError(
            f"accelerator must be one of {', '.join(sorted(known))}, got {config.accelerator!r}"
        )
    if config.accelerator not in ("auto", "gpu", "cuda", "cpu"):
        accelerator = AcceleratorRegistry[config.accelerator]["accelerator"]
        if not accelerator.is_available():
            raise ConfigError(f"accelerator {config.accelerator} is not available on this machine")
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


__all__ = ["OPTIONS", "ConfigError", "FitConfig", "describe_batch", "load_fit_config"]
