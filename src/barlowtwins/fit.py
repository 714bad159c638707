"""``barlowtwins fit``: pretrain, resume, export, score and plot."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from barlowtwins.checkpoint import EncoderInfo, safe_load, save_encoder
from barlowtwins.config import (
    FASHION_MNIST,
    ConfigError,
    FitConfig,
    is_fashion_mnist,
    resolve_defaults,
)
from barlowtwins.data import ImageDataset, InMemoryImages, load_data
from barlowtwins.datamodule import BarlowTwinsDataModule
from barlowtwins.distributed import DistributedJobError
from barlowtwins.lightning_plugins import (
    AtomicCheckpointIO,
    GlobalBatchNormSync,
    PreemptionCheckpoint,
    ProgressBar,
    RngStateCheckpoint,
)
from barlowtwins.loss import cross_correlation
from barlowtwins.module import BarlowTwinsModule
from barlowtwins.report import describe_hardware, score_encoders, write_plots

_log = logging.getLogger("barlowtwins")

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# The final summary's kNN also reports these neighbour counts: 20 (DINO's protocol) and
# 200 (InstDisc's and lightly's).
SUMMARY_K = (20, 200)
# How long rank 0 waits for a launched rank's exit status after a collective failed.
_EXIT_STATUS_WAIT_S = 2.0


def fit(config: FitConfig) -> dict[str, Any]:
    """Run ``barlowtwins fit`` with a validated config; returns the final results.

    A rerun with the same ``output`` resumes from ``output/checkpoints/last.ckpt``.
    """
    started = time.perf_counter()
    config = dataclasses.replace(config)
    resolve_defaults(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)

    train, val = _load_datasets(config)
    world = config.devices * config.num_nodes
    if len(train) < config.batch_size * world:
        raise ConfigError(
            f"batch size {config.batch_size} x {world} process(es) is larger than the dataset "
            f"({len(train)} images); lower --batch-size"
        )
    image_size = config.image_size or train.image_size
    module = BarlowTwinsModule(
        backbone=config.backbone,
        in_channels=train.channels,
        image_size=image_size,
        small_image=config.small_image,
        projector_dims=tuple(config.projector_dims),
        lambda_param=config.lambda_param,
        optimizer=config.optimizer,
        lr_weights=config.lr_weights,
        lr_biases=config.lr_biases,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        batch_size=config.batch_size,
        crop_scale=tuple(config.crop_scale),
        knn_k=config.knn_k,
    )
    datamodule = BarlowTwinsDataModule(
        train,
        config.batch_size,
        knn_bank=_knn_bank(train, config) if val is not None else None,
        knn_query=val,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    if config.compile:
        module.model.compile()

    trainer = _trainer(config, output, monitor=val is not None)
    last = output / CHECKPOINT_DIR / LAST_CHECKPOINT
    # A kill during an atomic write can leave its temporary file behind.
    for stale in (output / CHECKPOINT_DIR).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if last.is_file():
        _check_resumable(last, module)
        _log.info("resuming from %s", last)
    (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    _treat_sigusr1_as_sigterm()
    training_started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.is_file() else None)
    except SIGTERMException:
        print(
            f"stopped by SIGTERM/SIGUSR1 at step {trainer.global_step}: saved {last}; "
            "rerun the same command to resume"
        )
        raise SystemExit(143) from None
    except SystemExit:
        if not trainer.interrupted:
            raise
        # Lightning turns Ctrl-C into sys.exit(1) after PreemptionCheckpoint saved.
        print(
            f"interrupted at step {trainer.global_step}: saved {last}; "
            "rerun the same command to resume"
        )
        raise SystemExit(130) from None
    except Exception:
        # Without this, the ranks this process launched would wait for it in their next
        # collective until the 30-minute timeout.
        failure = _stop_launched_ranks(trainer)
        if failure is not None:
            raise DistributedJobError(failure) from None
        raise
    if not trainer.is_global_zero:
        return {}
    training_minutes = (time.perf_counter() - training_started) / 60

    merge_metrics(output)
    info = EncoderInfo.from_hparams(dict(module.hparams))
    save_encoder(module.backbone, info, output)
    results: dict[str, Any] = {"train_images": len(train), "skipped_images": train.num_skipped}
    results["hardware"] = describe_hardware(trainer)
    scores, test_features = None, None
    if val is not None:
        scores, test_features = score_encoders(
            module.backbone,
            info,
            train,
            val,
            k=config.knn_k,
            more_k=SUMMARY_K,
            seed=config.seed,
            precision="bf16" if "bf16" in str(trainer.precision) else "32",
        )
        results["knn"] = scores
    if config.plots:
        results["plots"] = write_plots(
            output,
            scores=scores,
            test_features=test_features,
            test=val,
            cross_correlation=_held_out_cross_correlation(module, val or train),
        )
    results["minutes"] = round((time.perf_counter() - started) / 60, 2)
    # This invocation's trainer.fit only (a resumed run's earlier invocations not included).
    results["training_minutes"] = round(training_minutes, 2)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_summary(results, output)
    return results


def _treat_sigusr1_as_sigterm() -> None:
    """Let SIGUSR1, which clusters also send before preemption, checkpoint and stop like SIGTERM.

    Under SLURM, Lightning installs its own SIGUSR1 handler when training starts (checkpoint
    and requeue) if none is installed yet, so this one is left out there.
    """
    if SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def _stop_launched_ranks(trainer: L.Trainer) -> str | None:
    """Kill the ranks that Lightning launched from this process; describe one that failed.

    On one node, Lightning starts ranks 1..N-1 as child processes of rank 0. When one of them
    dies, rank 0's next collective fails with a connection error that does not say why, so the
    message names the child's exit status instead.
    """
    launcher = trainer.strategy.launcher
    children = list(getattr(launcher, "procs", []))
    if launcher is None or not children:
        return None
    deadline = time.monotonic() + _EXIT_STATUS_WAIT_S
    while True:
        failed = [(rank, child) for rank, child in enumerate(children, 1) if child.poll()]
        if failed or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    launcher.kill(signal.SIGKILL)
    if not failed:
        return None
    rank, child = failed[0]
    code = child.returncode
    if code < 0:
        cause = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            cause += ", e.g. from the out-of-memory killer"
    else:
        cause = "its error is printed above"
    return f"local rank {rank} (pid {child.pid}) ended with code {code} ({cause}); job stopped"


@torch.no_grad()
def _held_out_cross_correlation(
    module: BarlowTwinsModule, data: ImageDataset, size: int = 512
) -> torch.Tensor:
    """The loss's cross-correlation matrix on two views of (up to) ``size`` held-out images."""
    images = torch.stack([data[i][0] for i in range(min(size, len(data)))])
    device = next(module.parameters()).device
    module.eval()
    view_a, view_b = module.augment(images.to(device), torch.Generator(device).manual_seed(0))
    return cross_correlation(module.model(view_a).float(), module.model(view_b).float()).cpu()


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


def _load_datasets(config: FitConfig) -> tuple[ImageDataset, ImageDataset | None]:
    is_fashion = is_fashion_mnist(config.data)
    # Folders are stored a little larger than the views so random crops are not upsampled.
    load_size = config.image_size
    if not is_fashion:
        load_size = round((config.image_size or 64) * 8 / 7)
    channels = config.channels or (1 if is_fashion else 3)
    common = {"data_dir": config.data_dir, "download": config.download}
    train = load_data(
        config.data,
        image_size=load_size,
        channels=channels,
        max_samples=config.max_samples,
        **common,
    )
    val_spec = config.val_data or (f"{FASHION_MNIST}:test" if is_fashion else None)
    if val_spec is None:
        return train, None
    val = load_data(
        val_spec,
        image_size=train.image_size,
        channels=train.channels,
        max_samples=config.val_max_samples,
        **common,
    )
    if val.labels is None or train.labels is None:
        _log.warning("no labels in %s or the training data: kNN monitor disabled", val_spec)
        return train, None
    return train, val


def _knn_bank(train: ImageDataset, config: FitConfig) -> ImageDataset:
    if not isinstance(train, InMemoryImages) or len(train) <= config.knn_bank_size:
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    return train.subset(order[: config.knn_bank_size])


def default_precision(accelerator: str) -> str:
    """bf16 autocast where the hardware runs it fast, else float32."""
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def _trainer(config: FitConfig, output: Path, *, monitor: bool) -> L.Trainer:
    world = config.devices * config.num_nodes
    checkpoint = ModelCheckpoint(
        dirpath=output / CHECKPOINT_DIR,
        filename="best",
        monitor="val_knn_acc" if monitor else None,
        mode="max",
        save_top_k=1 if monitor else 0,
        save_last=True,
        enable_version_counter=False,
    )
    plugins: list[Any] = [AtomicCheckpointIO()]
    if world > 1:
        plugins.append(GlobalBatchNormSync())
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if world > 1 else "auto",
        precision=config.precision or default_precision(config.accelerator),
        plugins=plugins,
        callbacks=[
            checkpoint,
            PreemptionCheckpoint(output / CHECKPOINT_DIR / LAST_CHECKPOINT),
            RngStateCheckpoint(),
            ProgressBar(),
        ],
        logger=_loggers(output),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        default_root_dir=output,
    )


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
