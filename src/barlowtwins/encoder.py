"""What describes, rebuilds and feeds a trained encoder.

A trained backbone is only usable elsewhere with what it was built and trained with: its
architecture, stem, input size and normalisation (:class:`EncoderInfo`), and, after
``evaluate --linear --save-head``, its linear classifier (:class:`LinearHead`). The loader
of runs (:mod:`barlowtwins.runs.loader`), the export formats (:mod:`barlowtwins.app.export`) and
the model card (:mod:`barlowtwins.app.model_card`) all describe the encoder from these, so the
helpers live here, beside it, and none of those modules needs another for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from barlowtwins.backbones import available_backbones
from barlowtwins.hparams import checkpoint_values
from barlowtwins.views.view_config import resolve_normalization

# torchvision ResNets whose layout timm builds under the same name with the same keys, so the
# Hugging Face folder of such an encoder also loads with timm (not with the small-image stem).
_SAME_IN_TIMM = frozenset({"resnet18", "resnet34", "resnet50"})
_TIMM_PREFIX = "timm:"
# The largest view side an encoder description may state (8192 px views are far beyond any
# recipe; a header stating more is corrupt or hostile, and would make every image fail).
MAX_IMAGE_SIZE = 8192


@dataclass(frozen=True)
class EncoderInfo:
    """What is needed to rebuild a pretrained backbone and feed it images."""

    backbone: str
    in_channels: int
    small_image: bool
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        """Refuse what no encoder of ours was trained with: a description read from a file
        (``backbone.json``, an export's header) is checked before anything is built from it."""
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a name, got {self.backbone!r}")
        if self.in_channels not in (1, 3) or isinstance(self.in_channels, bool):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if not isinstance(self.small_image, bool):
            raise ValueError(f"small_image must be true or false, got {self.small_image!r}")
        if not isinstance(self.image_size, int) or not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got {self.image_size!r}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_channels or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"{name} must be {self.in_channels} numbers, got {values!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    @classmethod
    def from_hparams(cls, saved: Mapping[str, Any]) -> EncoderInfo:
        """From the saved hyperparameters of a :class:`BarlowTwinsModule` checkpoint, in
        either layout (:func:`~barlowtwins.hparams.checkpoint_values`)."""
        values = checkpoint_values(saved)
        mean, std = resolve_normalization(
            values["in_channels"], values.get("mean"), values.get("std")
        )
        return cls(
            backbone=values["backbone"],
            in_channels=int(values["in_channels"]),
            small_image=bool(values["small_image"]),
            image_size=int(values["image_size"]),
            mean=mean,
            std=std,
        )


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on the encoder's raw features (``evaluate --linear --save-head``).

    The probe's feature standardisation is folded into ``weight`` and ``bias``
    (:func:`~barlowtwins.evaluation.probes.linear_probe`), so ``features @ weight.T + bias`` are the
    logits.

    Attributes:
        weight: ``(num_classes, feature_dim)``.
        bias: ``(num_classes,)``.
        classes: Class names indexed by label, when the data had them.
        backbone_sha256: :func:`fingerprint` of the backbone weights it was trained on.
    """

    weight: Tensor
    bias: Tensor
    classes: tuple[str, ...] | None
    backbone_sha256: str

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return int(self.weight.shape[0])

    def linear(self) -> nn.Linear:
        """The head as an ``nn.Linear``."""
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer


def is_timm(info: EncoderInfo) -> bool:
    """Whether the backbone is a timm model (else a torchvision ResNet).

    Args:
        info: The encoder's description.

    Returns:
        ``True`` for any name that is not one of the built-in torchvision backbones, since
        :func:`build_backbone` builds every other name with timm.
    """
    return info.backbone not in available_backbones()


def architecture_name(info: EncoderInfo) -> str:
    """The backbone's name in its source library: a timm name without its ``timm:`` prefix.

    Args:
        info: The encoder's description.

    Returns:
        The name that tags and titles show, as the source library spells it.
    """
    return info.backbone.removeprefix(_TIMM_PREFIX)


def timm_name(info: EncoderInfo) -> str | None:
    """The name ``timm.create_model`` builds this encoder under, or ``None``.

    Args:
        info: The encoder's description.

    Returns:
        The timm name of a timm backbone, or of a torchvision ResNet that timm builds with the
        same layout and keys (the standard stem only); ``None`` when timm has no such model.
    """
    if is_timm(info):
        return architecture_name(info)
    if info.backbone in _SAME_IN_TIMM and not info.small_image:
        return info.backbone
    return None


def build_code(info: EncoderInfo, encoder: nn.Module, num_classes: int = 0) -> str:
    """Python lines that build the matching module of the source library, as ``model``.

    torchvision ResNets are spelled as ``ResNet(block, layers)`` with the stem of
    :func:`barlowtwins.backbones.adapt_stem` written out, so the lines need neither
    barlowtwins nor a name for ``resnet10``.

    Args:
        info: The encoder's description.
        encoder: The built backbone; its blocks and widths are read from it.
        num_classes: Size of the classifier the lines build (``0``: none, the module returns
            features).

    Returns:
        The lines, joined with newlines.
    """
    if is_timm(info):
        return (
            "import timm\n"
            f"model = timm.create_model({timm_name(info)!r}, pretrained=False, "
            f"num_classes={num_classes}, in_chans={info.in_channels})"
        )
    resnet: Any = encoder  # a torchvision ResNet: its stages and stem are attributes
    block = type(resnet.layer1[0]).__name__
    layers = [len(getattr(encoder, f"layer{i}")) for i in range(1, 5)]
    lines = [
        "import torch",
        f"from torchvision.models.resnet import {block}, ResNet",
        "",
        f"model = ResNet({block}, {layers}"
        + (f", num_classes={num_classes})" if num_classes else ")"),
    ]
    width = resnet.conv1.out_channels
    if info.small_image:
        lines += [
            f"model.conv1 = torch.nn.Conv2d({info.in_channels}, {width}, kernel_size=3, stride=1, "
            "padding=1, bias=False)",
            "model.maxpool = torch.nn.Identity()",
        ]
    elif info.in_channels != 3:
        lines.append(
            f"model.conv1 = torch.nn.Conv2d({info.in_channels}, {width}, kernel_size=7, stride=2, "
            "padding=3, bias=False)"
        )
    if not num_classes:
        lines.append("model.fc = torch.nn.Identity()")
    return "\n".join(lines)


def feature_dim(info: EncoderInfo, encoder: nn.Module) -> int:
    """Size of the encoder's feature vector, measured on a blank batch of its input size.

    Measured rather than looked up, because timm models and stems change it and no table
    covers them all.

    Args:
        info: The encoder's description (input channels and size).
        encoder: The built backbone.

    Returns:
        The length of one flattened output.
    """
    with torch.no_grad():
        size = info.image_size
        return int(encoder(torch.zeros(2, info.in_channels, size, size)).flatten(1).shape[1])


def classifier_name(encoder: nn.Module) -> str:
    """Name of the classifier module of ``encoder``: ``fc`` for torchvision, timm's own.

    Args:
        encoder: A torchvision ResNet or a timm model.

    Returns:
        The attribute (and ``state_dict`` key prefix) that holds the classifier.
    """
    if hasattr(encoder, "get_classifier"):  # timm
        return str(getattr(encoder, "pretrained_cfg", {}).get("classifier", "fc"))
    return "fc"


def attach_head(encoder: nn.Module, head: LinearHead) -> nn.Module:
    """Put ``head`` in the place of the encoder's (removed) classifier, in place.

    Args:
        encoder: A torchvision ResNet (its ``fc`` is replaced) or a timm model (its
            classifier is rebuilt at the head's size).
        head: The linear classifier to put there.

    Returns:
        ``encoder``, in eval mode, now returning logits.
    """
    if hasattr(encoder, "reset_classifier"):  # timm rebuilds its classifier at any size
        timm_model: Any = encoder  # timm's classifier API
        timm_model.reset_classifier(head.num_classes)
        layer = timm_model.get_classifier()
        with torch.no_grad():
            layer.weight.copy_(head.weight)
            layer.bias.copy_(head.bias)
    else:
        encoder.fc = head.linear()
    return encoder.eval()
