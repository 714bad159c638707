"""``barlowtwins fit``: prepare data and module, train, then export, score and plot.

Each step has one job; :func:`fit` runs them in order. Signals, exit codes and the ranks
Lightning launched are :mod:`barlowtwins.app.launch`'s business.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from barlowtwins.app.budget import TimeBudget
from barlowtwins.app.config import ConfigError, FitConfig
from barlowtwins.app.launch import run_training
from barlowtwins.app.report import describe_hardware, score_encoders, write_plots
from barlowtwins.data import ImageDataset, first_images, load_data
from barlowtwins.data.streaming import StreamingImages
from barlowtwins.encoder import EncoderInfo
from barlowtwins.hparams import Hyperparameters, checkpoint_values
from barlowtwins.loss import cross_correlation
from barlowtwins.runs.files import (
    CheckpointError,
    atomic_write,
    read_small_yaml,
    run_lock,
    safe_load,
    save_encoder,
)
from barlowtwins.runs.folder import RunFolder
from barlowtwins.training.callbacks import (
    AtomicCheckpointIO,
    GlobalBatchNormSync,
    PreemptionCheckpoint,
    ProgressBar,
    RngStateCheckpoint,
    SignalStop,
    WeightEMA,
)
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

_log = logging.getLogger("barlowtwins")
# What every checkpoint of Lightning's Trainer holds beside the module's weights.
_LIGHTNING_CHECKPOINT_KEYS = frozenset(
    {"state_dict", "hyper_parameters", "pytorch-lightning_version", "loops", "global_step"}
)

# Folders are loaded a little larger than the views so that random crops are not upsampled.
_FOLDER_LOAD_SCALE = 8 / 7


@dataclass
class TrainingSetup:
    """Everything training needs (:func:`~barlowtwins.app.launch.run_training`), built from a
    config by :func:`prepare`."""

    config: FitConfig
    folder: RunFolder
    train: ImageDataset
    val: ImageDataset | None
    module: BarlowTwinsModule
    datamodule: BarlowTwinsDataModule
    trainer: L.Trainer


def fit(config: FitConfig, *, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run ``barlowtwins fit`` with a resolved config; returns the final results.

    A rerun with the same ``output`` resumes from ``output/checkpoints/last.ckpt``.

    Args:
        config: From :func:`barlowtwins.app.config.load_fit_config`.
        callbacks: Extra Lightning callbacks for the trainer.

    Returns:
        The contents of ``results.json`` on rank 0; an empty dict on other ranks.

    Raises:
        RunInUseError: When another ``fit`` writes into the same output.
    """
    # The job's first process holds the run folder for the whole run; the ranks it launches
    # (and the other ranks of torchrun or SLURM) write into it under its lock.
    first_process = getattr(rank_zero_only, "rank", 0) == 0  # from RANK, LOCAL_RANK, SLURM_PROCID
    with run_lock(RunFolder(Path(config.output))) if first_process else nullcontext():
        started = time.perf_counter()
        run = prepare(config, callbacks=callbacks)
        training_started = time.perf_counter()
        run_training(run.trainer, run.module, run.datamodule, run.folder.last_checkpoint)
        if not run.trainer.is_global_zero:
            return {}
        if config.hparams.time_budget is not None:
            # TimeBudget planned the run and re-planned its epochs: config.yaml records the
            # schedule the run trained.
            run.config = _with_plan(
                run.config, run.trainer.max_epochs, run.trainer.limit_train_batches
            )
            _write_config(run.folder, run.config)
        return finish(
            run, started=started, training_minutes=(time.perf_counter() - training_started) / 60
        )


def prepare(config: FitConfig, *, callbacks: Sequence[Callback] = ()) -> TrainingSetup:
    """Load the data, build module, data module and trainer, and check a run to resume."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    folder = RunFolder(Path(config.output))
    folder.path.mkdir(parents=True, exist_ok=True)
    train, val = load_datasets(config)
    batch_size = int(config.hparams.batch_size)
    if len(train) < batch_size:
        raise ConfigError(
            f"the global batch of {batch_size} images is larger than the dataset "
            f"({len(train)} images); lower --batch-size"
        )
    module = build_module(config, in_channels=train.channels)
    previous = _resumed_config(folder)
    _check_budget_unchanged(config, previous, folder)
    plan = _resumed_plan(config, previous)
    if plan is not None:
        # A resumed budget run keeps its schedule (TimeBudget then applies its checkpoint's).
        config = _with_plan(config, *plan)
    datamodule = BarlowTwinsDataModule(
        train,
        batch_size,
        knn_bank=_knn_bank(train, config) if val is not None else None,
        knn_query=val,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
        seed=config.seed,
    )
    run = TrainingSetup(
        config,
        folder,
        train,
        val,
        module,
        datamodule,
        build_trainer(
            config,
            folder,
            monitor=val is not None,
            callbacks=[*callbacks, *_budget_callbacks(config, folder, plan)],
        ),
    )
    # A kill during an atomic write can leave its temporary file behind.
    for stale in folder.checkpoints.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if folder.last_checkpoint.is_file():
        _check_resumable(folder.last_checkpoint, module)
        _log.info("resuming from %s", folder.last_checkpoint)
    if run.trainer.is_global_zero:
        _write_config(folder, config)
    return run


def _write_config(folder: RunFolder, config: FitConfig) -> None:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(folder.config, lambda tmp: tmp.write_text(text))


def _resumed_config(folder: RunFolder) -> dict[str, Any] | None:
    """The config.yaml of the run a checkpoint in ``folder`` resumes, if there is one."""
    saved = folder.config
    if not (folder.last_checkpoint.is_file() and saved.is_file()):
        return None
    try:
        content = read_small_yaml(saved)
    except ValueError as error:
        raise ConfigError(f"{error}; move it away to resume without it") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"{saved} is not a run's config; move it away to resume without it")
    return content or {}


def _check_budget_unchanged(
    config: FitConfig, previous: dict[str, Any] | None, folder: RunFolder
) -> None:
    """A budget run resumes only under its own budget: its schedule was planned for it."""
    budget = None if previous is None else previous.get("time_budget")
    if budget is not None and budget != config.hparams.time_budget:
        raise ConfigError(
            f"{folder.path} trains to a time budget of {budget} min; rerun with --time-budget "
            f"{budget}, or use a new --output"
        )


def _resumed_plan(config: FitConfig, previous: dict[str, Any] | None) -> tuple[int, int] | None:
    """The epochs and steps per epoch that a resumed budget run planned when it started."""
    if config.hparams.time_budget is None or previous is None:
        return None
    epochs, steps = previous.get("epochs"), previous.get("steps_per_epoch")
    return None if epochs is None or steps is None else (int(epochs), int(steps))


def _budget_callbacks(
    config: FitConfig, folder: RunFolder, plan: tuple[int, int] | None
) -> list[Callback]:
    """A :class:`TimeBudget` for a budget run; it records its plan in ``config.yaml`` at once,
    so that a run killed before it ends resumes with that plan."""
    minutes = config.hparams.time_budget
    if minutes is None:
        return []

    def record(epochs: int, steps: int) -> None:
        _write_config(folder, _with_plan(config, epochs, steps))

    return [TimeBudget(minutes, plan=plan, on_plan=record)]


def _with_plan(config: FitConfig, epochs: int | None, steps: Any) -> FitConfig:
    """The config of a budget run with the schedule it planned."""
    return config.with_hparams(epochs=epochs).model_copy(update={"steps_per_epoch": steps})


def build_module(config: FitConfig, *, in_channels: int) -> BarlowTwinsModule:
    """The LightningModule of a config's hyperparameters."""
    module = BarlowTwinsModule(
        config.hparams, in_channels=in_channels, seed=config.seed, knn_k=config.knn_k
    )
    if config.compile:
        module.model.compile()
    return module


def load_datasets(config: FitConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """The training data and, where labels exist on both sides, the labelled scoring data."""
    spec = config.data_spec
    # Fashion-MNIST is loaded at the view size; folders a little larger, for the crops.
    load_size = (
        int(config.hparams.image_size)
        if spec.is_fashion_mnist
        else round(int(config.hparams.image_size) * _FOLDER_LOAD_SCALE)
    )
    common: dict[str, Any] = {
        "data_dir": config.data_dir,
        "download": config.download,
        "s3_endpoint": config.s3_endpoint,
    }
    train = load_data(
        spec,
        image_size=load_size,
        channels=config.channels,
        max_samples=config.max_samples,
        in_memory=config.in_memory,
        **common,
    )
    if config.val_data is None:
        return train, None
    val = load_data(
        config.val_data,
        image_size=train.image_size,
        channels=train.channels,
        max_samples=config.val_max_samples,
        **common,
    )
    if val.labels is None or train.labels is None:
        _log.warning("no labels in %s or the training data: kNN monitor disabled", config.val_data)
        return train, None
    return train, val


def build_trainer(
    config: FitConfig, folder: RunFolder, *, monitor: bool, callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """A Trainer with crash-safe checkpoints, exact batch-norm sync and our logs."""
    # last.ckpt is a checkpoint of its own, written after every epoch: Lightning's save_last
    # writes only in a step where a top-k checkpoint was saved (2.6), so an epoch whose kNN
    # monitor did not improve would leave last.ckpt (what a rerun resumes from and what
    # `embed` loads) epochs behind. Both save at the end of the training epoch, after its
    # monitor and after the callbacks of that hook (TimeBudget's plan is in the checkpoint).
    checkpoints = [
        ModelCheckpoint(
            dirpath=folder.checkpoints,
            filename=folder.last_checkpoint.stem,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    ]
    if config.checkpoint_every_n_steps is not None:
        # The same last.ckpt inside epochs too (Lightning takes steps or epochs per callback):
        # with the loops' progress and LitData's loader state, a rerun resumes mid-epoch.
        checkpoints.append(
            ModelCheckpoint(
                dirpath=folder.checkpoints,
                filename=folder.last_checkpoint.stem,
                every_n_train_steps=config.checkpoint_every_n_steps,
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    if monitor:
        checkpoints.append(
            ModelCheckpoint(
                dirpath=folder.checkpoints,
                filename=folder.best_checkpoint.stem,
                monitor="val_knn_acc",
                mode="max",
                save_top_k=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    decay = config.hparams.ema_decay
    averaging: list[Callback] = [WeightEMA(decay)] if decay > 0 else []
    plugins: list[Any] = [AtomicCheckpointIO()]
    ddp = config.world_size > 1 or config.strategy == "ddp"
    if ddp:
        plugins.append(GlobalBatchNormSync())
    return L.Trainer(
        max_epochs=int(config.hparams.epochs),
        limit_train_batches=config.steps_per_epoch,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=(
            DDPStrategy(timeout=timedelta(minutes=config.ddp_timeout_minutes)) if ddp else "auto"
        ),
        precision=config.hparams.precision,  # type: ignore[arg-type]
        plugins=plugins,
        callbacks=[
            *checkpoints,
            *averaging,
            PreemptionCheckpoint(folder.last_checkpoint),
            SignalStop(),
            RngStateCheckpoint(),
            ProgressBar(),
            *callbacks,
        ],
        logger=_loggers(folder),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        default_root_dir=folder.path,
    )


def finish(run: TrainingSetup, *, started: float, training_minutes: float) -> dict[str, Any]:
    """Export the encoder, score it, plot, and write ``results.json``; print the summary."""
    config, folder, module = run.config, run.folder, run.module
    merge_metrics(folder)
    info = EncoderInfo.from_hparams(module.hparams)
    save_encoder(module.backbone, info, folder)
    results: dict[str, Any] = {
        "train_images": len(run.train),
        "skipped_images": run.train.num_skipped,
        "hardware": {
            **describe_hardware(run.trainer),
            "batch_norm": module.batch_norm_class,
        },
    }
    # Lightning hands the module back on the CPU: score where it trained.
    device = run.trainer.strategy.root_device
    module.model.to(device)
    results["scored_on"] = str(device)
    accuracies, test_features = None, None
    if run.val is not None:
        accuracies, test_features = score_encoders(
            module.backbone,
            info,
            run.train,
            run.val,
            k=config.knn_k,
            temperature=module.knn_temperature,
            seed=config.seed,
            precision=str(run.trainer.precision),
            device=device,
        )
        results.update(accuracies.to_dict())
    if config.plots:
        results["plots"] = write_plots(
            folder,
            accuracies=accuracies,
            test_features=test_features,
            test=run.val,
            cross_correlation=_held_out_cross_correlation(module, run.val or run.train, device),
            encoder=module.backbone,
            info=info,
            train=run.train,
            device=device,
            precision=str(run.trainer.precision),
            seed=config.seed,
        )
    results["minutes"] = round((time.perf_counter() - started) / 60, 2)
    # This invocation's trainer.fit only (a resumed run's earlier invocations not included).
    results["training_minutes"] = round(training_minutes, 2)
    text = json.dumps(results, indent=2) + "\n"
    atomic_write(folder.results, lambda tmp: tmp.write_text(text))
    if accuracies is not None:
        print("\n" + accuracies.table())
    print(
        f"\nwrote {folder.path}: backbone.pt, checkpoints/, metrics.csv, results.json"
        + (", plots/" if results.get("plots") else "")
    )
    return results


@torch.no_grad()
def _held_out_cross_correlation(
    module: BarlowTwinsModule, data: ImageDataset, device: torch.device, size: int = 512
) -> torch.Tensor:
    """The loss's cross-correlation matrix on two views of (up to) ``size`` held-out images."""
    images, sizes = first_images(data, size)
    module.eval()
    view_a, view_b = module.augment(
        images.to(device), torch.Generator(device).manual_seed(0), sizes.to(device)
    )
    return cross_correlation(module.model(view_a).float(), module.model(view_b).float()).cpu()


def _check_resumable(last: Path, module: BarlowTwinsModule) -> None:
    """Refuse to resume a checkpoint whose weights, optimiser state or schedule depend on a
    value this run changed (the hyperparameters marked ``fixed_on_resume``, and the channels)."""
    content = safe_load(last)
    if not (isinstance(content, dict) and set(content) >= _LIGHTNING_CHECKPOINT_KEYS):
        raise CheckpointError(
            f"{last} is not a checkpoint of barlowtwins fit (a torch file without Lightning's "
            "training state); move it away to start over, or use a new --output"
        )
    # A hyperparameter newer than the checkpoint has its default there: a new field's default
    # keeps what the code that wrote the checkpoint did.
    saved = {**Hyperparameters().to_dict()}
    saved.update(checkpoint_values(content.get("hyper_parameters") or {}))
    current = checkpoint_values(module.hparams)
    fixed = (*Hyperparameters.fixed_on_resume(), "in_channels")
    changed = [
        name for name in fixed if name in saved and _plain(saved[name]) != _plain(current[name])
    ]
    if changed:
        raise ConfigError(
            f"{last} was trained with a different {', '.join(changed)}; rerun with the same "
            "options (see config.yaml) or use a new --output"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _knn_bank(train: ImageDataset, config: FitConfig) -> ImageDataset:
    """The monitor's voters: a fixed random subset of ``knn_bank_size`` training images (the
    same every epoch and on every rank), or all of them when there are fewer."""
    if len(train) <= config.knn_bank_size:
        return train
    if isinstance(train, StreamingImages):
        # Shards are shuffled when written: their first images are a random sample, and
        # reading them touches the fewest shards.
        return train.head(config.knn_bank_size)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    return train.subset(order[: config.knn_bank_size])


def _loggers(folder: RunFolder) -> list[Logger]:
    # One CSV log per invocation (Lightning's CSVLogger deletes an existing metrics.csv);
    # merge_metrics() joins them into the run's metrics.csv.
    runs = len(list(folder.logs.glob("run-*")))
    loggers: list[Logger] = [
        CSVLogger(save_dir=folder.path, name=folder.logs.name, version=f"run-{runs:03d}")
    ]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(
            TensorBoardLogger(save_dir=folder.path, name=folder.tensorboard.name, version="")
        )
    except ModuleNotFoundError:
        pass
    return loggers


def merge_metrics(folder: RunFolder) -> Path:
    """Join the CSV logs of every invocation into the run's ``metrics.csv``.

    A resumed run restarts at its checkpoint's step, so rows that an interrupted run logged
    after that step are superseded by the resumed run's.
    """
    merged: list[dict[str, str]] = []
    columns: list[str] = []
    for log in sorted(folder.logs.glob("run-*/metrics.csv")):
        rows = _complete_rows(log)
        if not rows:
            continue
        first_step = int(rows[0]["step"])
        merged = [row for row in merged if int(row["step"]) < first_step] + rows
        columns += [key for key in rows[0] if key not in columns]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(merged)

    atomic_write(folder.metrics, write)
    return folder.metrics


def _complete_rows(log: Path) -> list[dict[str, str]]:
    """The rows of one invocation's CSV log that are whole; a log torn by a kill (a cut last
    line, a garbled row) loses only those rows, with a warning."""
    try:
        with open(log, newline="", errors="replace") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except csv.Error as error:
        _log.warning("skipped %s, which is not a CSV log (%s)", log, error)
        return []
    whole = [
        row
        for row in rows
        if None not in row and None not in row.values() and row.get("step", "").isdigit()
    ]
    if len(whole) < len(rows):
        _log.warning(
            "skipped %d torn row(s) of %s (an interrupted write)", len(rows) - len(whole), log
        )
    return whole
