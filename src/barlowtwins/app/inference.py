"""``embed`` and ``evaluate``: features and accuracies of a pretrained encoder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from barlowtwins.data import DataError, ImageDataset, load_data
from barlowtwins.encoder import EncoderInfo, LinearHead
from barlowtwins.evaluation import bank_device, extract_features, knn_accuracy, linear_probe
from barlowtwins.evaluation.results import TRAINED, Accuracies, knn_protocols
from barlowtwins.runs.loader import fingerprint, load_trained_encoder, save_head

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def resolve_device(accelerator: str | None) -> torch.device:
    """The device an accelerator name asks for.

    Args:
        accelerator: ``auto`` (or None: CUDA when there is a GPU, else the CPU), ``cpu``,
            ``gpu`` or ``cuda`` (the first GPU), or ``cuda:N``.

    Raises:
        ValueError: For another name, or a GPU that this machine does not have.
    """
    name = (accelerator or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in ("gpu", "cuda") or not (index.isdigit() or index == ""):
        raise ValueError(
            f"accelerator must be one of {', '.join(ACCELERATORS)} or cuda:N, got {accelerator!r}"
        )
    number = int(index or 0)
    if number >= torch.cuda.device_count():
        raise ValueError(
            f"accelerator {accelerator} asks for a GPU, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", number)


def _load(spec: str, info: EncoderInfo, **data_options: Any) -> ImageDataset:
    return load_data(spec, image_size=info.image_size, channels=info.in_channels, **data_options)


def _features(
    backbone: torch.nn.Module,
    info: EncoderInfo,
    data: ImageDataset,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    return extract_features(
        backbone,
        data,
        batch_size=batch_size,
        device=device,
        mean=info.mean,
        std=info.std,
        image_size=info.image_size,
    )


def encode(
    checkpoint: str | Path,
    data: str,
    *,
    batch_size: int = 512,
    accelerator: str | None = None,
    **data_options: Any,
) -> tuple[torch.Tensor, ImageDataset]:
    """Backbone features (N x F, float32) of every image of ``data``, and the dataset.

    ``checkpoint`` is anything :func:`barlowtwins.runs.loader.load_trained_encoder` reads.
    """
    run = load_trained_encoder(checkpoint)
    backbone, info = run.encoder(), run.info
    target = resolve_device(accelerator)
    dataset = _load(data, info, **data_options)
    backbone.to(target).to(memory_format=torch.channels_last)
    return _features(backbone, info, dataset, batch_size, target), dataset


def evaluate_encoder(
    checkpoint: str | Path,
    train: str,
    test: str,
    *,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear: bool = False,
    linear_epochs: int = 100,
    save_linear_head: bool = False,
    batch_size: int = 512,
    accelerator: str | None = None,
    **data_options: Any,
) -> Accuracies:
    """kNN (and optionally linear-probe) test accuracy of a frozen pretrained encoder.

    Args:
        checkpoint: Anything :func:`barlowtwins.runs.loader.load_trained_encoder` reads.
        train: Labelled data the kNN bank and the probe are fitted on.
        test: Labelled data they are scored on.
        knn_k: Neighbours of the weighted kNN vote, scored beside the standard protocols
            (:data:`~barlowtwins.evaluation.results.STANDARD_KNN`).
        knn_temperature: Temperature of that vote.
        linear: Also train and score a linear probe.
        linear_epochs: Epochs of the probe.
        save_linear_head: Write the probe's classifier (``linear_head.safetensors``) and these
            results with their protocol (``evaluation.json``) into the run folder, for
            ``barlowtwins export --with-head``. Needs ``linear``.
        batch_size: Images per forward pass.
        accelerator: Where the encoder runs (:func:`resolve_device`; default: a GPU when
            there is one).
        **data_options: Passed to :func:`barlowtwins.data.load_data`.

    Returns:
        The accuracies, in the shape ``fit`` writes too.
    """
    run = load_trained_encoder(checkpoint)
    if save_linear_head and not linear:
        raise ValueError("--save-head saves the linear probe's head: add --linear")
    if save_linear_head and run.folder is None:
        raise ValueError(f"--save-head needs a run folder to save into; {checkpoint} is in none")
    backbone, info = run.encoder(), run.info
    target = resolve_device(accelerator)
    backbone.to(target).to(memory_format=torch.channels_last)
    train_data = _load(train, info, **data_options)
    test_data = _load(test, info, **{**data_options, "max_samples": None})
    for name, data in (("train", train_data), ("test", test_data)):
        if data.labels is None:
            raise DataError(f"--{name} data has no labels (use class subfolders)")
    assert train_data.labels is not None and test_data.labels is not None
    train_features = _features(backbone, info, train_data, batch_size, target)
    test_features = _features(backbone, info, test_data, batch_size, target)
    num_classes = int(max(train_data.labels.max(), test_data.labels.max())) + 1
    accuracies = Accuracies(
        train_images=len(train_data),
        test_images=len(test_data),
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        knn={
            protocol.label: {
                TRAINED: knn_accuracy(
                    train_features,
                    train_data.labels,
                    test_features,
                    test_data.labels,
                    num_classes=num_classes,
                    k=protocol.k,
                    temperature=protocol.temperature,
                    device=target,
                )
            }
            for protocol in knn_protocols(knn_k, knn_temperature)
        },
    )
    if linear:
        # The probe trains where its features fit.
        where = bank_device(train_features, target)
        probe = linear_probe(
            train_features.to(where),
            train_data.labels,
            test_features.to(where),
            test_data.labels,
            num_classes=num_classes,
            epochs=linear_epochs,
        )
        accuracies = replace(
            accuracies,
            linear_probe={TRAINED: probe.test_accuracy},
            linear_probe_epochs=linear_epochs,
        )
        if save_linear_head:
            assert run.folder is not None  # checked above, before the work
            head = LinearHead(
                weight=probe.classifier.weight.detach().cpu(),
                bias=probe.classifier.bias.detach().cpu(),
                classes=tuple(train_data.classes) if train_data.classes else None,
                backbone_sha256=fingerprint(run.backbone_state),
            )
            protocol = {
                "train": train,
                "test": test,
                "max_samples": data_options.get("max_samples"),
                "knn": {"k": knn_k, "temperature": knn_temperature, "similarity": "cosine"},
                "linear_probe": {
                    "epochs": linear_epochs,
                    "recipe": "barlowtwins.evaluation.linear_probe: one nn.Linear on frozen "
                    "features standardised with the training statistics, cross-entropy, AdamW "
                    "with cosine decay to 0",
                },
            }
            save_head(run.folder, head, {"results": accuracies.to_dict(), "protocol": protocol})
    return accuracies
