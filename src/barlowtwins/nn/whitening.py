"""A first convolution fixed to whiten its input patches, computed from images without labels.

The CIFAR-10 speedruns (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv
2404.00498; KellerJordan/cifar10-airbench) replace the learned first convolution by a frozen
one whose filters are the eigenvectors of the training patches' second-moment matrix, each
scaled by the inverse square root of its eigenvalue and used with both signs, so that a ReLU
after it keeps every direction. The next layer then sees decorrelated inputs from the first
step on. Only the images enter; no label does.

Here the filters replace a convolution's weight in place (its ``state_dict`` keys and shape
stay those of the network, so exported weights load anywhere). When the convolution has more
filters than twice the patch dimension ``d``, the remaining ones are the same whitened basis
turned by fixed random rotations (any rotation of a whitening is a whitening); when it has
fewer, the leading eigenvectors are kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from barlowtwins.nn.distributed import global_sum, world_size

# Added to the eigenvalues before the inverse square root (airbench's value, for inputs
# normalised to unit variance): directions with no variance are not blown up.
WHITENING_EPS = 5e-4
# Images unfolded at once: bounds the memory of the patches (ResNet-50's 7x7 stem at 224 px
# unfolds 147 x 47 524 values per RGB image).
_IMAGES_PER_CHUNK = 16


def first_convolution(module: nn.Module) -> nn.Conv2d:
    """The first :class:`torch.nn.Conv2d` of ``module`` in definition order: a network's stem.

    Raises:
        ValueError: If the module has no ungrouped 2-D convolution first.
    """
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1:
        raise ValueError("the network's first layer is not a plain 2-D convolution to whiten")
    return conv


def patch_second_moment(images: Tensor, kernel_size: tuple[int, int]) -> tuple[Tensor, int]:
    """Sum of ``p p^T`` over every ``kernel_size`` patch ``p`` of ``images``, and their count.

    Patches are taken at stride 1 without padding, as the speedruns do.

    Args:
        images: ``(B, C, H, W)`` float images, normalised as the network sees them.
        kernel_size: Patch height and width.

    Returns:
        The ``(d, d)`` float32 sum, ``d = C * kh * kw``, and the number of patches.
    """
    dim = images.shape[1] * kernel_size[0] * kernel_size[1]
    total = torch.zeros(dim, dim, dtype=torch.float32, device=images.device)
    count = 0
    for chunk in images.split(_IMAGES_PER_CHUNK):
        patches = F.unfold(chunk.float(), kernel_size).transpose(1, 2).reshape(-1, dim)
        total += patches.T @ patches
        count += patches.shape[0]
    return total, count


def whitening_filters(
    second_moment: Tensor,
    out_channels: int,
    kernel_shape: tuple[int, int, int],
    *,
    eps: float = WHITENING_EPS,
) -> Tensor:
    """Convolution filters that whiten patches with this (mean) second-moment matrix.

    Args:
        second_moment: ``(d, d)`` mean of ``p p^T`` over patches.
        out_channels: Filters to return.
        kernel_shape: ``(C, kh, kw)`` with ``C * kh * kw = d``.
        eps: Added to each eigenvalue before its inverse square root.

    Returns:
        ``(out_channels, C, kh, kw)`` float32 filters: the whitened eigenvectors, largest
        eigenvalue first, then their negatives; repeated under fixed random rotations when
        ``out_channels > 2 d``, or only the leading ``out_channels / 2`` when fewer.
    """
    dim = second_moment.shape[0]
    # float64 on the CPU: a stable basis also for directions of tiny variance.
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.detach().double().cpu())
    order = eigenvalues.argsort(descending=True)
    basis = eigenvectors[:, order].T / (eigenvalues[order].clamp(min=0) + eps).sqrt()[:, None]
    if out_channels <= 2 * dim:
        leading = basis[: (out_channels + 1) // 2]
        blocks = [leading, -leading]
    else:
        blocks = [basis, -basis]
        rotations = torch.Generator().manual_seed(0)
        while 2 * dim * (len(blocks) // 2) < out_channels:
            random = torch.randn(dim, dim, generator=rotations, dtype=basis.dtype)
            rotated = torch.linalg.qr(random).Q @ basis
            blocks += [rotated, -rotated]
    filters = torch.cat(blocks)[:out_channels]
    return filters.reshape(out_channels, *kernel_shape).float()


@torch.no_grad()
def whiten_convolution_(conv: nn.Conv2d, images: Tensor, *, eps: float = WHITENING_EPS) -> None:
    """Set ``conv``'s weight to whiten the patches of ``images``, in place.

    Under ``torch.distributed`` the second moment is summed over every rank's images first,
    so each rank gets the filters one process would compute from all of them (rank 0's copy is
    broadcast, so they agree bit for bit). The weight's
    ``requires_grad`` is left to the caller (the speedruns freeze it). A bias is kept.

    Args:
        conv: An ungrouped 2-D convolution.
        images: ``(B, C, H, W)`` images as the network sees them (normalised).
        eps: Added to each eigenvalue before its inverse square root.
    """
    if conv.groups != 1:
        raise ValueError("a grouped convolution cannot whiten its input patches")
    kernel = (conv.kernel_size[0], conv.kernel_size[1])
    total, count = patch_second_moment(images, kernel)
    total = global_sum(total)
    count = int(global_sum(torch.tensor(float(count), device=total.device)).item())
    filters = whitening_filters(
        total / count, conv.out_channels, (conv.in_channels, *kernel), eps=eps
    )
    filters = filters.to(conv.weight.device, conv.weight.dtype)
    if world_size() > 1:
        # The same filters on every rank, bit for bit: DDP never syncs a frozen weight.
        dist.broadcast(filters, src=0)
    conv.weight.copy_(filters)
