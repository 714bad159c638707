"""Barlow Twins as a LightningModule: augmentation on the device, exact DDP, online kNN."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import ResNet

from barlowtwins.evaluation import knn_accuracy
from barlowtwins.health import loss_terms, step_metrics
from barlowtwins.hparams import Hyperparameters
from barlowtwins.loss import BarlowTwinsLoss, NonFiniteLossError, multi_view_loss
from barlowtwins.mixed_loss import MixedBarlowTwinsLoss, MixUp
from barlowtwins.model import BarlowTwins
from barlowtwins.nn.convolution import use_small_output_convolutions
from barlowtwins.nn.whitening import first_convolution, whiten_convolution_
from barlowtwins.optim import build_optimizer, build_warmup_cosine_scheduler
from barlowtwins.seeding import derived_seed
from barlowtwins.training.callbacks import TrainingClock, TrainingHealth
from barlowtwins.views.batched import BatchedBarlowTwinsAugment
from barlowtwins.views.eval_view import prepare_images
from barlowtwins.views.view_config import (
    barlow_twins_views,
    resolve_normalization,
)

# Validation dataloaders of the online kNN monitor, in this order.
KNN_BANK, KNN_QUERY = 0, 1
# What the kNN monitor logs besides its accuracy: how many images voted and were classified.
KNN_BANK_IMAGES, KNN_QUERY_IMAGES = "knn_bank_images", "knn_query_images"


def view_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the augmentation of training step ``step`` on global rank ``rank``.

    Every (seed, rank, step) has its own stream (:func:`~barlowtwins.seeding.derived_seed`):
    two ranks draw independent crops, flips and jitters, as one process does for every sample
    of the global batch; a rerun with the same seed draws the same views; and a resumed run
    continues each rank's stream from the step its checkpoint restores.
    """
    return derived_seed(seed, "views", rank, step)


class BarlowTwinsModule(L.LightningModule):
    """Barlow Twins pretraining (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230).

    Batches are uint8 images ``(B, C, H, W)`` with labels and indices; both augmented views
    are made on the training device (:class:`BatchedBarlowTwinsAugment`), so data loading
    stays cheap. Each process draws its views from its own stream, seeded by ``seed``, its
    global rank and the step (:func:`view_seed`). With ``gather_distributed`` the loss uses
    the global batch of all processes, exactly (see :class:`BarlowTwinsLoss`); pair it with
    :class:`barlowtwins.training.callbacks.GlobalBatchNormSync` for the batch norms.

    With two validation dataloaders (a labelled sample of the training data, then the test
    data) it logs the weighted-kNN accuracy ``val_knn_acc`` of the backbone features, with
    the number of bank and query images (``knn_bank_images``, ``knn_query_images``). Under
    DDP the features of all ranks are gathered and the samples that the distributed sampler
    repeated to even out the shards are dropped, so the monitor scores exactly the images one
    process would.

    The hyperparameters come as one :class:`~barlowtwins.hparams.Hyperparameters` (by default
    the paper's: the ``paper`` recipe of :mod:`barlowtwins.app.recipes`); ``barlowtwins fit``
    passes a recipe's. The checkpoint stores them with the module's own arguments
    (``save_hyperparameters``), so ``BarlowTwinsModule.load_from_checkpoint`` rebuilds it.

    Every step also logs the loss's two terms, the loss per feature and the spread of the
    embeddings (:func:`barlowtwins.health.step_metrics`); the
    :class:`~barlowtwins.training.callbacks.TrainingHealth` callback it brings along logs the
    effective rank of held-out features per epoch and warns once if the run looks collapsed
    or stalled; :class:`~barlowtwins.training.callbacks.TrainingClock` logs the minutes of
    training per epoch.

    Args:
        hparams: The method's hyperparameters, resolved (no ``"auto"``), or their
            :meth:`~barlowtwins.hparams.Hyperparameters.to_dict` (default: the paper's).
            Among them: ``batch_size`` is the global batch over all processes (the paper's
            2048), which sets the learning rate (``base x batch_size / 256``); each of W
            processes must be fed ``batch_size / W`` images a step, as
            :class:`~barlowtwins.training.datamodule.BarlowTwinsDataModule` does.
            ``mix_weight`` > 0 trains Mixed Barlow Twins (Bandara et al. 2023, arXiv
            2312.02151; :class:`~barlowtwins.mixed_loss.MixedBarlowTwinsLoss`), each step then
            also embedding a mixup of the two views. ``num_views`` > 2 takes the mean loss over
            every pair (:func:`~barlowtwins.loss.multi_view_loss`), the views alternating
            between the paper's first and second.
        in_channels: Image channels (1 or 3).
        seed: Seed of the views (one stream per rank and step, :func:`view_seed`) and of
            Mixed Barlow Twins' mixup (one stream per step, shared by the ranks).
        mean: Normalisation mean per channel (default: ImageNet / grey).
        std: Normalisation std per channel.
        gather_distributed: Global-batch loss across processes.
        channels_last: Use the channels-last memory format (faster convolutions).
        cpu_convolutions: When training on a CPU, give a torchvision backbone the faster
            weight gradient of :class:`~barlowtwins.nn.convolution.SmallOutputConv2d`.
        knn_k: Neighbours of the kNN monitor.
        knn_temperature: Temperature of the kNN votes.

    Raises:
        ValueError: If a hyperparameter is still ``"auto"``.
    """

    def __init__(
        self,
        hparams: Hyperparameters | Mapping[str, Any] | None = None,
        *,
        in_channels: int = 3,
        seed: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        gather_distributed: bool = True,
        channels_last: bool = True,
        cpu_convolutions: bool = True,
        knn_k: int = 200,
        knn_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if hparams is None:
            method = Hyperparameters()
        elif isinstance(hparams, Hyperparameters):
            method = hparams
        else:
            method = Hyperparameters.from_dict(hparams)
        # The precision is the Trainer's to run; everything else shapes the model or its views.
        unresolved = [name for name in method.unresolved() if name != "precision"]
        if unresolved:
            raise ValueError(f"resolve the hyperparameters first: {unresolved} are auto")
        #: The method's hyperparameters (Lightning's ``hparams`` is their plain, saved form).
        self.hyperparameters = method
        self.in_channels, self.seed = in_channels, seed
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self.cpu_convolutions = cpu_convolutions
        # Plain values only: a checkpoint must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "hparams": method.to_dict(),
                "in_channels": in_channels,
                "seed": seed,
                "mean": mean,
                "std": std,
                "gather_distributed": gather_distributed,
                "channels_last": channels_last,
                "cpu_convolutions": cpu_convolutions,
                "knn_k": knn_k,
                "knn_temperature": knn_temperature,
            }
        )
        self.model = BarlowTwins.from_name(
            method.backbone,
            in_channels=in_channels,
            small_image=bool(method.small_image),
            projector_dims=method.projector_dims,
            zero_init_residual=method.zero_init_residual,
            dirac_init=method.dirac_init,
        )
        if method.whiten_stem:
            # Frozen before the optimiser and DDP see the parameters; set at the first step.
            first_convolution(self.backbone).weight.requires_grad_(False)
        self.mean, self.std = resolve_normalization(in_channels, mean, std)
        image_size = int(method.image_size)
        view_a, view_b = barlow_twins_views(
            image_size,
            in_channels,
            crop_scale=method.crop_scale,
            translate=method.translate,
            erase_prob=method.erase_prob,
            solarize_prob=method.solarize_prob,
            hflip_prob=method.hflip_prob,
        )
        self.augment = BatchedBarlowTwinsAugment(
            image_size, in_channels, view_a, view_b, mean=self.mean, std=self.std
        )
        self.criterion = BarlowTwinsLoss(
            method.lambda_param, gather_distributed=gather_distributed, scale_loss=method.scale_loss
        )
        self.mixup: MixUp | None = None
        self.mixed_criterion: MixedBarlowTwinsLoss | None = None
        if method.mix_weight > 0:
            self.mixup = MixUp(seed, gather_distributed)
            self.mixed_criterion = MixedBarlowTwinsLoss(
                method.lambda_param,
                mix_weight=method.mix_weight,
                gather_distributed=gather_distributed,
                scale_loss=method.scale_loss,
            )
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._knn_batches: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {
            KNN_BANK: [],
            KNN_QUERY: [],
        }
        # One generator per device, re-seeded every step (view_seed): no state to checkpoint.
        self._view_generators: dict[torch.device, torch.Generator] = {}
        #: The class of the batch norms that trained (SyncBatchNorm, GlobalBatchNorm, or the
        #: backbone's own without synchronisation), known once training has started.
        self.batch_norm_class: str | None = None

    @property
    def _view_size(self) -> int:
        return int(self.hyperparameters.image_size)

    @property
    def backbone(self) -> nn.Module:
        """The encoder kept after pretraining."""
        return self.model.backbone

    def setup(self, stage: str) -> None:
        self.prepare_for(self.trainer.strategy.root_device)

    def prepare_for(self, device: torch.device) -> None:
        """Put the model in the memory format and convolutions that train fastest on ``device``.

        Channels-last everywhere; on a CPU, a torchvision backbone also gets the faster weight
        gradient of :class:`~barlowtwins.nn.convolution.SmallOutputConv2d` (with
        ``cpu_convolutions``). Lightning calls it with the strategy's root device.
        """
        self.model.to(memory_format=self._memory_format)
        if (
            torch.device(device).type == "cpu"
            and self.cpu_convolutions
            and isinstance(self.backbone, ResNet)
        ):
            use_small_output_convolutions(self.backbone)

    def on_train_start(self) -> None:
        self.batch_norm_class = next(
            (type(m).__name__ for m in self.model.modules() if isinstance(m, _BatchNorm)), None
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, indices, sizes = batch
        if self._trainer is not None and self.trainer.training:
            # Augmenting here runs on the device, outside autocast: the views are float32.
            views = self.make_views(images, self._view_generator(images.device), sizes)
        else:
            views = [prepare_images(images, self.mean, self.std, self._view_size, sizes)]
        return [v.contiguous(memory_format=self._memory_format) for v in views], labels, indices

    def _view_generator(self, device: torch.device) -> torch.Generator:
        """This rank's generator for the current step's views, seeded by :func:`view_seed`."""
        generator = self._view_generators.get(device)
        if generator is None:
            generator = self._view_generators[device] = torch.Generator(device)
        return generator.manual_seed(view_seed(self.seed, self.global_rank, self.global_step))

    def make_views(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        sizes: Tensor | None = None,
    ) -> list[Tensor]:
        """The ``num_views`` augmented views of a batch: view A, view B, view A, ...

        ``sizes`` are the samples' source sizes (see
        :class:`~barlowtwins.views.batched.BatchedBarlowTwinsAugment`).
        """
        pairs = math.ceil(self.hyperparameters.num_views / 2)
        views = [view for _ in range(pairs) for view in self.augment(images, generator, sizes)]
        return views[: self.hyperparameters.num_views]

    @property
    def batches_per_step(self) -> int:
        """How many batches a training step embeds (the views, and any mixed batch)."""
        return self.hyperparameters.num_views + (0 if self.mixup is None else 1)

    def step_loss(self, views: Sequence[Tensor], step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The training loss of one step's views.

        Returns:
            The loss, the first view's embeddings, and Mixed Barlow Twins' regulariser term
            (None for plain Barlow Twins).
        """
        embeddings = [self.model(view) for view in views]
        if self.mixup is None:
            return multi_view_loss(self.criterion, embeddings), embeddings[0], None
        # Mixed Barlow Twins: the same step number gives every rank the same permutation.
        z_a, z_b = embeddings
        view_a, view_b = views
        mixed = self.mixup(view_a, view_b, step=step)
        z_mixed = self.model(mixed.images.contiguous(memory_format=self._memory_format))
        assert self.mixed_criterion is not None  # built together with the mixup
        terms = self.mixed_criterion.terms(z_a, z_b, z_mixed, mixed.alpha, mixed.permutation)
        return terms.barlow_twins + terms.mixed, z_a, terms.mixed

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        views, _, _ = batch
        loss, z_a, mixed_term = self.step_loss(views, self.global_step)
        if mixed_term is not None:
            self.log("train_mixed_term", mixed_term, on_step=True, on_epoch=True)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step}; lower the learning "
                "rate or use 32-bit precision (--precision 32)"
            )
        # The loss is already the global one on every rank: no sync_dist needed.
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        # The terms the loss itself summed (no second evaluation), detached.
        criterion = self.criterion if self.mixed_criterion is None else self.mixed_criterion
        health = step_metrics(loss_terms(criterion, z_a.shape[1]), z_a)
        self.log_dict(health, on_step=True, on_epoch=False)
        return {"loss": loss, "health": health}

    def configure_callbacks(self) -> list[L.Callback]:
        return [TrainingHealth(), TrainingClock()]

    @torch.no_grad()
    def held_out_features(self, images: Tensor, sizes: Tensor | None = None) -> Tensor:
        """Backbone features of uint8 images, pre-processed as for validation, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            x = prepare_images(images.to(self.device), self.mean, self.std, self._view_size, sizes)
            return self.model.features(x.contiguous(memory_format=self._memory_format)).float()
        finally:
            self.train(was_training)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        (images,), labels, indices = batch
        features = self.model.features(images).float()
        self._knn_batches[dataloader_idx].append((features, labels, indices))

    def on_validation_epoch_end(self) -> None:
        if not self._knn_batches[KNN_QUERY]:
            return
        (bank, bank_labels), (query, query_labels) = (
            self._gathered(self._knn_batches[idx]) for idx in (KNN_BANK, KNN_QUERY)
        )
        accuracy = knn_accuracy(
            bank,
            bank_labels,
            query,
            query_labels,
            num_classes=int(bank_labels.max()) + 1,
            k=self.knn_k,
            temperature=self.knn_temperature,
        )
        self.log("val_knn_acc", accuracy, prog_bar=True, rank_zero_only=True)
        self.log(KNN_BANK_IMAGES, float(len(bank)), rank_zero_only=True)
        self.log(KNN_QUERY_IMAGES, float(len(query)), rank_zero_only=True)
        for batches in self._knn_batches.values():
            batches.clear()

    def _gathered(self, batches: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Features and labels of every rank, each sample once, in the dataset's order."""
        features, labels, indices = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if self.trainer.world_size > 1:
            features, labels, indices = (
                self.all_gather(local).flatten(0, 1)  # type: ignore[union-attr]
                for local in (features, labels, indices)
            )
        # The distributed sampler pads the shards to equal length with repeated samples.
        order = torch.argsort(indices, stable=True)
        ordered = indices[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        keep = order[first]
        return features[keep], labels[keep]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0:
            global_batch = len(batch[0][0]) * self.trainer.world_size
            expected = self.hyperparameters.batch_size
            if global_batch != expected:
                raise ValueError(
                    f"the module's batch_size {expected} is the global batch, "
                    f"but {self.trainer.world_size} process(es) got {len(batch[0][0])} images "
                    "each: feed batch_size / world size per process (BarlowTwinsDataModule "
                    "does)"
                )
            if self.hyperparameters.whiten_stem:
                self.whiten_stem(batch[0])

    @torch.no_grad()
    def whiten_stem(self, views: Sequence[Tensor]) -> None:
        """Fix the backbone's first convolution to whiten the patches of these views.

        Called with the first step's views when ``whiten_stem`` is set (so a resumed run keeps
        its checkpoint's filters); under DDP the patches of every rank's views count, as one
        process's global batch would.
        """
        with torch.autocast(self.device.type, enabled=False):
            whiten_convolution_(first_convolution(self.backbone), torch.cat(list(views)))

    def configure_optimizers(self) -> Any:
        global_batch = int(self.hyperparameters.batch_size) * self.trainer.accumulate_grad_batches
        optimizer = build_optimizer(
            self.model,
            name=self.hyperparameters.optimizer,
            batch_size=global_batch,
            lr_weights=self.hyperparameters.lr_weights,
            lr_biases=self.hyperparameters.lr_biases,
            weight_decay=self.hyperparameters.weight_decay,
            momentum=self.hyperparameters.momentum,
            lars_eta=self.hyperparameters.lars_eta,
            lars_clip_lr=self.hyperparameters.lars_clip_lr,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_epochs = float(self.hyperparameters.warmup_epochs)
        warmup_steps = min(int(warmup_epochs * steps_per_epoch), total_steps - 1)
        scheduler = build_warmup_cosine_scheduler(
            optimizer,
            warmup_steps=max(0, warmup_steps),
            total_steps=total_steps,
            final_factor=self.hyperparameters.final_lr_factor,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
