"""Numbers that tell whether Barlow Twins training is working; torch only.

The Barlow Twins loss (Zbontar et al. 2021, arXiv 2103.03230, Eq. 1) is the sum of two terms
of the cross-correlation matrix ``c`` of the two views' batch-standardised embeddings::

    invariance = sum_i (1 - c_ii)^2          (on the diagonal)
    redundancy = sum_{i != j} c_ij^2         (off the diagonal, before the weight lambda)
    loss       = invariance + lambda * redundancy

Both grow with the embedding size ``D``, so the raw loss of one run cannot be compared with
another's: ``loss / D`` can. When the two views' features are independent (no invariance learnt
yet, no redundancy), which is roughly where training starts, the terms are about
``D (1 + 1 / (N - 1))`` and ``D (D - 1) / (N - 1)`` for a batch of ``N``: about ``D`` for the
loss (``docs/is_it_working.md`` derives them and compares with measured runs).

Two signs of collapse:

* :func:`embedding_std`, the mean per-feature standard deviation of l2-normalised embeddings
  (the collapse indicator of SimSiam, Chen & He 2021, arXiv 2011.10566, Sec. 4.1):
  ``1 / sqrt(D)`` when the embeddings spread over the sphere, 0 when every input maps to the
  same direction.
* :func:`effective_rank` of the backbone features of a batch (Roy & Vetterli 2007, "The
  effective rank: a measure of effective dimensionality", EUSIPCO; used for self-supervised
  features as "RankMe" by Garrido et al. 2023, arXiv 2210.02885): how many directions the
  features really use, from 1 (all features on a line) to ``min(N, F)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Entropy of singular-value distributions: 0 log 0 is 0; the offset keeps log finite.
_LOG_EPS = 1e-12


@dataclass(frozen=True)
class LossTerms:
    """The two terms of one Barlow Twins loss value (detached scalars).

    Attributes:
        invariance: ``sum_i (1 - c_ii)^2``, the on-diagonal term.
        redundancy: ``sum_{i != j} c_ij^2``, the off-diagonal term before ``lambda_param``.
        lambda_param: The weight of the redundancy term in the loss.
        num_features: ``D``, the size of the embeddings.
    """

    invariance: Tensor
    redundancy: Tensor
    lambda_param: float
    num_features: int

    @property
    def weighted_redundancy(self) -> Tensor:
        """``lambda_param * redundancy``, the off-diagonal term as it enters the loss."""
        return self.lambda_param * self.redundancy

    @property
    def loss(self) -> Tensor:
        """The loss these terms add up to."""
        return self.invariance + self.weighted_redundancy

    @property
    def loss_per_feature(self) -> Tensor:
        """``loss / D``: comparable across projector sizes (about 1 at initialisation)."""
        return self.loss / self.num_features


def loss_terms(criterion: torch.nn.Module, num_features: int) -> LossTerms:
    """The terms of the last loss that ``criterion`` (a ``BarlowTwinsLoss``) computed.

    They are the values the loss itself summed (its ``last_terms``), not a second evaluation.

    Raises:
        ValueError: If the criterion has computed no loss yet.
    """
    terms = getattr(criterion, "last_terms", None)
    if terms is None:
        raise ValueError("the criterion has not computed a loss yet (no last_terms)")
    invariance, redundancy = terms
    lambda_param = float(getattr(criterion, "lambda_param"))  # noqa: B009 (a loss's float)
    return LossTerms(invariance, redundancy, lambda_param, num_features)


def embedding_std(embeddings: Tensor) -> Tensor:
    """Mean over features of the batch standard deviation of l2-normalised embeddings.

    SimSiam's collapse indicator (Chen & He 2021, arXiv 2011.10566, Sec. 4.1): for embeddings
    spread like an isotropic Gaussian it is ``1 / sqrt(D)``; it falls to 0 when the network
    maps every input to the same direction. Multiply by ``sqrt(D)`` to compare across sizes.

    Args:
        embeddings: ``(N, D)`` projector outputs (any float dtype; computed in float32).

    Returns:
        A 0-d float32 tensor on the embeddings' device.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be (N >= 2, D), got shape {tuple(embeddings.shape)}")
    normalised = F.normalize(embeddings.detach().float(), dim=1)
    return normalised.std(dim=0).mean()


def effective_rank(features: Tensor, *, centre: bool = True) -> float:
    """Entropy effective rank of a batch of features (Roy & Vetterli 2007).

    With ``sigma`` the singular values of the ``(N, F)`` feature matrix and
    ``p_k = sigma_k / sum(sigma)``, the effective rank is ``exp(-sum_k p_k log p_k)``: ``r``
    for ``r`` equal non-zero singular values, between 1 and ``min(N, F)``. Centring first
    (the default) measures how many directions the features *vary* in; without it, the mean
    of non-negative (post-ReLU) features takes one direction of its own (RankMe, Garrido et
    al. 2023, does not centre).

    Args:
        features: ``(N, F)`` backbone features, ``N >= 2``.
        centre: Subtract the batch mean of each feature first.

    Returns:
        The effective rank (computed in float64); 0.0 for an all-zero matrix.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got shape {tuple(features.shape)}")
    x = features.detach().double()
    if centre:
        x = x - x.mean(dim=0)
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    entropy = -(p * torch.log(p + _LOG_EPS)).sum()
    return float(math.exp(float(entropy)))


# Column names of the health metrics in metrics.csv and TensorBoard.
INVARIANCE = "train_invariance"
REDUNDANCY = "train_redundancy"
WEIGHTED_REDUNDANCY = "train_redundancy_weighted"
LOSS_PER_FEATURE = "train_loss_per_feature"
EMBEDDING_STD = "train_embedding_std"
EFFECTIVE_RANK = "effective_rank"


def step_metrics(terms: LossTerms, embeddings: Tensor) -> dict[str, Tensor]:
    """The per-step health metrics of one loss evaluation, keyed by their logged names."""
    return {
        INVARIANCE: terms.invariance,
        REDUNDANCY: terms.redundancy,
        WEIGHTED_REDUNDANCY: terms.weighted_redundancy,
        LOSS_PER_FEATURE: terms.loss_per_feature,
        EMBEDDING_STD: embedding_std(embeddings),
    }


# Thresholds of :func:`diagnose`, each far from what healthy runs show (docs/is_it_working.md
# gives the measured values). Stalled: after STALL_MIN_STEPS steps, the epoch's invariance term
# is above 90 % of its mean over the run's first INITIAL_STEPS steps (healthy: below 40 % by
# step 20). Redundant: off-diagonal correlations average c_ij^2 > 0.3 (healthy runs measured:
# at most 0.1; lambda = 0 runs: 0.35-0.95). Low rank: the held-out effective rank is below a
# quarter of the random-init network's, or below 2. Narrow: the embeddings' spread is a tenth
# of 1/sqrt(D).
INITIAL_STEPS = 5
STALL_MIN_STEPS = 20
STALLED_INVARIANCE_RATIO = 0.9
REDUNDANT_MEAN_SQUARED_CORRELATION = 0.3
LOW_RANK_RATIO = 0.25
LOW_RANK = 2.0
NARROW_STD_RATIO = 0.1


@dataclass(frozen=True)
class EpochHealth:
    """What :func:`diagnose` judges at the end of an epoch (plain floats).

    Attributes:
        num_features: ``D``.
        lambda_param: Weight of the redundancy term.
        steps: Optimiser steps the run has made so far.
        initial_invariance: Mean invariance term of the run's first ``INITIAL_STEPS`` steps,
            or ``None`` if unknown.
        invariance: Mean invariance term over the epoch's steps.
        redundancy: Mean (unweighted) redundancy term over the epoch's steps.
        embedding_std: Mean :func:`embedding_std` over the epoch's steps.
        effective_rank: Of the held-out backbone features at the epoch's end, or ``None``.
        initial_effective_rank: The same at the start of training, or ``None``.
    """

    num_features: int
    lambda_param: float
    steps: int
    initial_invariance: float | None
    invariance: float
    redundancy: float
    embedding_std: float
    effective_rank: float | None = None
    initial_effective_rank: float | None = None


@dataclass(frozen=True)
class Problem:
    """One sign of trouble: a short ``kind`` (stalled, redundant, low_rank, narrow) and a
    sentence with the numbers and what to try."""

    kind: str
    message: str


def diagnose(health: EpochHealth) -> list[Problem]:
    """Signs that a run has collapsed or stalled, each with what to try; empty when healthy.

    Args:
        health: The epoch's numbers.

    Returns:
        The problems found.
    """
    problems = []
    d = health.num_features
    if (
        health.initial_invariance is not None
        and health.steps >= STALL_MIN_STEPS
        and health.invariance > STALLED_INVARIANCE_RATIO * health.initial_invariance
    ):
        problems.append(
            Problem(
                "stalled",
                f"stalled: the invariance (on-diagonal) term is {health.invariance / d:.3f} D "
                f"after {health.steps} steps, "
                f"{health.invariance / health.initial_invariance:.0%} of its "
                f"{health.initial_invariance / d:.3f} D at the start, so the two views' "
                "embeddings are not becoming correlated; raise the learning rate, and check "
                "that the images differ from each other and that the augmentations keep them "
                "recognisable",
            )
        )
    pairs = d * (d - 1)
    mean_square = health.redundancy / pairs if pairs else 0.0
    if mean_square > REDUNDANT_MEAN_SQUARED_CORRELATION:
        problems.append(
            Problem(
                "redundant",
                "collapsed: the embedding features are copies of each other (mean squared "
                f"off-diagonal correlation {mean_square:.2f}, healthy runs stay below 0.1); "
                f"raise lambda_param (now {health.lambda_param:g}) or lower the learning rate",
            )
        )
    if health.effective_rank is not None:
        reference = health.initial_effective_rank
        low_against_init = reference is not None and (
            health.effective_rank < LOW_RANK_RATIO * reference
        )
        if health.effective_rank < LOW_RANK or low_against_init:
            at_init = f" (random init: {reference:.1f})" if reference is not None else ""
            problems.append(
                Problem(
                    "low_rank",
                    "collapsed: the backbone features of held-out images have an effective "
                    f"rank of {health.effective_rank:.1f}{at_init}; lower the learning rate, "
                    "raise lambda_param, and check that the images are not all alike",
                )
            )
    ratio = health.embedding_std * math.sqrt(d)
    if ratio < NARROW_STD_RATIO:
        problems.append(
            Problem(
                "narrow",
                f"collapsed: l2-normalised embeddings vary by {ratio:.3f}/sqrt(D) across the "
                "batch (healthy: about 1/sqrt(D)), so every image maps to nearly the same "
                "direction; lower the learning rate and check the data",
            )
        )
    return problems
