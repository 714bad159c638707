"""Tests of the convolution with the im2col weight gradient for tiny outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from barlowtwins.backbones import build_backbone
from barlowtwins.nn.convolution import SmallOutputConv2d, use_small_output_convolutions


def _gradients(conv: nn.Conv2d, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(x.requires_grad)
    out = conv(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])
    return [out.detach(), *grads] + ([x.grad] if x.requires_grad else [])


@pytest.mark.parametrize(
    ("in_size", "kernel", "stride", "padding", "bias", "input_grad", "channels_last"),
    [
        (1, 3, 1, 1, False, True, True),  # a ResNet's layer4 on 28 px images
        (1, 1, 1, 0, True, True, False),  # a 1x1 convolution of a 1x1 map
        (2, 3, 2, 1, False, True, False),  # its first layer4 convolution
        (2, 3, 1, 1, True, True, False),  # 2x2 output, with a bias
        (2, 1, 2, 0, False, True, True),  # a 1x1 downsampling shortcut
        (3, 2, 1, 0, True, False, False),  # even kernel, input without gradient
        (5, 3, 2, 0, False, True, False),  # 2x2 output from a larger map
    ],
)
def test_small_outputs_get_the_same_gradients_as_conv2d(
    in_size: int,
    kernel: int,
    stride: int,
    padding: int,
    bias: bool,
    input_grad: bool,
    channels_last: bool,
) -> None:
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, bias=bias)
    fast = copy.deepcopy(reference)
    assert use_small_output_convolutions(fast) == 1
    x = torch.randn(4, 6, in_size, in_size).requires_grad_(input_grad)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast, reference = (m.to(memory_format=torch.channels_last) for m in (fast, reference))
    assert fast._takes_im2col_path(x)
    for got, expected in zip(_gradients(fast, x), _gradients(reference, x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_large_outputs_no_grad_and_autocast_keep_conv2d() -> None:
    conv = SmallOutputConv2d(3, 4, 3, padding=1, bias=False)
    assert not conv._takes_im2col_path(torch.randn(2, 3, 4, 4))  # 16 output positions
    assert conv._takes_im2col_path(torch.randn(2, 3, 2, 2))
    with torch.no_grad():
        assert not conv._takes_im2col_path(torch.randn(2, 3, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv._takes_im2col_path(torch.randn(2, 3, 2, 2))
    assert not conv._takes_im2col_path(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    conv.weight.requires_grad_(False)
    assert not conv._takes_im2col_path(torch.randn(2, 3, 2, 2))


def test_backbones_use_it_and_keep_torchvision_state_dict_keys() -> None:
    assert not any(
        type(m) is SmallOutputConv2d for m in build_backbone("resnet10")[0].modules()
    )  # off unless asked for: it only helps on a CPU
    backbone, _ = build_backbone("resnet10", in_channels=1, small_output_convolutions=True)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is SmallOutputConv2d for m in convs)
    plain = copy.deepcopy(backbone)
    for m in plain.modules():
        if type(m) is SmallOutputConv2d:
            m.__class__ = nn.Conv2d
    plain.load_state_dict(backbone.state_dict(), strict=True)
    # A whole training step on 28 px images (layer4 at 1x1) gives the plain model's gradients.
    x = torch.randn(8, 1, 28, 28)
    for model in (backbone, plain):
        model(x).square().mean().backward()
    for (name, p), q in zip(backbone.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_convolutions_are_left_alone() -> None:
    depthwise = SmallOutputConv2d(4, 4, 3, groups=4)
    assert not depthwise._takes_im2col_path(torch.randn(1, 4, 3, 3))
