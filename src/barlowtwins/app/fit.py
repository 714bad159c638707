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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from barlowtwins.app.budget import TimeBudget
from barlowtwins.app.config import ConfigError, FitConfig
from barlowtwins.app.launch import run_training
from barlowtwins.app.report import describe_hardware, score_encoders, write_plots
from barlowtwins.data import ImageDataset, load_data
from barlowtwins.loss import cross_correlation
from barlowtwins.training.callbacks import (
    AtomicCheckpointIO,
    GlobalBatchNormSync,
    PreemptionCheckpoint,
    ProgressBar,
    RngStateCheckpoint,
)
from barlowtwins.training.checkpoint import EncoderInfo, safe_load, save_encoder
from barlowtwins.training.datamodule import BarlowTwinsDataModule
from barlowtwins.training.module import BarlowTwinsModule

_log = logging.getLogger("barlowtwins")

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# The final summary's kNN also reports these neighbour counts: 20 (DINO's protocol) and
# 200 (InstDisc's and lightly's).
SUMMARY_K = (20, 200)
# Folders are loaded a little larger than the views so that random crops are not upsampled.
_FOLDER_LOAD_SCALE = 8 / 7
# Options the checkpoint's weights, optimizer state or schedule depend on; lambda_param and
# epochs may change on resume.
_FIXED_ON_RESUME = (
    "backbone",
    "in_channels",
    "small_image",
    "image_size",
    "projector_dims",
    "optimizer",
    "lr_weights",
    "lr_biases",
    "weight_decay",
    "batch_size",
)


@dataclass
class PreparedRun:
    """Everything training needs (:func:`~barlowtwins.app.launch.run_training`), built from a
    config by :func:`prepare`."""

    config: FitConfig
    output: Path
    train: ImageDataset
    val: ImageDataset | None
    module: BarlowTwinsModule
    datamodule: BarlowTwinsDataModule
    trainer: L.Trainer

    @property
    def last_checkpoint(self) -> Path:
        return self.output / CHECKPOINT_DIR / LAST_CHECKPOINT


def fit(config: FitConfig, *, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run ``barlowtwins fit`` with a resolved config; returns the final results.

    A rerun with the same ``output`` resumes from ``output/checkpoints/last.ckpt``.

    Args:
        config: From :func:`barlowtwins.app.config.load_fit_config`.
        callbacks: Extra Lightning callbacks for the trainer.

    Returns:
        The contents of ``results.json`` on rank 0; an empty dict on other ranks.
    """
    started = time.perf_counter()
    run = prepare(config, callbacks=callbacks)
    training_started = time.perf_counter()
    run_training(run.trainer, run.module, run.datamodule, run.last_checkpoint)
    if not run.trainer.is_global_zero:
        return {}
    if config.time_budget is not None:
        # TimeBudget planned the run and re-planned its epochs: config.yaml records the
        # schedule the run trained.
        run.config = run.config.model_copy(
            update={
                "epochs": run.trainer.max_epochs,
                "steps_per_epoch": run.trainer.limit_train_batches,
            }
        )
        _write_config(run.output, run.config)
    return finish(
        run, started=started, training_minutes=(time.perf_counter() - training_started) / 60
    )


def prepare(config: FitConfig, *, callbacks: Sequence[Callback] = ()) -> PreparedRun:
    """Load the data, build module, data module and trainer, and check a run to resume."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    train, val = load_datasets(config)
    if len(train) < config.batch_size:
        raise ConfigError(
            f"the global batch of {config.batch_size} images is larger than the dataset "
            f"({len(train)} images); lower --batch-size"
        )
    module = build_module(config, in_channels=train.channels)
    previous = _resumed_config(output)
    _check_budget_unchanged(config, previous, output)
    plan = _resumed_plan(config, previous)
    if plan is not None:
        # A resumed budget run keeps its schedule (TimeBudget then applies its checkpoint's).
        config = config.model_copy(update={"epochs": plan[0], "steps_per_epoch": plan[1]})
    datamodule = BarlowTwinsDataModule(
        train,
        config.batch_size,
        knn_bank=_knn_bank(train, config) if val is not None else None,
        knn_query=val,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    run = PreparedRun(
        config,
        output,
        train,
        val,
        module,
        datamodule,
        build_trainer(
            config,
            output,
            monitor=val is not None,
            callbacks=[*callbacks, *_budget_callbacks(config, output, plan)],
        ),
    )
    # A kill during an atomic write can leave its temporary file behind.
    for stale in (output / CHECKPOINT_DIR).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if run.last_checkpoint.is_file():
        _check_resumable(run.last_checkpoint, module)
        _log.info("resuming from %s", run.last_checkpoint)
    if run.trainer.is_global_zero:
        _write_config(output, config)
    return run


def _write_config(output: Path, config: FitConfig) -> None:
    (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _resumed_config(output: Path) -> dict[str, Any] | None:
    """The config.yaml of the run a checkpoint in ``output`` resumes, if there is one."""
    saved = output / "config.yaml"
    if not ((output / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file() and saved.is_file()):
        return None
    return yaml.safe_load(saved.read_text()) or {}


def _check_budget_unchanged(
    config: FitConfig, previous: dict[str, Any] | None, output: Path
) -> None:
    """A budget run resumes only under its own budget: its schedule was planned for it."""
    budget = None if previous is None else previous.get("time_budget")
    if budget is not None and budget != config.time_budget:
        raise ConfigError(
            f"{output} trains to a time budget of {budget} min; rerun with --time-budget "
            f"{budget}, or use a new --output"
        )


def _resumed_plan(config: FitConfig, previous: dict[str, Any] | None) -> tuple[int, int] | None:
    """The epochs and steps per epoch that a resumed budget run planned when it started."""
    if config.time_budget is None or previous is None:
        return None
    epochs, steps = previous.get("epochs"), previous.get("steps_per_epoch")
    return None if epochs is None or steps is None else (int(epochs), int(steps))


def _budget_callbacks(
    config: FitConfig, output: Path, plan: tuple[int, int] | None
) -> list[Callback]:
    """A :class:`TimeBudget` for a budget run; it records its plan in ``config.yaml`` at once,
    so that a run killed before it ends resumes with that plan."""
    if config.time_budget is None:
        return []

    def record(epochs: int, steps: int) -> None:
        _write_config(
            output, config.model_copy(update={"epochs": epochs, "steps_per_epoch": steps})
        )

    return [TimeBudget(config.time_budget, plan=plan, on_plan=record)]


def build_module(config: FitConfig, *, in_channels: int) -> BarlowTwinsModule:
    """The LightningModule of a config's hyperparameters."""
    module = BarlowTwinsModule(
        backbone=config.backbone,
        in_channels=in_channels,
        image_size=config.image_size,
        small_image=config.small_image,
        zero_init_residual=config.zero_init_residual,
        projector_dims=config.projector_dims,
        lambda_param=config.lambda_param,
        scale_loss=config.scale_loss,
        mix_weight=config.mix_weight,
        num_views=config.num_views,
        seed=config.seed,
        optimizer=config.optimizer,
        lr_weights=config.lr_weights,
        lr_biases=config.lr_biases,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        lars_eta=config.lars_eta,
        lars_clip_lr=config.lars_clip_lr,
        warmup_epochs=config.warmup_epochs,
        final_lr_factor=config.final_lr_factor,
        batch_size=config.batch_size,
        crop_scale=config.crop_scale,
        translate=config.translate,
        erase_prob=config.erase_prob,
        solarize_prob=config.solarize_prob,
        knn_k=config.knn_k,
    )
    if config.compile:
        module.model.compile()
    return module


def load_datasets(config: FitConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """The training data and, where labels exist on both sides, the labelled scoring data."""
    spec = config.data_spec
    # Fashion-MNIST is loaded at the view size; folders a little larger, for the crops.
    load_size = (
        config.image_size
        if spec.is_fashion_mnist
        else round(config.image_size * _FOLDER_LOAD_SCALE)
    )
    common: dict[str, Any] = {"data_dir": config.data_dir, "download": config.download}
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
    config: FitConfig, output: Path, *, monitor: bool, callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """A Trainer with crash-safe checkpoints, exact batch-norm sync and our logs."""
    # last.ckpt is a checkpoint of its own, written after every epoch: Lightning's save_last
    # writes only in a step where a top-k checkpoint was saved (2.6), so an epoch whose kNN
    # monitor did not improve would leave last.ckpt (what a rerun resumes from and what
    # `embed` loads) epochs behind. Both save at the end of the training epoch, after its
    # monitor and after the callbacks of that hook (TimeBudget's plan is in the checkpoint).
    checkpoints = [
        ModelCheckpoint(
            dirpath=output / CHECKPOINT_DIR,
            filename=Path(LAST_CHECKPOINT).stem,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    ]
    if monitor:
        checkpoints.append(
            ModelCheckpoint(
                dirpath=output / CHECKPOINT_DIR,
                filename="best",
                monitor="val_knn_acc",
                mode="max",
                save_top_k=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    plugins: list[Any] = [AtomicCheckpointIO()]
    ddp = config.world_size > 1 or config.strategy == "ddp"
    if ddp:
        plugins.append(GlobalBatchNormSync())
    return L.Trainer(
        max_epochs=config.epochs,
        limit_train_batches=config.steps_per_epoch,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if ddp else "auto",
        precision=config.precision,  # type: ignore[arg-type]
        plugins=plugins,
        callbacks=[
            *checkpoints,
            PreemptionCheckpoint(output / CHECKPOINT_DIR / LAST_CHECKPOINT),
            RngStateCheckpoint(),
            ProgressBar(),
            *callbacks,
        ],
        logger=_loggers(output),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        default_root_dir=output,
    )


def finish(run: PreparedRun, *, started: float, training_minutes: float) -> dict[str, Any]:
    """Export the encoder, score it, plot, and write ``results.json``; print the summary."""
    config, output, module = run.config, run.output, run.module
    merge_metrics(output)
    info = EncoderInfo.from_hparams(dict(module.hparams))
    save_encoder(module.backbone, info, output)
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
    scores, test_features = None, None
    if run.val is not None:
        scores, test_features = score_encoders(
            module.backbone,
            info,
            run.train,
            run.val,
            k=config.knn_k,
            more_k=SUMMARY_K,
            seed=config.seed,
            precision=str(run.trainer.precision),
            device=device,
        )
        results["knn"] = scores
    if config.plots:
        results["plots"] = write_plots(
            output,
            scores=scores,
            test_features=test_features,
            test=run.val,
            cross_correlation=_held_out_cross_correlation(module, run.val or run.train, device),
        )
    results["minutes"] = round((time.perf_counter() - started) / 60, 2)
    # This invocation's trainer.fit only (a resumed run's earlier invocations not included).
    results["training_minutes"] = round(training_minutes, 2)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_summary(results, output)
    return results


@torch.no_grad()
def _held_out_cross_correlation(
    module: BarlowTwinsModule, data: ImageDataset, device: torch.device, size: int = 512
) -> torch.Tensor:
    """The loss's cross-correlation matrix on two views of (up to) ``size`` held-out images."""
    images = torch.stack([data[i][0] for i in range(min(size, len(data)))])
    module.eval()
    view_a, view_b = module.augment(images.to(device), torch.Generator(device).manual_seed(0))
    return cross_correlation(module.model(view_a).float(), module.model(view_b).float()).cpu()


def _check_resumable(last: Path, module: BarlowTwinsModule) -> None:
    saved = safe_load(last).get("hyper_parameters") or {}
    changed = [
        name
        for name in _FIXED_ON_RESUME
        if name in saved and _plain(saved[name]) != _plain(module.hparams[name])
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
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    return train.subset(order[: config.knn_bank_size])


def _loggers(output: Path) -> list[Logger]:
    # One CSV log per invocation (Lightning's CSVLogger deletes an existing metrics.csv);
    # merge_metrics() joins them into output/metrics.csv.
    runs = len(list((output / "logs").glob("run-*")))
    loggers: list[Logger] = [CSVLogger(save_dir=output, name="logs", version=f"run-{runs:03d}")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=output, name="tensorboard", version=""))
    except ModuleNotFoundError:
        pass
    return loggers


def merge_metrics(output: Path) -> Path:
    """Join the CSV logs of every invocation into ``output/metrics.csv``.

    A resumed run restarts at its checkpoint's step, so rows that an interrupted run logged
    after that step are superseded by the resumed run's.
    """
    merged: list[dict[str, str]] = []
    columns: list[str] = []
    for log in sorted((output / "logs").glob("run-*/metrics.csv")):
        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            continue
        first_step = int(rows[0]["step"])
        merged = [row for row in merged if int(row["step"]) < first_step] + rows
        columns += [key for key in rows[0] if key not in columns]
    target = output / "metrics.csv"
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(merged)
    return target


def _print_summary(results: dict[str, Any], output: Path) -> None:
    knn = results.get("knn")
    if knn:
        columns = list(knn["at_k"])
        print(
            f"\nTest kNN accuracy on {knn['test_images']} images (cosine similarity, "
            f"temperature {knn['temperature']}, all {results['train_images']} training "
            "images vote):"
        )
        print(" " * 15 + "".join(f"{'k=' + n:>9}" for n in columns))
        for name in knn["at_k"][columns[0]]:
            row = "".join(f"{knn['at_k'][n][name]:8.2f}%" for n in columns)
            print(f"  {name:<13}{row}")
    print(
        f"\nwrote {output}: backbone.pt, checkpoints/, metrics.csv, results.json"
        + (", plots/" if results.get("plots") else "")
    )
