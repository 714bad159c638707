"""The method's hyperparameters as one typed object, from the recipe registry to the checkpoint.

A :class:`Hyperparameters` holds every value of Barlow Twins that a recipe sets: the network,
the loss, the optimiser and its schedule, the batch, the views and the precision. Its
defaults are the paper's (Zbontar et al. 2021, arXiv 2103.03230, §4 and appendix A; the
released ``main.py``), so ``Hyperparameters()`` *is* the ``paper`` recipe, and every other
recipe is ``dataclasses.replace(base, ...)`` with only what differs. Each field carries, in its
metadata, the help text of its ``fit`` option, its bounds, and whether a resumed run may
change it: the command line, the YAML schema and the resume check are generated from the
fields, so a new hyperparameter is one field plus the code that uses it.

A recipe may leave a value to the data or the hardware as ``"auto"`` (:data:`AUTO`; the
``folder`` recipe's view size and batch, every recipe's precision); a model is built only from
a resolved object (:meth:`Hyperparameters.unresolved` is empty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from barlowtwins.optim import OPTIMIZERS
from barlowtwins.precision import PRECISIONS, Precision
from barlowtwins.views.view_config import PAPER_SOLARIZE_PROB

#: A value that a recipe leaves to the data (``folder``) or to the hardware (``precision``).
AUTO: Final = "auto"
Auto = Literal["auto"]

# The bounds a field's metadata may hold, with how the messages spell them.
BOUNDS: Final = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def hyperparameter(
    default: Any,
    help: str,
    *,
    fixed_on_resume: bool = False,
    **bounds: float,
) -> Any:
    """A field of :class:`Hyperparameters`.

    Args:
        default: The paper's value.
        help: What the value does, as ``fit --help`` shows it.
        fixed_on_resume: The checkpoint's weights, optimiser state or schedule depend on it,
            so a resumed run must keep it.
        **bounds: ``ge``, ``gt``, ``le`` or ``lt``: the values it may take.
    """
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    return field(
        default=default, metadata={"help": help, "fixed_on_resume": fixed_on_resume, **bounds}
    )


@dataclass(frozen=True)
class Hyperparameters:
    """Every hyperparameter of Barlow Twins; the defaults are the paper's.

    See the module docstring; ``barlowtwins fit --help`` lists them with their help texts,
    and ``barlowtwins recipes NAME`` shows a recipe's values.
    """

    # The network.
    backbone: str = hyperparameter(
        "resnet50", "resnet10|resnet18|resnet34|resnet50 or timm:<name>", fixed_on_resume=True
    )
    small_image: bool | Auto = hyperparameter(
        False, "CIFAR-style stem (3x3, no max-pool)", fixed_on_resume=True
    )
    zero_init_residual: bool = hyperparameter(True, "zero-init each residual branch's last BN")
    dirac_init: bool = hyperparameter(
        False,
        "start each 3x3 convolution as the identity on its first filters (Jordan 2024, "
        "arXiv 2404.00498)",
    )
    whiten_stem: bool = hyperparameter(
        False,
        "freeze the first convolution as a whitening of its input patches, computed from the "
        "first step's views (Jordan 2024, arXiv 2404.00498)",
        fixed_on_resume=True,
    )
    projector_dims: tuple[int, ...] = hyperparameter(
        (8192, 8192, 8192), "projector layer sizes", fixed_on_resume=True
    )
    # The loss.
    lambda_param: float = hyperparameter(0.0051, "off-diagonal weight of the loss", ge=0)
    scale_loss: float = hyperparameter(1.0, "factor of the whole loss (solo-learn)", gt=0)
    mix_weight: float = hyperparameter(
        0.0, "Mixed Barlow Twins regulariser weight (0: plain Barlow Twins)", ge=0
    )
    num_views: int = hyperparameter(
        2, "augmented views per image; the loss averages every pair", ge=2
    )
    # The optimiser and its schedule.
    optimizer: Literal["lars", "sgd", "adamw"] = hyperparameter(
        "lars", "lars, sgd or adamw", fixed_on_resume=True
    )
    lr_weights: float = hyperparameter(
        0.2, "base LR of weights (x global batch / 256)", fixed_on_resume=True, gt=0
    )
    lr_biases: float = hyperparameter(
        0.0048, "base LR of biases and norms", fixed_on_resume=True, gt=0
    )
    weight_decay: float = hyperparameter(
        1.5e-6, "weight decay of weights", fixed_on_resume=True, ge=0
    )
    momentum: float = hyperparameter(0.9, "momentum (Adam's beta1)", ge=0, lt=1)
    lars_eta: float = hyperparameter(0.001, "LARS trust coefficient", gt=0)
    lars_clip_lr: bool = hyperparameter(False, "clip LARS's trust ratio at 1/lr (LARC)")
    warmup_epochs: float | Auto = hyperparameter(10, "linear warm-up before the cosine decay", ge=0)
    final_lr_factor: float = hyperparameter(0.001, "cosine decay ends at this x the LR", ge=0, le=1)
    epochs: int | Auto = hyperparameter(1000, "training epochs", ge=1)
    time_budget: float | None = hyperparameter(
        None,
        "minutes of training: epochs and their steps are sized to fit from a step timed on "
        "the training devices, the epochs re-counted after each one (scoring and plots come "
        "on top)",
        gt=0,
    )
    # The batch and the views.
    batch_size: int | Auto = hyperparameter(
        2048,
        "global batch over all devices; each takes an equal share",
        fixed_on_resume=True,
        ge=2,
    )
    image_size: int | Auto = hyperparameter(
        224, "side of the views in pixels", fixed_on_resume=True, ge=8
    )
    crop_scale: tuple[float, float] = hyperparameter((0.08, 1.0), "random-resized-crop area range")
    translate: float = hyperparameter(
        0.0, "largest shift of the views, as a fraction of their side", ge=0, lt=1
    )
    erase_prob: float = hyperparameter(
        0.0, "probability of random erasing (a box set to the mean)", ge=0, le=1
    )
    solarize_prob: tuple[float, float] = hyperparameter(
        PAPER_SOLARIZE_PROB, "probability of solarisation in view A and in view B"
    )
    hflip_prob: float = hyperparameter(
        0.5,
        "probability of a horizontal flip of each view (0 where orientation carries meaning: "
        "text, digits, some medical images)",
        ge=0,
        le=1,
    )
    ema_decay: float = hyperparameter(
        0.0,
        "decay of an exponential moving average of the weights, which is scored, checkpointed "
        "and exported (0: none)",
        fixed_on_resume=True,
        ge=0,
        lt=1,
    )
    precision: Precision | Auto = hyperparameter(
        AUTO, "Lightning precision (auto: bf16-mixed where the hardware runs it fast)"
    )

    def __post_init__(self) -> None:
        """Check every value that is not left ``"auto"``; make sequences tuples."""
        for name in ("projector_dims", "crop_scale", "solarize_prob"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for spec in dataclasses.fields(self):
            _check_bounds(spec, getattr(self, spec.name))
        dims = self.projector_dims
        if not dims or min(dims) < 1:
            raise ValueError(f"projector dims must be positive, got {list(dims)}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"crop scale must satisfy 0 < lo <= hi <= 1, got {list(self.crop_scale)}"
            )
        if not all(0 <= p <= 1 for p in self.solarize_prob):
            raise ValueError(f"solarize prob must lie in [0, 1], got {list(self.solarize_prob)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.precision not in (AUTO, *PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join((AUTO, *PRECISIONS))}")
        if self.num_views > 2 and self.mix_weight > 0:
            raise ValueError(
                f"Mixed Barlow Twins (mix_weight > 0) takes 2 views, got num_views {self.num_views}"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every field's name, in order."""
        return tuple(spec.name for spec in dataclasses.fields(cls))

    @classmethod
    def fixed_on_resume(cls) -> tuple[str, ...]:
        """The fields a resumed run must keep (see :func:`hyperparameter`)."""
        return tuple(
            spec.name for spec in dataclasses.fields(cls) if spec.metadata["fixed_on_resume"]
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Hyperparameters:
        """The object of a mapping such as :meth:`to_dict` gives; other keys are ignored and
        missing ones take the paper's values."""
        names = set(cls.names())
        return cls(**{key: value for key, value in values.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), for YAML, JSON and checkpoints."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in ((name, getattr(self, name)) for name in self.names())
        }

    def unresolved(self) -> list[str]:
        """The fields still left ``"auto"``."""
        return [name for name in self.names() if getattr(self, name) == AUTO]

    def replace(self, **changes: Any) -> Hyperparameters:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _check_bounds(spec: dataclasses.Field[Any], value: Any) -> None:
    if value is None or value == AUTO or isinstance(value, bool):
        return
    label = spec.name.replace("_", " ")
    for bound, sign in BOUNDS.items():
        limit = spec.metadata.get(bound)
        if limit is None:
            continue
        within = {
            "ge": value >= limit,
            "gt": value > limit,
            "le": value <= limit,
            "lt": value < limit,
        }[bound]
        if not within:
            raise ValueError(f"{label} must be {sign} {limit}, got {value}")


def checkpoint_values(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The flat values a ``BarlowTwinsModule`` checkpoint stores, in either layout.

    Since :class:`Hyperparameters`, the module saves ``{"hparams": {...}, "in_channels": ...,
    ...}`` (what ``BarlowTwinsModule(**saved)`` rebuilds from); before, one flat mapping of
    the same names. Both give the hyperparameters and the module's own arguments side by side.
    """
    nested = saved.get("hparams")
    if isinstance(nested, Mapping):
        return {**nested, **{key: value for key, value in saved.items() if key != "hparams"}}
    return dict(saved)


__all__ = ["AUTO", "Hyperparameters", "checkpoint_values", "hyperparameter"]
