"""The end of ``fit``: test kNN accuracy against the baselines, the hardware, the plots."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from barlowtwins.app.neighbours import (
    DUPLICATES_PNG,
    GRID_PNG,
    NeighbourSettings,
    neighbour_report,
)
from barlowtwins.backbones import build_backbone
from barlowtwins.data import ImageDataset, InMemoryImages
from barlowtwins.encoder import EncoderInfo
from barlowtwins.evaluation import extract_features, knn_accuracy, raw_pixel_features
from barlowtwins.evaluation.results import TRAINED, Accuracies, knn_protocols
from barlowtwins.precision import cpu_name
from barlowtwins.runs.folder import RunFolder

_log = logging.getLogger("barlowtwins")

# t-SNE is quadratic-ish: a few thousand test points show the clusters in seconds.
_TSNE_POINTS = 3000
# The neighbour pictures search this many training images at most (a seeded sample beyond):
# features and the duplicate search over 20 000 Fashion-MNIST images take seconds on 2 CPU
# cores, where the whole 60 000 would add a minute (the search is quadratic); `barlowtwins
# neighbours` searches everything.
_NEIGHBOUR_POOL = 20_000


def score_encoders(
    backbone: nn.Module,
    info: EncoderInfo,
    train: ImageDataset,
    test: ImageDataset,
    *,
    k: int,
    temperature: float = 0.1,
    seed: int = 0,
    precision: str = "32",
    device: torch.device | None = None,
) -> tuple[Accuracies, torch.Tensor]:
    """Test kNN accuracy of the trained encoder, the same encoder at random init, and pixels.

    All three are scored alike: the whole ``train`` set votes (weighted kNN, cosine
    similarity) for each ``test`` image, under both standard protocols and the run's own
    (``k``, ``temperature``) (:func:`~barlowtwins.evaluation.results.knn_protocols`). The
    encoders run on ``device`` (default: where the backbone is), one batch at a time, and the
    votes are counted there while the bank fits.

    Returns:
        The accuracies, and the trained encoder's test features.
    """
    assert train.labels is not None and test.labels is not None
    device = next(backbone.parameters()).device if device is None else device
    backbone.to(device)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    def features(encoder: nn.Module, data: ImageDataset) -> torch.Tensor:
        return extract_features(
            encoder,
            data,
            device=device,
            mean=info.mean,
            std=info.std,
            image_size=info.image_size,
            precision=precision,
        )

    train_labels, test_labels = train.labels, test.labels
    protocols = knn_protocols(k, temperature)
    scores: dict[str, dict[str, float]] = {protocol.label: {} for protocol in protocols}

    def score(name: str, train_features: torch.Tensor, test_features: torch.Tensor) -> None:
        for protocol in protocols:
            scores[protocol.label][name] = knn_accuracy(
                train_features,
                train_labels,
                test_features,
                test_labels,
                num_classes=num_classes,
                k=protocol.k,
                temperature=protocol.temperature,
                device=device,
            )

    test_features = features(backbone, test)
    score(TRAINED, features(backbone, train), test_features)
    torch.manual_seed(seed)
    random_init, _ = build_backbone(
        info.backbone, in_channels=info.in_channels, small_image=info.small_image
    )
    # Channels-last as the trained module's model: ~1.7x faster convolutions on CPU.
    random_init.to(device).to(memory_format=torch.channels_last)
    score("random init", features(random_init, train), features(random_init, test))
    if isinstance(train, InMemoryImages) and isinstance(test, InMemoryImages):
        score("raw pixels", raw_pixel_features(train.images), raw_pixel_features(test.images))
    accuracies = Accuracies(
        train_images=len(train),
        test_images=len(test),
        knn_k=k,
        knn_temperature=temperature,
        knn=scores,
    )
    return accuracies, test_features


def write_plots(
    folder: RunFolder,
    *,
    accuracies: Accuracies | None,
    test_features: torch.Tensor | None,
    test: ImageDataset | None,
    cross_correlation: torch.Tensor | None,
    encoder: nn.Module | None = None,
    info: EncoderInfo | None = None,
    train: ImageDataset | None = None,
    device: torch.device | None = None,
    precision: str = "32",
    seed: int = 0,
) -> list[str]:
    """Write the PNGs of a run into its ``plots/``; returns their names.

    With ``encoder``, ``info`` and ``train``, also what the encoder learned from the training
    images alone (:func:`~barlowtwins.app.neighbours.neighbour_report`): their nearest
    neighbours and near-duplicate pairs (``neighbours.png``, ``duplicates.png`` and the pairs
    in ``duplicates.csv``), on at most ``_NEIGHBOUR_POOL`` of them.

    A plot that cannot be drawn (e.g. no kNN monitor ran) is skipped with a log line: plots
    never fail a finished training run.
    """
    from barlowtwins.evaluation import plots

    directory = folder.plots
    directory.mkdir(exist_ok=True)
    metrics = folder.metrics
    # The monitor's bank is a sample of the training set; the final scores let all training
    # images vote, so they are drawn as references rather than joined to the curve.
    baselines = (
        {f"{name}, final": value for name, value in accuracies.own_knn.items()}
        if accuracies
        else None
    )
    embedding_dim = None if cross_correlation is None else int(cross_correlation.shape[0])
    jobs: list[tuple[str, Any]] = [
        ("loss.png", lambda out: plots.plot_loss(metrics, out)),
        ("health.png", lambda out: plots.plot_health(metrics, out, embedding_dim)),
        ("knn_accuracy.png", lambda out: plots.plot_knn_accuracy(metrics, out, baselines)),
    ]
    if cross_correlation is not None:
        jobs.append(
            (
                "cross_correlation.png",
                lambda out: plots.plot_cross_correlation(cross_correlation, out),
            )
        )
    if test_features is not None and test is not None:
        jobs.append(
            (
                "embedding_tsne.png",
                lambda out: plots.plot_embedding_2d(
                    test_features,
                    test.labels,
                    out,
                    class_names=test.classes,
                    max_points=_TSNE_POINTS,
                ),
            )
        )
    written = []
    for name, draw in jobs:
        try:
            draw(directory / name)
            written.append(name)
        except (ValueError, OSError) as error:
            _log.warning("skipped plot %s: %s", name, error)
    if encoder is not None and info is not None and train is not None:
        settings = NeighbourSettings(pool=_NEIGHBOUR_POOL, seed=seed)
        try:
            summary = neighbour_report(
                encoder,
                info,
                train,
                directory,
                settings=settings,
                device=device,
                precision=precision,
            )
            written += [name for name in summary.files if name.endswith(".png")]
        except (ValueError, OSError) as error:
            _log.warning("skipped plots %s, %s: %s", GRID_PNG, DUPLICATES_PNG, error)
    return written


def describe_hardware(trainer: Any) -> dict[str, Any]:
    """What a Lightning ``Trainer`` trained on, for ``results.json`` and the model card."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name() + f", {torch.get_num_threads()} threads"
    return {
        "device": name,
        "accelerator": device.type,
        "devices": int(trainer.num_devices),
        "num_nodes": int(trainer.num_nodes),
        "precision": str(trainer.precision),
        "torch": torch.__version__,
    }
