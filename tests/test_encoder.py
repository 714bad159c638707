"""What describes a trained encoder: names, rebuild lines, feature size and head, without a run."""

from __future__ import annotations

import pytest
import torch

from barlowtwins.backbones import build_backbone
from barlowtwins.encoder import (
    EncoderInfo,
    LinearHead,
    architecture_name,
    attach_head,
    build_code,
    classifier_name,
    feature_dim,
    is_timm,
    timm_name,
)


def _info(backbone: str, *, small_image: bool = False, in_channels: int = 1) -> EncoderInfo:
    return EncoderInfo(
        backbone, in_channels, small_image, 32, (0.5,) * in_channels, (0.25,) * in_channels
    )


@pytest.mark.parametrize(
    ("backbone", "small_image", "timm", "expected"),
    [
        ("resnet18", False, False, "resnet18"),  # timm builds it with the same keys
        ("resnet18", True, False, None),  # not with the small-image stem
        ("resnet10", False, False, None),  # timm has no such ResNet
        ("timm:resnet10t", False, True, "resnet10t"),
    ],
)
def test_timm_name_says_whether_timm_rebuilds_the_encoder(
    backbone: str, small_image: bool, timm: bool, expected: str | None
) -> None:
    info = _info(backbone, small_image=small_image)
    assert is_timm(info) is timm
    assert timm_name(info) == expected
    assert architecture_name(info) == backbone.removeprefix("timm:")


@pytest.mark.parametrize("small_image", [False, True])
def test_build_code_rebuilds_a_torchvision_encoder_that_loads_strictly(small_image: bool) -> None:
    info = _info("resnet10", small_image=small_image)
    backbone, dim = build_backbone("resnet10", in_channels=1, small_image=small_image)
    code = build_code(info, backbone)
    assert "barlowtwins" not in code
    namespace: dict[str, object] = {}
    exec(code, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    model.load_state_dict(backbone.state_dict(), strict=True)
    assert feature_dim(info, backbone) == dim == 512


def test_attach_head_makes_the_encoder_return_the_heads_logits() -> None:
    info = _info("resnet10")
    encoder, dim = build_backbone("resnet10", in_channels=1)
    encoder.eval()
    generator = torch.Generator().manual_seed(0)
    head = LinearHead(torch.randn(3, dim, generator=generator), torch.randn(3), None, "")
    images = torch.rand(2, 1, info.image_size, info.image_size, generator=generator)
    with torch.no_grad():
        expected = encoder(images) @ head.weight.T + head.bias
        assert classifier_name(encoder) == "fc"
        logits = attach_head(encoder, head)(images)
    torch.testing.assert_close(logits, expected)
    assert not encoder.training
