"""Feature-extracting backbones: torchvision ResNets and, optionally, any timm model.

The paper's encoder is a ResNet-50 without its classification layer, giving 2048-dimensional
features (§4, "Architecture"). Smaller ResNets and a CIFAR-style stem make the method usable
on small images and CPUs.

Reference:
    Zbontar, Jing, Misra, LeCun, Deny. "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021. https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision import models
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock

from barlowtwins.nn.convolution import use_small_output_convolutions


def resnet10(*, weights: None = None, **kwargs: Any) -> ResNet:
    """ResNet-10: torchvision's ResNet with one BasicBlock per stage (no weights exist).

    Half the compute of ResNet-18 with the same widths; the CPU default for small images.
    Rebuild it with ``torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])``.
    """
    if weights is not None:
        raise ValueError("resnet10 has no pretrained weights")
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


_TORCHVISION_RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet10": resnet10,
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}
_TIMM_PREFIX = "timm:"


def available_backbones() -> list[str]:
    """Names of the built-in torchvision backbones.

    Any timm model is also available as ``"timm:<name>"`` when timm is installed.
    """
    return list(_TORCHVISION_RESNETS)


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    small_image: bool = False,
    zero_init_residual: bool = False,
    dirac_init: bool = False,
    small_output_convolutions: bool = False,
) -> tuple[nn.Module, int]:
    """Build a randomly initialised backbone that maps images to feature vectors.

    ``"resnet10"`` (see :func:`resnet10`), ``"resnet18"``, ``"resnet34"`` and ``"resnet50"``
    are torchvision ResNets (no weights are
    downloaded) whose ``fc`` is replaced by :class:`~torch.nn.Identity`; the module stays a
    :class:`torchvision.models.ResNet`, so its ``state_dict`` has torchvision's keys. With the
    standard stem it loads strictly into a plain torchvision model::

        backbone, _ = build_backbone("resnet50")
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()
        model.load_state_dict(backbone.state_dict())  # strict

    With another ``in_channels`` or ``small_image=True``, rebuild the stem first with
    ``adapt_stem(torchvision.models.resnet50(), in_channels, small_image)``.

    Names prefixed ``"timm:"`` (e.g. ``"timm:resnet10t"``), or any other name in timm's
    registry, build ``timm.create_model(name, pretrained=False, num_classes=0,
    in_chans=in_channels)``; timm is an optional dependency (``pip install
    "barlowtwins[timm]"``). timm models keep their own stems and initialisation, so
    ``small_image`` and ``zero_init_residual`` are rejected for them; ``dirac_init`` applies
    to any model's ungrouped 3x3 convolutions.

    With ``small_output_convolutions=True`` a torchvision ResNet's plain convolutions become
    :class:`~barlowtwins.nn.convolution.SmallOutputConv2d`, an ``nn.Conv2d`` with the same
    parameters whose CPU weight gradient is faster on 1x1 and 2x2 outputs (the last stages of
    a ResNet on small images). It only helps training on a CPU: leave it off for CUDA, where it
    costs a Python check per call. timm models are never changed.

    Args:
        name: Backbone name.
        in_channels: Number of input image channels (1 for grey-scale, 3 for RGB).
        small_image: Use the CIFAR-style stem for images of at most 64 pixels (see
            :func:`adapt_stem`).
        zero_init_residual: Zero the last batch-norm weight of each residual block, so every
            block starts as the identity (torchvision's option).
        dirac_init: Start each 3x3 convolution as the identity on its first input-width
            filters (:func:`dirac_init_`).
        small_output_convolutions: Use the fast CPU weight gradient (torchvision ResNets).

    Returns:
        ``(module, feature_dim)``; the module maps ``(B, in_channels, H, W)`` to
        ``(B, feature_dim)`` float features.

    Raises:
        ValueError: If the name is unknown, timm is missing for a timm name, or an option does
            not apply.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name in _TORCHVISION_RESNETS:
        model = _TORCHVISION_RESNETS[name](weights=None, zero_init_residual=zero_init_residual)
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
        model = adapt_stem(model, in_channels, small_image)
        if dirac_init:
            dirac_init_(model)
        if small_output_convolutions:
            use_small_output_convolutions(model)
    else:
        model, feature_dim = _build_timm(name, in_channels, small_image, zero_init_residual)
        if dirac_init:
            dirac_init_(model)
    return model, feature_dim


def dirac_init_(model: nn.Module) -> nn.Module:
    """Start every 3x3 convolution of ``model`` as the identity on its first filters, in place.

    The CIFAR-10 speedruns' initialisation (Jordan 2024, arXiv 2404.00498; airbench's
    ``Conv``): after the default initialisation, the first ``in_channels`` filters of a 3x3
    convolution with at least as many outputs as inputs are set to
    :func:`torch.nn.init.dirac_`, so output channel ``i`` starts as input channel ``i`` at the
    centre tap (subsampled where the stride is 2); the remaining filters keep their random
    initialisation. Other convolutions (the 7x7 stem, 1x1 shortcuts) are left as they are.

    Returns:
        The same model.
    """
    for conv in model.modules():
        if (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.groups == 1
            and conv.out_channels >= conv.in_channels
        ):
            nn.init.dirac_(conv.weight.data[: conv.in_channels])
    return model


def adapt_stem(model: ResNet, in_channels: int, small_image: bool) -> ResNet:
    """Give a torchvision ResNet the stem for ``in_channels`` and the image size, in place.

    The standard stem is a 7x7 stride-2 convolution followed by a stride-2 max-pool, which
    shrinks a 32x32 image to 8x8 before the first block. With ``small_image=True`` the stem
    is the CIFAR-style one for images up to 64 pixels: a 3x3 stride-1 convolution (padding 1,
    no bias) and no max-pool. A rebuilt convolution gets torchvision's Kaiming-normal
    initialisation; a stem that already matches is left untouched (pre-trained weights
    survive). Use this to rebuild the architecture of :func:`build_backbone` before loading
    its weights.

    Args:
        model: A torchvision ResNet.
        in_channels: Number of input channels.
        small_image: Use the CIFAR-style stem.

    Returns:
        The same model.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    kernel, stride, padding = (3, 1, 1) if small_image else (7, 2, 3)
    conv = model.conv1
    if (conv.in_channels, conv.kernel_size, conv.stride, conv.padding) != (
        in_channels,
        (kernel, kernel),
        (stride, stride),
        (padding, padding),
    ):
        model.conv1 = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            bias=False,
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_image:
        model.maxpool = nn.Identity()
    return model


def _build_timm(
    name: str, in_channels: int, small_image: bool, zero_init_residual: bool
) -> tuple[nn.Module, int]:
    """Build a timm model without classifier, or explain why the name is not available."""
    explicit = name.startswith(_TIMM_PREFIX)
    timm_name = name.removeprefix(_TIMM_PREFIX)
    if importlib.util.find_spec("timm") is None:
        if explicit:
            raise ValueError(
                f"backbone {name!r} needs timm, which is not installed; "
                'run: pip install "barlowtwins[timm]"'
            )
        raise ValueError(_unknown_message(name, timm_installed=False))
    timm = importlib.import_module("timm")
    # ``is_model`` only consults the local registry: hub names such as "hf-hub:..." are not in
    # it, so nothing is ever downloaded.
    if not timm.is_model(timm_name):
        raise ValueError(_unknown_message(name, timm_installed=True))
    if small_image or zero_init_residual:
        raise ValueError(
            f"small_image and zero_init_residual apply to torchvision ResNets only, not {name!r}"
        )
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_channels)
    return model, int(model.num_features)


def _unknown_message(name: str, *, timm_installed: bool) -> str:
    """One-line error for an unknown backbone name."""
    return (
        f"unknown backbone {name!r}; available: {', '.join(available_backbones())}, "
        f"or timm:<name> (any timm model; timm installed: {'yes' if timm_installed else 'no'})"
    )
