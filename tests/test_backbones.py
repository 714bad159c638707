"""Tests of the backbone factory: torchvision ResNets, stems, and timm models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet

from barlowtwins.backbones import adapt_stem, available_backbones, build_backbone, dirac_init_

_HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_available_backbones() -> None:
    assert available_backbones() == ["resnet10", "resnet18", "resnet34", "resnet50"]


@pytest.mark.parametrize(
    ("name", "dim"), [("resnet10", 512), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]
)
def test_resnet_feature_sizes_for_grey_and_rgb(name: str, dim: int) -> None:
    model, feature_dim = build_backbone(name, in_channels=1)
    assert feature_dim == dim
    assert isinstance(model, ResNet)
    model.eval()
    for in_channels in (1, 3):
        # Rebuilding only the stem covers both channel counts with one (slow) model build.
        adapt_stem(model, in_channels=in_channels, small_image=False)
        assert model.conv1.in_channels == in_channels
        with torch.no_grad():
            features = model(torch.randn(2, in_channels, 32, 32))
        assert features.shape == (2, dim)
        assert features.dtype == torch.float32


@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28)])
def test_small_image_stem_keeps_resolution(in_channels: int, size: int) -> None:
    model, _ = build_backbone("resnet18", in_channels=in_channels, small_image=True)
    conv = model.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert conv.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, in_channels, size, size)
    model.eval()
    with torch.no_grad():
        stem_out = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        last_block = model.layer4(model.layer3(model.layer2(model.layer1(stem_out))))
    # The CIFAR stem does not downsample, so layer4 sees a 4x4 grid rather than 1x1.
    assert stem_out.shape[-2:] == (size, size)
    assert last_block.shape[-2:] == ((size + 7) // 8, (size + 7) // 8)
    assert model(x).shape == (2, 512)


def test_standard_stem_state_dict_loads_strict_into_torchvision() -> None:
    backbone, _ = build_backbone("resnet18")
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.state_dict(), strict=True)
    backbone.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), backbone(x))


def test_adapted_stem_state_dict_loads_strict_after_adapt_stem() -> None:
    backbone, _ = build_backbone("resnet18", in_channels=1, small_image=True)
    reference = adapt_stem(torchvision.models.resnet18(), in_channels=1, small_image=True)
    reference.fc = nn.Identity()
    reference.load_state_dict(backbone.state_dict(), strict=True)


def test_adapt_stem_keeps_matching_conv() -> None:
    model = torchvision.models.resnet18()
    conv = model.conv1
    assert adapt_stem(model, in_channels=3, small_image=False).conv1 is conv
    assert adapt_stem(model, in_channels=1, small_image=False).conv1.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="in_channels"):
        adapt_stem(model, in_channels=0, small_image=False)


@pytest.mark.parametrize(("name", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_last_bn(name: str, last_bn: str) -> None:
    model, _ = build_backbone(name, zero_init_residual=True)
    blocks = [
        b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
    ]
    assert all(torch.count_nonzero(getattr(b, last_bn).weight) == 0 for b in blocks)


def test_without_zero_init_residual_last_bn_is_one() -> None:
    model, _ = build_backbone("resnet18")
    torch.testing.assert_close(model.layer1[0].bn2.weight.detach(), torch.ones(64))


def test_dirac_init_starts_3x3_convolutions_as_the_identity_on_their_first_filters() -> None:
    torch.manual_seed(0)
    model, _ = build_backbone("resnet10", dirac_init=True)
    torch.manual_seed(0)
    plain, _ = build_backbone("resnet10")
    x = torch.randn(2, 64, 8, 8)
    same_width = model.layer1[0].conv1  # 64 -> 64, stride 1: every filter is the identity
    torch.testing.assert_close(same_width(x), x)
    wider = model.layer2[0].conv1  # 64 -> 128, stride 2: the first 64 pick the centre pixels
    out = wider(x)
    torch.testing.assert_close(out[:, :64], x[:, :, ::2, ::2])
    # The other filters keep the random initialisation, as do the stem and the shortcuts.
    torch.testing.assert_close(wider.weight[64:], plain.layer2[0].conv1.weight[64:])
    torch.testing.assert_close(model.conv1.weight, plain.conv1.weight)
    torch.testing.assert_close(
        model.layer2[0].downsample[0].weight, plain.layer2[0].downsample[0].weight
    )
    assert dirac_init_(plain) is plain
    torch.testing.assert_close(plain.layer1[0].conv2.weight, model.layer1[0].conv2.weight)


@pytest.mark.skipif(not _HAS_TIMM, reason="timm not installed")
@pytest.mark.parametrize("name", ["timm:resnet10t", "resnet10t"])
def test_timm_backbone(name: str) -> None:
    model, feature_dim = build_backbone(name, in_channels=1)
    assert feature_dim == model.num_features == 512
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, feature_dim)


@pytest.mark.skipif(not _HAS_TIMM, reason="timm not installed")
def test_timm_rejects_torchvision_only_options() -> None:
    with pytest.raises(ValueError, match="torchvision ResNets only"):
        build_backbone("timm:resnet10t", small_image=True)


@pytest.mark.skipif(not _HAS_TIMM, reason="timm not installed")
def test_dirac_init_applies_to_a_timm_model_too() -> None:
    model, _ = build_backbone("timm:resnet10t", in_channels=1, dirac_init=True)
    block = model.layer1[0].conv2  # 64 -> 64, 3x3
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_unknown_name_error_text() -> None:
    installed = "yes" if _HAS_TIMM else "no"
    expected = (
        "unknown backbone 'nope'; available: resnet10, resnet18, resnet34, resnet50, "
        f"or timm:<name> (any timm model; timm installed: {installed})"
    )
    with pytest.raises(ValueError) as info:
        build_backbone("nope")
    assert str(info.value) == expected
    with pytest.raises(ValueError, match="unknown backbone 'timm:nope'"):
        build_backbone("timm:nope")


def test_rejects_zero_channels() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", in_channels=0)
