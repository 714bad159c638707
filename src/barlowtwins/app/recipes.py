"""Published Barlow Twins recipes as named presets: the one place where defaults live.

A :class:`Recipe` is a complete, typed set of hyperparameters
(:class:`~barlowtwins.hparams.Hyperparameters`) with its source and the result the source
published. The ``paper`` recipe is the class's defaults; every other recipe is
``dataclasses.replace`` of a base with only what differs (as timm registers model variants).
``barlowtwins fit`` starts from a recipe and applies the user's overrides; ``barlowtwins
recipes`` lists them. The library's classes keep their own (paper) defaults.

Values a recipe leaves as ``"auto"`` are chosen from the data by the recipe's ``adapt``
function (see :func:`folder_values`) or, for the precision, from the hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from barlowtwins.data.spec import DataSummary
from barlowtwins.hparams import AUTO, Hyperparameters


@dataclass(frozen=True)
class Recipe:
    """A named, cited set of hyperparameters.

    Attributes:
        name: What ``--recipe`` takes.
        purpose: What data and hardware it is for.
        source: Where every value comes from (paper section or file).
        published: The result its source reports.
        measured: What we measured with it here, or why it was not reproduced here.
        hparams: Every hyperparameter (``"auto"`` where ``adapt`` or the hardware decides).
        data: The built-in dataset it trains on when no ``--data`` is given (None: the
            user must point ``--data`` at their copy).
        adapt: Fills in the ``"auto"`` values from a summary of the training data.
    """

    name: str
    purpose: str
    source: str
    published: str
    measured: str
    hparams: Hyperparameters
    data: str | None = None
    adapt: Callable[[DataSummary], dict[str, Any]] | None = field(default=None, repr=False)

    def resolved(self, summary: DataSummary | None) -> Hyperparameters:
        """The hyperparameters with ``"auto"`` filled in from the data where the recipe adapts
        to it."""
        if self.adapt is None or summary is None:
            return self.hparams
        pending = set(self.hparams.unresolved())
        return self.hparams.replace(
            **{k: v for k, v in self.adapt(summary).items() if k in pending}
        )


# Folder views by the images' median shorter side: (largest side, view size). Larger images
# get 224 px views, the paper's.
_VIEW_SIZES = ((40, 32), (80, 64), (160, 128))
# About 2 M samples seen (7800 steps of 256), bounded; short enough for a CPU on small folders,
# and the warm-up below is a tenth of it.
_FOLDER_SAMPLES = 2_000_000
_FOLDER_EPOCHS = (20, 1000)
_FOLDER_BATCH = 256


def folder_values(summary: DataSummary) -> dict[str, Any]:
    """The ``folder`` recipe's data-dependent values.

    * view size: 32 px for images of at most 40 px (median shorter side), 64 up to 80 px,
      128 up to 160 px, else 224 px (the paper's); never larger than that median side, so
      views are not upsampled;
    * the CIFAR-style stem (3x3, no max-pool) for views of at most 32 px, as solo-learn does
      on CIFAR;
    * batch 256 (solo-learn's), smaller for folders of fewer than 1024 images (at most a
      quarter of them, a power of two, at least 8);
    * epochs for about 2 M samples seen, between 20 and 1000, with a tenth of them warm-up.

    Args:
        summary: Image count and median shorter side of the training folder.

    Returns:
        Values for ``image_size``, ``small_image``, ``batch_size``, ``epochs`` and
        ``warmup_epochs``.
    """
    size = next((size for side, size in _VIEW_SIZES if summary.median_side <= side), 224)
    image_size = min(size, summary.median_side)
    batch = _FOLDER_BATCH
    while batch > 8 and batch * 4 > summary.count:
        batch //= 2
    low, high = _FOLDER_EPOCHS
    epochs = min(high, max(low, round(_FOLDER_SAMPLES / max(1, summary.count))))
    return {
        "image_size": image_size,
        "small_image": image_size <= 32,
        "batch_size": batch,
        "epochs": epochs,
        "warmup_epochs": max(1, epochs // 10),
    }


_NOT_REPRODUCED = "published, not reproduced here (no GPU and no such dataset offline)"

#: The hyperparameters of the paper's run (ImageNet, ResNet-50, global batch 2048), which are
#: the class's defaults.
PAPER = Hyperparameters()
#: solo-learn's Barlow Twins recipe for CIFAR and ImageNet-100
#: (``scripts/pretrain/*/barlow.yaml`` with ``augmentations/asymmetric.yaml``), before its
#: per-dataset values.
SOLO_LEARN = replace(
    PAPER,
    backbone="resnet18",
    zero_init_residual=False,
    projector_dims=(2048, 2048, 2048),
    scale_loss=0.1,
    lr_weights=0.3,
    lr_biases=0.3,
    weight_decay=1e-4,
    lars_eta=0.02,
    lars_clip_lr=True,
    final_lr_factor=0.0,
)

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="fashion-mnist-cpu",
            purpose="the offline default: Fashion-MNIST at 28 px on a 2-core CPU in ~15 min",
            source="tuned here (README 'Measured results'; benchmarks/recipe.py sweeps)",
            published="none",
            measured=(
                "test kNN 87.35 % (k=20 T=0.07) / 86.11 % (k=200 T=0.1), linear probe 87.88 %, "
                "7.6 min (6.5 training) on a 2-core AVX512-BF16 CPU (bf16); the same ResNet-10 "
                "trained with all labels in those minutes: 92.10 / 91.86 / 92.02 %; before the "
                "whitened stem and identity initialisation, with lambda 0.005: 86.96 / 85.77 % "
                "(k=20 / k=200, T=0.1), 88.21 % in 15.1 min on a 2-core AVX2 CPU (float32)"
            ),
            data="fashion-mnist",
            hparams=replace(
                PAPER,
                backbone="resnet10",
                zero_init_residual=False,
                projector_dims=(1024, 1024, 1024),
                # 0.01 beat 0.005, 0.02 and 1/D = 0.001 in 5-epoch runs (benchmarks/README.md).
                lambda_param=0.01,
                lr_weights=3.0,
                lr_biases=0.0144,
                warmup_epochs=0.2,
                epochs=5,
                batch_size=512,
                image_size=28,
                # Fashion-MNIST's objects are centred and fill the frame: in short runs
                # random crops only slowed learning down (README, the crop table).
                crop_scale=(1.0, 1.0),
                # The CIFAR-10 speedruns' label-free initialisations (arXiv 2404.00498): a
                # frozen whitening stem and identity-initialised 3x3 convolutions each gained
                # about 0.4 points of k=200 kNN, together 0.75 (means of two seeds), at no
                # cost in time (benchmarks/README.md, session 11).
                whiten_stem=True,
                dirac_init=True,
            ),
        ),
        Recipe(
            name="folder",
            purpose="your own image folder: view size, batch and epochs chosen from the data",
            source=(
                "solo-learn's CIFAR/ImageNet-100 recipe (scripts/pretrain/cifar/barlow.yaml); "
                "view size, batch and epochs from the folder (barlowtwins.app.recipes."
                "folder_values)"
            ),
            published="none",
            measured="not measured: depends on the folder",
            hparams=replace(
                SOLO_LEARN,
                small_image=AUTO,
                epochs=AUTO,
                batch_size=AUTO,
                image_size=AUTO,
                warmup_epochs=AUTO,
            ),
            adapt=folder_values,
        ),
        Recipe(
            name="paper",
            purpose="ImageNet, ResNet-50, global batch 2048 on 32 GPUs (the paper's run)",
            source=(
                "Zbontar et al. 2021 (arXiv 2103.03230) §4 and appendix A; "
                "facebookresearch/barlowtwins main.py"
            ),
            published="73.2 % ImageNet linear top-1",
            measured=_NOT_REPRODUCED,
            hparams=PAPER,
        ),
        Recipe(
            name="cifar10",
            purpose="CIFAR-10 (32 px) on one GPU; point --data at a folder of its images",
            source="solo-learn scripts/pretrain/cifar/barlow.yaml (+ augmentations/asymmetric)",
            published="92.1 % CIFAR-10 linear top-1 (solo-learn model zoo)",
            measured=_NOT_REPRODUCED,
            hparams=replace(SOLO_LEARN, small_image=True, batch_size=256, image_size=32),
        ),
        Recipe(
            name="imagenet100",
            purpose="ImageNet-100 (224 px) on 2 GPUs; point --data at its train folder",
            source=(
                "solo-learn scripts/pretrain/imagenet-100/barlow.yaml (+ augmentations/asymmetric)"
            ),
            published="80.4 % ImageNet-100 linear top-1 (solo-learn model zoo)",
            measured=_NOT_REPRODUCED,
            # solo-learn: 128 on each of 2 GPUs, the global batch 256.
            hparams=replace(SOLO_LEARN, epochs=400, batch_size=256),
        ),
    )
}

# Base learning rates (weights, biases and norms) when an override switches a recipe to
# another optimiser. LARS 3 is fashion-mnist-cpu's; AdamW at 2e-3 / 4.8e-3 matched LARS at
# 0.2 in a one-epoch test (benchmarks/recipe.py); SGD's 0.06 is lightly's example value.
OPTIMIZER_LEARNING_RATES = {"lars": (3.0, 0.0144), "sgd": (0.06, 0.06), "adamw": (2e-3, 4.8e-3)}

DEFAULT_RECIPE = "fashion-mnist-cpu"
FOLDER_RECIPE = "folder"


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        KeyError: With the list of recipes, for an unknown name.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None
