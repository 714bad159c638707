"""``barlowtwins finetune``: what pretraining buys when only a few images are labelled.

It answers "does pretraining beat training on my labels alone?" with three numbers on the same
labelled subset and the same test images: the pretrained backbone fine-tuned together with a
linear head, the same network trained identically from random initialisation, and a linear
probe on the frozen pretrained features (the protocol: :mod:`barlowtwins.evaluation.finetune`).
The fine-tuned classifier is saved into the run (:class:`~barlowtwins.runs.folder.RunFolder`:
``finetuned.safetensors``, ``finetune.json``, ``finetune_labels.csv``), from where ``export
--with-head finetuned`` and the model card take it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from barlowtwins.app.export import save_classifier
from barlowtwins.app.inference import resolve_device
from barlowtwins.backbones import build_backbone
from barlowtwins.data import DataError, ImageDataset, load_data
from barlowtwins.encoder import LinearHead, feature_dim
from barlowtwins.evaluation import bank_device, extract_features, linear_probe
from barlowtwins.evaluation.finetune import (
    RANDOM_INIT,
    FinetuneAccuracies,
    FinetuneSettings,
    balanced_subset,
    finetune_classifier,
    new_head,
)
from barlowtwins.evaluation.results import TRAINED
from barlowtwins.precision import PRECISIONS, default_precision
from barlowtwins.runs.files import atomic_write
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import (
    FINETUNED_KEY,
    TrainedEncoder,
    fingerprint,
    load_trained_encoder,
)

_log = logging.getLogger("barlowtwins")
# Columns of finetune_labels.csv.
_SUBSET_COLUMNS = ("index", "label", "class", "path")


@dataclass(frozen=True)
class LabelAmount:
    """How many labels to train on: a share of the training images or a count.

    Attributes:
        percent: Percent of the labelled training images, in (0, 100].
        count: Number of labelled images.
    """

    percent: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        """Exactly one of the two, in range."""
        if (self.percent is None) == (self.count is None):
            raise ValueError("give the labels to train on as a percent or as a count, not both")
        if self.percent is not None and not 0.0 < self.percent <= 100.0:
            raise ValueError(f"--percent must lie in (0, 100], got {self.percent:g}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"--labels must be a positive count, got {self.count}")

    def of(self, images: int) -> int:
        """The number of labels among ``images`` labelled training images.

        Raises:
            DataError: If the percent leaves less than one label.
        """
        if self.count is not None:
            return self.count
        assert self.percent is not None
        count = round(self.percent / 100.0 * images)
        if count < 1:
            raise DataError(f"{self.percent:g} % of {images} images is less than one label")
        return count


def finetune(
    checkpoint: str | Path,
    amount: LabelAmount | None,
    *,
    train: str = "fashion-mnist:train",
    test: str = "fashion-mnist:test",
    settings: FinetuneSettings | None = None,
    subset: Path | None = None,
    baseline: bool = True,
    output: Path | None = None,
    precision: str | None = None,
    accelerator: str | None = None,
    batch_size: int = 512,
    **data_options: Any,
) -> tuple[FinetuneAccuracies, RunFolder]:
    """Fine-tune a pretrained encoder on a few labels, beside its baselines; save the result.

    Args:
        checkpoint: Anything :func:`~barlowtwins.runs.loader.load_trained_encoder` reads.
        amount: How many labels (:class:`LabelAmount`); ``None`` with ``subset``.
        train: Labelled data the subset is drawn from.
        test: Labelled data the classifiers are scored on.
        settings: The protocol (default: :class:`FinetuneSettings`'s).
        subset: A ``finetune_labels.csv`` to train on instead of drawing a subset (its
            ``index`` column, checked against the labels); instead of ``amount``.
        baseline: Also train the same network from random initialisation.
        output: The folder to write into (default: the run's folder).
        precision: Autocast precision (default: :func:`~barlowtwins.precision.default_precision`
            of the accelerator: bf16 where the hardware runs it fast).
        accelerator: Where to train (:func:`~barlowtwins.app.inference.resolve_device`).
        batch_size: Images per forward pass of the feature extraction and the tests.
        **data_options: Passed to :func:`barlowtwins.data.load_data` (``max_samples`` for
            the training data only).

    Returns:
        The accuracies, as written into ``finetune.json``, and the folder written into.

    Raises:
        ValueError: On bad settings, an unknown precision, or no folder to write into.
        DataError: On unlabelled data, or more labels than a class has.
        CheckpointError: If ``checkpoint`` is not a run.
    """
    settings = settings or FinetuneSettings()
    if (amount is None) == (subset is None):
        raise ValueError("give the labels to train on as a percent, a count or a subset file")
    run = load_trained_encoder(checkpoint)
    folder = RunFolder(output) if output is not None else run.folder
    if folder is None:
        raise ValueError(f"{checkpoint} lies in no run folder; pass --output DIR")
    device = resolve_device(accelerator)
    precision = precision or default_precision(accelerator or "auto")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    info = run.info
    geometry: dict[str, Any] = {"image_size": info.image_size, "channels": info.in_channels}
    train_data = load_data(train, **geometry, **data_options)
    test_data = load_data(test, **geometry, **{**data_options, "max_samples": None})
    for name, data in (("train", train_data), ("test", test_data)):
        if data.labels is None:
            raise DataError(f"--{name} data has no labels (use class subfolders)")
    assert train_data.labels is not None and test_data.labels is not None
    if subset is not None:
        chosen = read_subset(subset, train_data)
    else:
        assert amount is not None  # one of the two, checked above
        chosen = balanced_subset(
            train_data.labels,
            amount.of(len(train_data)),
            seed=settings.seed,
            classes=train_data.classes,
        )
    folder.path.mkdir(parents=True, exist_ok=True)
    write_subset(folder.finetune_labels, train_data, chosen)
    labelled = train_data.subset(chosen)
    num_classes = int(max(train_data.labels.max(), test_data.labels.max())) + 1
    common: dict[str, Any] = {
        "mean": info.mean,
        "std": info.std,
        "image_size": info.image_size,
        "device": device,
        "precision": precision,
        "test_batch_size": batch_size,
    }
    width = feature_dim(info, run.encoder())
    minutes: dict[str, float] = {}

    _log.info("fine-tuning the pretrained encoder on %d labels", len(labelled))
    backbone = run.encoder()
    head = new_head(width, num_classes, std=settings.head_init_std, seed=settings.seed)
    pretrained = finetune_classifier(backbone, head, labelled, test_data, settings, **common)
    finetuned = {TRAINED: pretrained.test_accuracy}
    minutes[f"finetune {TRAINED}"] = round(pretrained.minutes, 2)
    if baseline:
        _log.info("training the same network from random initialisation")
        # The random init of `fit`'s baseline (report.score_encoders), without touching the
        # caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            scratch, _ = build_backbone(
                info.backbone, in_channels=info.in_channels, small_image=info.small_image
            )
        scratch_head = new_head(width, num_classes, std=settings.head_init_std, seed=settings.seed)
        result = finetune_classifier(scratch, scratch_head, labelled, test_data, settings, **common)
        finetuned[RANDOM_INIT] = result.test_accuracy
        minutes[f"finetune {RANDOM_INIT}"] = round(result.minutes, 2)

    started = time.perf_counter()
    frozen = run.encoder().to(device).to(memory_format=torch.channels_last)
    features = {
        name: extract_features(
            frozen,
            data,
            batch_size=batch_size,
            device=device,
            mean=info.mean,
            std=info.std,
            image_size=info.image_size,
            precision=precision,
        )
        for name, data in (("train", labelled), ("test", test_data))
    }
    where = bank_device(features["test"], device)
    probe_epochs = settings.probe_epochs_for(len(labelled))
    assert labelled.labels is not None
    probe = linear_probe(
        features["train"].to(where),
        labelled.labels,
        features["test"].to(where),
        test_data.labels,
        num_classes=num_classes,
        epochs=probe_epochs,
        seed=settings.seed,
    )
    minutes["linear probe"] = round((time.perf_counter() - started) / 60, 2)

    classes = train_data.classes
    accuracies = FinetuneAccuracies(
        train_images=len(train_data),
        labels=len(labelled),
        labels_per_class={
            (classes[label] if classes and label < len(classes) else str(label)): int(count)
            for label, count in enumerate(torch.bincount(labelled.labels).tolist())
            if count
        },
        test_images=len(test_data),
        epochs=pretrained.epochs,
        steps=pretrained.steps,
        finetuned=finetuned,
        linear_probe={TRAINED: probe.test_accuracy},
        linear_probe_epochs=probe_epochs,
        minutes=minutes,
    )
    protocol = {
        "train": train,
        "test": test,
        "max_samples": data_options.get("max_samples"),
        "subset": str(subset) if subset is not None else f"balanced, seed {settings.seed}",
        "settings": asdict(settings),
        "augmentation": str(settings.view(info.image_size)),
        "precision": precision,
        "device": str(device),
        "source": "facebookresearch/barlowtwins evaluate.py --weights finetune (Table 2 of "
        "arXiv 2103.03230); see barlowtwins.evaluation.finetune for what differs",
        "pretrained_backbone_sha256": fingerprint(run.backbone_state),
    }
    _save(folder, run, backbone, head, classes, accuracies, protocol)
    return accuracies, folder


def _save(
    folder: RunFolder,
    run: TrainedEncoder,
    backbone: torch.nn.Module,
    head: torch.nn.Linear,
    classes: list[str] | None,
    accuracies: FinetuneAccuracies,
    protocol: dict[str, Any],
) -> None:
    """Write the fine-tuned classifier and what it scored into the run folder."""
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    summary = {
        "labels": accuracies.labels,
        "percent": round(accuracies.percent, 4),
        "test_top1": round(accuracies.finetuned[TRAINED], 2),
        "train": protocol["train"],
        "pretrained_backbone_sha256": protocol["pretrained_backbone_sha256"],
    }
    classifier = replace(
        run,
        backbone_state=state,
        head=LinearHead(
            weight=head.weight.detach().cpu(),
            bias=head.bias.detach().cpu(),
            classes=tuple(classes) if classes else None,
            backbone_sha256=fingerprint(state),
        ),
        metadata={FINETUNED_KEY: json.dumps(summary)},
    )
    save_classifier(classifier, folder.finetuned)
    text = json.dumps({"results": accuracies.to_dict(), "protocol": protocol}, indent=2) + "\n"
    atomic_write(folder.finetune_results, lambda tmp: tmp.write_text(text))


def write_subset(path: Path, data: ImageDataset, indices: torch.Tensor) -> Path:
    """Write the labelled subset as CSV (index, label, class, path), atomically.

    Args:
        path: The file (``finetune_labels.csv`` of the run).
        data: The training data the indices point into.
        indices: The chosen samples.

    Returns:
        ``path``.
    """
    assert data.labels is not None
    labels = data.labels[indices].tolist()
    paths = data.paths

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(_SUBSET_COLUMNS)
            for index, label in zip(indices.tolist(), labels, strict=True):
                name = data.classes[label] if data.classes else ""
                writer.writerow((index, label, name, paths[index] if paths else ""))

    atomic_write(path, write)
    return path


def read_subset(path: Path, data: ImageDataset) -> torch.Tensor:
    """The indices a ``finetune_labels.csv`` lists, checked against the training data.

    Raises:
        DataError: If the file is unreadable, names images the data does not have, or gives
            them other labels.
    """
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        indices = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
        labels = [int(row["label"]) for row in rows if row.get("label") not in (None, "")]
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"cannot read the subset {path}: {error}") from None
    assert data.labels is not None
    if not rows or int(indices.min()) < 0 or int(indices.max()) >= len(data):
        raise DataError(f"{path} lists no images, or images beyond the {len(data)} of --train")
    if len(indices.unique()) != len(indices):
        raise DataError(f"{path} lists an image twice")
    if len(labels) == len(indices) and labels != data.labels[indices].tolist():
        raise DataError(f"{path} gives other labels than the --train data: not its subset")
    return indices
