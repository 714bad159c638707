"""What an encoder learned from images alone: nearest neighbours and near-duplicate pairs.

Both read the same features once: the cosine similarity of L2-normalised backbone features, as
the kNN classifier of :mod:`barlowtwins.evaluation.probes` uses (InstDisc, Wu et al. 2018,
arXiv 1805.01978). Neighbours of a few queries show which images the encoder puts together;
pairs above a similarity threshold are the near-duplicates of a folder (the same photo
re-encoded, resized or lightly edited), in the spirit of SemDeDup (Abbas et al. 2023, arXiv
2303.09540), which finds duplicates by thresholding the cosine similarity of embeddings.

The similarity matrix is never held whole: rows are compared a block at a time, each block at
most ``_SIMILARITY_ELEMENTS`` values, and the pairs kept are bounded by ``max_pairs``, so memory
stays bounded for any number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from barlowtwins.evaluation.probes import bank_device

# Similarities held at once: 256 MiB of float32, as the kNN classifier's blocks.
_SIMILARITY_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Neighbours:
    """The nearest neighbours of some query images, most similar first.

    Attributes:
        queries: ``(Q,)`` indices of the query images.
        indices: ``(Q, k)`` indices of each query's neighbours (never the query itself).
        similarities: ``(Q, k)`` their cosine similarities to the query.
    """

    queries: Tensor
    indices: Tensor
    similarities: Tensor


@dataclass(frozen=True)
class DuplicatePairs:
    """Pairs of images whose features are at least ``threshold`` cosine-similar.

    Attributes:
        first: ``(P,)`` index of the pair's first image (the smaller index).
        second: ``(P,)`` index of its second image.
        similarities: ``(P,)`` cosine similarities, in decreasing order.
        groups: ``(P,)`` the group of each pair: pairs that share an image, directly or
            through other pairs, form one group (numbered from 0 by first appearance), so
            keeping one image per group removes every duplicate listed.
        threshold: The similarity a pair reaches to count.
        total: Pairs above the threshold in all; more than ``P`` when ``max_pairs`` cut the
            list to the most similar ones.
    """

    first: Tensor
    second: Tensor
    similarities: Tensor
    groups: Tensor
    threshold: float
    total: int


def _normalised(features: Tensor, device: torch.device) -> Tensor:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(
            f"features must be a non-empty 2-D (N, D) tensor; got {tuple(features.shape)}"
        )
    return F.normalize(features.to(device).float(), dim=1)


def nearest_neighbours(
    features: Tensor,
    queries: Tensor,
    *,
    k: int,
    device: str | torch.device | None = None,
) -> Neighbours:
    """The ``k`` most cosine-similar images of each query, the query itself left out.

    Args:
        features: ``(N, D)`` features of all images.
        queries: ``(Q,)`` indices into ``features``.
        k: Neighbours per query; at most ``N - 1``.
        device: Where to compute (default: where ``features`` are), as the kNN classifier
            (:func:`~barlowtwins.evaluation.probes.bank_device`).

    Returns:
        The neighbours, on the CPU.

    Raises:
        ValueError: On empty features, indices out of range or ``k`` outside ``[1, N - 1]``.
    """
    device = bank_device(features, device)
    bank = _normalised(features, device)
    count = bank.shape[0]
    if not 1 <= k <= count - 1:
        raise ValueError(f"k must lie in [1, {count - 1}] for {count} images; got {k}")
    queries = torch.as_tensor(queries, dtype=torch.int64).reshape(-1)
    if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= count):
        raise ValueError(f"query indices must lie in [0, {count - 1}]")
    rows = max(1, _SIMILARITY_ELEMENTS // count)
    indices, similarities = [], []
    for start in range(0, queries.numel(), rows):
        chosen = queries[start : start + rows].to(device)
        similarity = bank[chosen] @ bank.T
        # The query is its own most similar image; it is not its own neighbour.
        similarity[torch.arange(len(chosen), device=device), chosen] = -torch.inf
        values, found = similarity.topk(k, dim=1)
        indices.append(found.cpu())
        similarities.append(values.cpu())
    empty = torch.empty(0, k)
    return Neighbours(
        queries=queries.cpu(),
        indices=torch.cat(indices) if indices else empty.long(),
        similarities=torch.cat(similarities) if similarities else empty,
    )


def near_duplicates(
    features: Tensor,
    *,
    threshold: float,
    max_pairs: int = 10_000,
    device: str | torch.device | None = None,
) -> DuplicatePairs:
    """Every pair of images at least ``threshold`` cosine-similar, most similar first.

    Each pair is compared once (the upper triangle of the similarity matrix, block by block);
    when more than ``max_pairs`` pairs pass, the most similar ``max_pairs`` are kept and
    :attr:`DuplicatePairs.total` still counts them all.

    Args:
        features: ``(N, D)`` features of all images.
        threshold: The cosine similarity in ``(-1, 1]`` a pair must reach.
        max_pairs: The most pairs returned.
        device: Where to compute, as for :func:`nearest_neighbours`.

    Returns:
        The pairs, on the CPU.

    Raises:
        ValueError: On empty features, a threshold outside ``(-1, 1]`` or ``max_pairs < 1``.
    """
    if not -1.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (-1, 1]; got {threshold}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1; got {max_pairs}")
    device = bank_device(features, device)
    bank = _normalised(features, device)
    count = bank.shape[0]
    rows = max(1, _SIMILARITY_ELEMENTS // count)
    first = second = torch.empty(0, dtype=torch.long)
    values = torch.empty(0)
    total = 0
    for start in range(0, count, rows):
        block = bank[start : start + rows] @ bank[start:].T
        # Column j of the block is image start + j; keeping j > i counts each pair once and
        # leaves out an image's pair with itself.
        hits = (block >= threshold).triu_(diagonal=1)
        found = int(hits.sum())
        if found == 0:
            continue
        total += found
        if found > max_pairs:
            # Only the block's most similar max_pairs can be among the ones returned.
            best, flat = block.masked_fill_(~hits, -torch.inf).flatten().topk(max_pairs)
            row, column = flat // block.shape[1], flat % block.shape[1]
        else:
            row, column = torch.nonzero(hits, as_tuple=True)
            best = block[row, column]
        first = torch.cat((first, (row + start).cpu()))
        second = torch.cat((second, (column + start).cpu()))
        values = torch.cat((values, best.float().cpu()))
        if values.numel() > 2 * max_pairs:  # prune now and then: memory stays bounded
            first, second, values = _most_similar(first, second, values, max_pairs)
    first, second, values = _most_similar(first, second, values, max_pairs)
    return DuplicatePairs(
        first=first,
        second=second,
        similarities=values,
        groups=_groups(first, second),
        threshold=float(threshold),
        total=total,
    )


def _most_similar(
    first: Tensor, second: Tensor, values: Tensor, limit: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``limit`` most similar pairs, in decreasing similarity (ties by index)."""
    # A stable sort on (first, second) order, then by similarity: ties keep index order.
    order = torch.from_numpy(
        np.lexsort((second.numpy(), first.numpy(), -values.double().numpy())).copy()
    )[:limit]
    return first[order], second[order], values[order]


def _groups(first: Tensor, second: Tensor) -> Tensor:
    """Connected components of the pairs (union-find), numbered by first appearance."""
    parent: dict[int, int] = {}

    def root(image: int) -> int:
        parent.setdefault(image, image)
        while parent[image] != image:
            parent[image] = parent[parent[image]]  # path halving
            image = parent[image]
        return image

    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        parent[root(a)] = root(b)
    numbers: dict[int, int] = {}
    return torch.tensor(
        [numbers.setdefault(root(a), len(numbers)) for a in first.tolist()], dtype=torch.long
    )


def thumbnail(image: Tensor, size: Tensor | tuple[int, int] | None = None) -> np.ndarray:
    """A dataset canvas back at its source's aspect ratio, as an array to draw.

    A dataset item holds the whole source image stretched to a square canvas and the source's
    ``(height, width)`` (:class:`barlowtwins.data.ImageDataset`); this resizes the canvas to
    that aspect ratio, its longer side the canvas side (bilinear, antialiased), so a picture
    shows the image as it is, not stretched.

    Args:
        image: uint8 ``(C, S, S)`` canvas.
        size: The source's ``(height, width)``; ``None`` for a square source.

    Returns:
        uint8 ``(h, w, 3)`` array for RGB, ``(h, w)`` for greyscale, with ``max(h, w) == S``.
    """
    channels, side = image.shape[0], image.shape[-1]
    height, width = (side, side) if size is None else (int(size[0]), int(size[1]))
    scale = side / max(height, width)
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if target != tuple(image.shape[-2:]):
        resized = F.interpolate(
            image[None].float(), size=target, mode="bilinear", antialias=True, align_corners=False
        )
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    array: np.ndarray = image.permute(1, 2, 0).numpy()
    return array if channels == 3 else array[..., 0]


__all__ = [
    "DuplicatePairs",
    "Neighbours",
    "near_duplicates",
    "nearest_neighbours",
    "thumbnail",
]
