"""Tests for barlowtwins.evaluation: feature extraction, weighted kNN, linear probe."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from barlowtwins.evaluation import (
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    raw_pixel_features,
)
from conftest import ImageFolderFactory

_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _gaussian_mixture(
    num_classes: int, per_class: int, dim: int, spread: float, seed: int
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 10
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def _brute_force_knn(
    train: Tensor, labels: Tensor, test: Tensor, num_classes: int, k: int, temperature: float
) -> list[int]:
    """One test sample at a time, written with plain Python loops as an independent reference."""
    predictions = []
    for query in test.tolist():
        query_norm = math.sqrt(sum(q * q for q in query))
        similarities = []
        for row, label in zip(train.tolist(), labels.tolist(), strict=True):
            row_norm = math.sqrt(sum(r * r for r in row))
            dot = sum(q * r for q, r in zip(query, row, strict=True))
            similarities.append((dot / (query_norm * row_norm), label))
        similarities.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for similarity, label in similarities[: min(k, len(similarities))]:
            votes[label] += math.exp(similarity / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


def test_knn_separates_gaussian_mixture() -> None:
    train, train_labels = _gaussian_mixture(5, 100, 16, spread=1.0, seed=0)
    test, test_labels = _gaussian_mixture(5, 40, 16, spread=1.0, seed=0)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, num_classes=5, k=20)
    assert accuracy >= 99.0


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (7, 0.1), (7, 0.5), (60, 0.07)])
def test_knn_matches_brute_force_reference(k: int, temperature: float) -> None:
    # Overlapping classes so that neighbours disagree and the weighting decides.
    train, train_labels = _gaussian_mixture(4, 10, 5, spread=12.0, seed=1)
    test, _ = _gaussian_mixture(4, 6, 5, spread=12.0, seed=2)
    expected = _brute_force_knn(train, train_labels, test, 4, k, temperature)
    predicted = knn_predict(train, train_labels, test, num_classes=4, k=k, temperature=temperature)
    assert predicted.dtype == torch.long
    assert predicted.tolist() == expected


def test_knn_chunking_does_not_change_predictions() -> None:
    train, train_labels = _gaussian_mixture(6, 50, 8, spread=8.0, seed=3)
    test, _ = _gaussian_mixture(6, 17, 8, spread=8.0, seed=4)
    small = knn_predict(train, train_labels, test, num_classes=6, k=25, chunk_size=3)
    large = knn_predict(train, train_labels, test, num_classes=6, k=25, chunk_size=1024)
    assert torch.equal(small, large)


def test_knn_temperature_weighting_matters() -> None:
    # One very close class-0 neighbour against two farther class-1 neighbours: a sharp
    # temperature lets the close one win, a flat one turns it into a 2-to-1 majority vote.
    angle = math.acos(0.99)
    train = torch.tensor(
        [[math.cos(angle), math.sin(angle)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]]
    )
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    sharp = knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.1)
    flat = knn_predict(train, labels, test, num_classes=2, k=3, temperature=100.0)
    assert sharp.tolist() == [0]
    assert flat.tolist() == [1]


def test_knn_clamps_k_to_train_size() -> None:
    train, train_labels = _gaussian_mixture(3, 4, 6, spread=10.0, seed=5)
    test, _ = _gaussian_mixture(3, 5, 6, spread=10.0, seed=6)
    clamped = knn_predict(train, train_labels, test, num_classes=3, k=1000)
    exact = knn_predict(train, train_labels, test, num_classes=3, k=len(train))
    assert torch.equal(clamped, exact)
    assert clamped.tolist() == _brute_force_knn(train, train_labels, test, 3, 12, 0.1)


def test_knn_rejects_bad_input() -> None:
    train, labels = _gaussian_mixture(2, 5, 4, spread=1.0, seed=0)
    with pytest.raises(ValueError, match="must match"):
        knn_predict(train, labels[:-1], train, num_classes=2)
    with pytest.raises(ValueError, match="non-empty"):
        knn_predict(train, labels, train[:0], num_classes=2)
    with pytest.raises(ValueError, match="must lie in"):
        knn_predict(train, labels + 1, train, num_classes=2)
    with pytest.raises(ValueError, match="share their dimension"):
        knn_predict(train, labels, train[:, :2], num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        knn_predict(train, labels.float(), train, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, train, num_classes=2, temperature=0.0)
    with pytest.raises(ValueError, match="must lie in"):
        knn_accuracy(train, labels, train, labels - 1, num_classes=2)


def _linearly_separable(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Three classes split by a random linear map, keeping only points with a clear margin."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(20, 3, generator=generator)
    features = torch.randn(3000, 20, generator=generator)
    scores = features @ weights
    top_two = scores.topk(2, dim=1).values
    keep = (top_two[:, 0] - top_two[:, 1]) > 1.0
    features, labels = features[keep][:900], scores[keep][:900].argmax(dim=1)
    features = features * 3 + 5  # off-centre and scaled, so standardisation has work to do
    return features[:600], labels[:600], features[600:], labels[600:]


def test_linear_probe_separates_and_is_deterministic() -> None:
    train, train_labels, test, test_labels = _linearly_separable(seed=0)
    rng_state = torch.random.get_rng_state()
    first = linear_probe(
        train, train_labels, test, test_labels, num_classes=3, epochs=20, batch_size=64
    )
    second = linear_probe(
        train, train_labels, test, test_labels, num_classes=3, epochs=20, batch_size=64
    )
    assert first.test_accuracy > 95.0
    assert first.train_accuracy > 95.0
    assert first.test_accuracy == second.test_accuracy
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_linear_probe_classifier_applies_to_raw_features() -> None:
    train, train_labels, test, test_labels = _linearly_separable(seed=1)
    result = linear_probe(
        train, train_labels, test, test_labels, num_classes=3, epochs=10, batch_size=64
    )
    with torch.no_grad():
        predictions = result.classifier(test).argmax(dim=1)
    accuracy = 100.0 * (predictions == test_labels).float().mean().item()
    assert accuracy == pytest.approx(result.test_accuracy, abs=0.5)


def test_linear_probe_rejects_bad_input() -> None:
    train, train_labels, test, test_labels = _linearly_separable(seed=0)
    with pytest.raises(ValueError, match="must match"):
        linear_probe(train, train_labels, test, test_labels[:5], num_classes=3)
    with pytest.raises(ValueError, match="must lie in"):
        linear_probe(train, train_labels, test, test_labels, num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(train, train_labels, test, test_labels, num_classes=3, epochs=0)


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # BatchNorm makes train-mode outputs depend on the batch, which exposes a missing eval().
        self.layers = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _TripletDataset(Dataset):
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], index % 2, index


_MEAN = (0.5, 0.4, 0.3)
_STD = (0.2, 0.25, 0.3)


def _images(count: int, size: int = 12) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_extract_features_normalises_exactly() -> None:
    images = _images(5)
    features = extract_features(nn.Flatten(), images, batch_size=2, mean=_MEAN, std=_STD)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    expected = ((images.float() / 255 - mean) / std).flatten(1)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected)


def test_extract_features_eval_mode_batching_and_dataset() -> None:
    torch.manual_seed(0)
    net = _SmallNet()
    net.train()
    images = _images(10)
    whole = extract_features(net, images, batch_size=512, mean=_MEAN, std=_STD)
    batched = extract_features(net, images, batch_size=3, mean=_MEAN, std=_STD)
    from_dataset = extract_features(
        net, _TripletDataset(images), batch_size=4, mean=_MEAN, std=_STD
    )
    assert whole.shape == (10, 16)
    assert net.training
    torch.testing.assert_close(batched, whole)
    torch.testing.assert_close(from_dataset, whole)
    net.eval()
    extract_features(net, images, mean=_MEAN, std=_STD)
    assert not net.training


def test_extract_features_resizes_and_bf16_returns_float32() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    images = _images(6, size=20)
    fp32 = extract_features(net, images, mean=_MEAN, std=_STD, image_size=8)
    bf16 = extract_features(net, images, mean=_MEAN, std=_STD, image_size=8, precision="bf16")
    assert fp32.shape == bf16.shape == (6, 5)
    assert bf16.dtype == torch.float32
    assert bf16.device.type == "cpu"
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def test_extract_features_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        extract_features(nn.Flatten(), _images(2).float(), mean=_MEAN, std=_STD)
    with pytest.raises(ValueError, match="empty"):
        extract_features(nn.Flatten(), _images(2)[:0], mean=_MEAN, std=_STD)
    with pytest.raises(ValueError, match="channels"):
        extract_features(nn.Flatten(), _images(2), mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="precision"):
        extract_features(nn.Flatten(), _images(2), mean=_MEAN, std=_STD, precision="16")


def test_raw_pixel_features() -> None:
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    features = raw_pixel_features(images)
    torch.testing.assert_close(features, torch.tensor([[0.0, 1.0, 0.2, 0.4]]))
    with pytest.raises(ValueError, match="uint8"):
        raw_pixel_features(images.float())


def _read_idx(path: Path, header: int, count: int, item_bytes: int) -> np.ndarray:
    with gzip.open(path) as handle:
        data = handle.read(header + count * item_bytes)
    return np.frombuffer(data, dtype=np.uint8, offset=header)


@pytest.mark.skipif(not _FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_raw_pixel_knn_on_fashion_mnist() -> None:
    def load(split: str, count: int) -> tuple[Tensor, Tensor]:
        images = _read_idx(_FASHION_MNIST / f"{split}-images-idx3-ubyte.gz", 16, count, 784)
        labels = _read_idx(_FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz", 8, count, 1)
        images_t = torch.from_numpy(images.reshape(count, 1, 28, 28).copy())
        return images_t, torch.from_numpy(labels.astype(np.int64))

    train_images, train_labels = load("train", 2000)
    test_images, test_labels = load("t10k", 500)
    accuracy = knn_accuracy(
        raw_pixel_features(train_images),
        train_labels,
        raw_pixel_features(test_images),
        test_labels,
        num_classes=10,
        k=20,  # 200 neighbours would be a whole class of this 2,000-sample subset
    )
    assert accuracy > 70.0


def test_features_of_a_folder_decoded_per_item_come_through_dataloader_workers(
    image_folder: ImageFolderFactory,
) -> None:
    from barlowtwins.data import LazyImageFolder, load_image_folder

    folder = image_folder(count=10, size=(12, 12))
    lazy = load_image_folder(folder, image_size=8, cache_limit_bytes=0)
    cached = load_image_folder(folder, image_size=8)
    assert isinstance(lazy, LazyImageFolder)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    options = {"batch_size": 3, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    expected = extract_features(backbone, cached, **options)
    assert torch.equal(extract_features(backbone, lazy, num_workers=2, **options), expected)
