"""The end of ``fit``: test kNN accuracy against the baselines, the hardware, the plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from barlowtwins.backbones import build_backbone
from barlowtwins.data import ImageDataset, InMemoryImages
from barlowtwins.encoder import EncoderInfo
from barlowtwins.evaluation import extract_features, knn_accuracy, raw_pixel_features
from barlowtwins.evaluation.results import TRAINED, Accuracies
from barlowtwins.precision import cpu_name
from barlowtwins.runs.folder import RunFolder

_log = logging.getLogger("barlowtwins")

# t-SNE is quadratic-ish: a few thousand test points show the clusters in seconds.
_TSNE_POINTS = 3000


def score_encoders(
    backbone: nn.Module,
    info: EncoderInfo,
    train: ImageDataset,
    test: ImageDataset,
    *,
    k: int,
    more_k: Sequence[int] = (),
    temperature: float = 0.1,
    seed: int = 0,
    precision: str = "32",
    device: torch.device | None = None,
) -> tuple[Accuracies, torch.Tensor]:
    """Test kNN accuracy of the trained encoder, the same encoder at random init, and pixels.

    All three use the same protocol: the whole ``train`` set votes (weighted kNN, cosine
    similarity) for each ``test`` image. The encoders run on ``device`` (default: where the
    backbone is), one batch at a time, and the votes are counted there while the bank fits.

    Returns:
        The accuracies at ``k`` and every ``more_k``, and the trained encoder's test features.
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
    neighbours = sorted({k, *more_k})
    at_k: dict[str, dict[str, float]] = {str(n): {} for n in neighbours}

    def score(name: str, train_features: torch.Tensor, test_features: torch.Tensor) -> None:
        for n in neighbours:
            at_k[str(n)][name] = knn_accuracy(
                train_features,
                train_labels,
                test_features,
                test_labels,
                num_classes=num_classes,
                k=n,
                temperature=temperature,
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
        knn=at_k,
    )
    return accuracies, test_features


def write_plots(
    folder: RunFolder,
    *,
    accuracies: Accuracies | None,
    test_features: torch.Tensor | None,
    test: ImageDataset | None,
    cross_correlation: torch.Tensor | None,
) -> list[str]:
    """Write the PNGs of a run into its ``plots/``; returns their names.

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
        {f"{name}, final": value for name, value in accuracies.knn[str(accuracies.knn_k)].items()}
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
