"""Batched Barlow Twins augmentation with independent random parameters per sample.

torchvision's ``transforms.v2`` applied to a batch draws *one* set of parameters for the whole
batch (one crop box, one flip decision, ...), which would give every image of a batch the same
augmentation. :class:`BatchedBarlowTwinsAugment` applies the views of
:func:`barlow_twins_views` (paper appendix A) to a whole batch on its own device, drawing every
parameter per sample as tensors, so it can run in the training step instead of in DataLoader
workers.

How each operation relates to torchvision's per-sample pipeline
(:class:`barlowtwins.views.transforms.BarlowTwinsTransform`):

* Random resized crop: crop boxes follow ``RandomResizedCrop``'s sampling (area fraction
  uniform, log aspect ratio uniform, ten trials, centre-crop fallback) on integer pixel boxes.
  On CPU, for views larger than ``_PER_SAMPLE_RESIZE_MIN`` pixels, each sample's box is sliced
  and resized on its own with bilinear antialiased ``interpolate``, which equals torchvision's
  ``resized_crop(..., BILINEAR, antialias=True)`` (its default) of the box; uint8 images stay
  uint8 until after the resize, as torchvision's and PIL's resizes do, which takes PyTorch's
  vectorised uint8 kernel. Smaller views and CUDA batches are cropped, flipped and resized by
  one ``grid_sample`` per chunk instead, which equals the crop + bilinear resize *without*
  antialiasing: identical when crops are enlarged (always the case for views as large as the
  images, e.g. 32 px views of 32 px images), visibly different only for crops shrunk by more
  than ~2x. The paper's bicubic resize differs slightly from both.
* Translation (``translate`` > 0): every sample's cropped view moves by its own whole-pixel
  shift, uniform in ``[-m, m]`` per axis, with a black border, which equals torchvision's
  ``RandomCrop(image_size, padding=m, fill=0)`` after the crop.
* Random erasing (``erase_prob`` > 0) draws each sample's box as torchvision's
  ``RandomErasing`` and sets it to the normalisation mean, which is 0 in the normalised view,
  as ``RandomErasing(value=0)`` after ``Normalize``.
* Colour jitter equals torchvision's ``ColorJitter`` for every sample: factors uniform in
  ``[max(0, 1 - s), 1 + s]`` (hue in ``[-h, h]``), the operations in a random order drawn
  *per sample*, values clipped to [0, 1] after each one. Brightness, contrast and saturation
  all blend the image towards a target (black, its mean luma, its luma plane), so each position
  of the order is one batched ``lerp`` with per-sample weights and targets; the samples whose
  operation at that position is hue get torchvision's HSV hue shift, computed directly on RGB.
* Grayscale, Gaussian blur (two 1-D passes with per-sample sigma, reflect padding,
  torchvision's kernel truncated at 4 sigma) and solarisation (``x >= 0.5`` ->
  ``1 - x``) run only on the samples that drew them.

On CPU the batch is processed in chunks of a few megabytes, so intermediate tensors stay in
cache and are recycled by the allocator instead of being freshly mapped for every operation.
All parameters are drawn for the whole batch before any chunk is processed, and every
operation's result for a sample depends only on that sample, so results do not depend on the
chunk size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from barlowtwins.views.transforms import (
    ViewConfig,
    barlow_twins_views,
    blur_kernel_size,
    max_shift,
    resolve_normalization,
)

# ITU-R 601 luma weights, as in torchvision's rgb_to_grayscale (used by grayscale, saturation
# and contrast).
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# RandomResizedCrop's number of crop trials before it falls back to a centre crop.
_CROP_TRIALS = 10
# Blur taps further than this many sigmas from the centre are dropped: they carry < 1e-4 of
# the kernel's mass, far below the 1/255 resolution of the input, and cost a third of the work
# at 224 px (torchvision's 23-tap kernel spans 5.5 sigma at the largest sigma of 2).
_BLUR_TRUNCATE_SIGMAS = 4.0
# Float elements per CPU chunk (8 MiB): large enough to amortise per-operation overhead,
# small enough to stay in cache and be recycled by the allocator.
_CPU_CHUNK_ELEMENTS = 1 << 21
# Smallest view side that is resized sample by sample on CPU. Below it the per-call overhead
# of 2 x B small resizes outweighs their work and one grid_sample per chunk is faster (whole
# forward: 1.04x at 64 px, 4x for the resize alone at 32 px); above it the per-sample uint8
# resize wins (forward 1.1x at 96 and 128 px; the resize alone is 6x faster at 224 px).
_PER_SAMPLE_RESIZE_MIN = 96
# RandomErasing's trials (and its area and aspect ranges) before it leaves the image as is.
_ERASE_TRIALS = 10
_ERASE_SCALE = (0.02, 0.33)
_ERASE_RATIO = (0.3, 3.3)
# Columns of the single uniform draw per sample: crop (4 per trial), flip, jitter on/off,
# four jitter factors, four order keys, grayscale, blur on/off, blur sigma, solarize, two
# shifts, erase on/off, erase box (4 per trial). Public, like the kernels below, so that
# tests can draw the same layout.
CROP_UNIFORMS = 4 * _CROP_TRIALS
ERASE_UNIFORMS = 4 * _ERASE_TRIALS
UNIFORMS_PER_SAMPLE = CROP_UNIFORMS + 17 + ERASE_UNIFORMS


@dataclass
class _JitterStep:
    """One position of the per-sample jitter order.

    Brightness, contrast and saturation are all ``clip(lerp(x, target, w), 0, 1)`` with
    ``target = b * gray + c * mean_gray`` and per-sample coefficients ``(w, b, c)``: brightness
    ``(1 - f, 0, 0)`` (target black), contrast ``(1 - f, 0, 1)``, saturation ``(1 - f, 1, 0)``,
    and ``(0, 0, 0)`` for samples with another operation here (``gray`` is the luma plane,
    ``mean_gray`` its mean). Samples flagged in ``hue`` get their HSV hue shifted by
    ``hue_shift`` turns.
    """

    blend: Tensor | None  # (B, 3): w, b, c; None when no sample gets a blend operation
    hue: Tensor | None  # (B,) bool
    hue_shift: Tensor | None  # (B,)


@dataclass
class _Chunk:
    """A slice of the batch, with scratch space shared by all chunks of a call.

    ``raw`` holds the samples of the chunk as the resize reads them: float32 for
    ``grid_sample``, or the input's own dtype (channels-last for uint8) for the per-sample
    resize, which writes float32 into ``resized``. ``scale`` maps either to [0, 1].
    """

    rows: slice
    raw: Tensor  # (n, C, H, W)
    scale: float
    grid: Tensor | None  # (n, size, size, 2) scratch for the sampling grid
    resized: Tensor | None  # (n, C, size, size) scratch for the per-sample resize


@dataclass
class _ViewParams:
    """Per-sample random parameters of one view of a batch."""

    boxes: Tensor  # (B, 4): top, left, height, width of the crop, integer-valued
    shifts: Tensor | None  # (B, 2): whole-pixel shift down and right, None without translation
    largest_shift: int
    flip: Tensor  # (B,) bool
    jitter: list[_JitterStep]
    grayscale: Tensor | None  # (B,) bool
    blur: Tensor | None  # (B,) bool
    sigma: Tensor  # (B,)
    solarize: Tensor | None  # (B,) bool
    erase: Tensor | None  # (B, 4): top, left, height, width; 0 x 0 where nothing is erased


class BatchedBarlowTwinsAugment(nn.Module):
    """The two Barlow Twins views of a whole batch, with per-sample random parameters.

    Works on the batch's device (CPU or CUDA) in pure torch. See the module docstring for how
    each operation relates to the per-sample torchvision pipeline.

    Args:
        image_size: Side of the square output views in pixels.
        channels: 1 (grayscale) or 3 (RGB); inputs must have this many channels.
        view_a: Configuration of the first view; defaults to :func:`barlow_twins_views`.
        view_b: Configuration of the second view; defaults to :func:`barlow_twins_views`.
        mean: Per-channel normalisation mean; defaults to :func:`default_normalization`.
        std: Per-channel normalisation std; defaults to :func:`default_normalization`.

    Examples:
        >>> augment = BatchedBarlowTwinsAugment(image_size=32)
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> view_a, view_b = augment(images)
        >>> view_a.shape
        torch.Size([8, 3, 32, 32])
    """

    _inv_std: Tensor
    _shift: Tensor
    _mean: Tensor

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        view_a: ViewConfig | None = None,
        view_b: ViewConfig | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        default_a, default_b = barlow_twins_views(image_size, channels)
        self.image_size = int(image_size)
        self.channels = channels
        self.view_a = default_a if view_a is None else view_a
        self.view_b = default_b if view_b is None else view_b
        self.mean, self.std = resolve_normalization(channels, mean, std)
        self.blur_kernel_size = blur_kernel_size(self.image_size)
        # Normalisation as a multiply and an add: (x - mean) / std = x * (1 / std) - mean / std.
        inv_std = torch.tensor([1.0 / s for s in self.std]).view(1, channels, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)]).view(
            1, channels, 1, 1
        )
        self.register_buffer("_inv_std", inv_std, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        self.register_buffer("_mean", torch.tensor(self.mean), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, channels={self.channels}, view_a={self.view_a}, "
            f"view_b={self.view_b}, mean={self.mean}, std={self.std}"
        )

    @torch.no_grad()
    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return two normalised views of a batch (no gradient flows through them).

        Args:
            images: uint8 images in [0, 255] or floating images in [0, 1], shape (B, C, H, W).
            generator: Source of randomness on the images' device; torch's default one for
                that device when None.

        Returns:
            Two contiguous float32 tensors of shape (B, C, image_size, image_size).

        Raises:
            ValueError: If the images or the generator do not fit (see the messages).
        """
        self._check_inputs(images, generator)
        params_a = self._sample(images, self.view_a, generator)
        params_b = self._sample(images, self.view_b, generator)
        views = self._empty_views(images, 2)
        shift = self._shift.to(images.device)
        inv_std = self._inv_std.to(images.device)
        for chunk in self._chunks(images):
            for params, out in ((params_a, views[0]), (params_b, views[1])):
                view = self._augment_chunk(chunk, params)
                # A multiply and an in-place add run twice as fast as a broadcast addcmul.
                torch.mul(view, inv_std, out=out[chunk.rows]).add_(shift)
        return views[0], views[1]

    @torch.no_grad()
    def augment_view(
        self,
        images_float01: Tensor,
        config: ViewConfig,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Apply one view to a batch and return it before normalisation, in [0, 1].

        Args:
            images_float01: Images of shape (B, C, H, W), floating in [0, 1] (uint8 in
                [0, 255] is accepted too).
            config: The view's configuration.
            generator: Source of randomness on the images' device.

        Returns:
            A contiguous float32 tensor of shape (B, C, image_size, image_size).

        Raises:
            ValueError: If the images or the generator do not fit (see the messages).
        """
        self._check_inputs(images_float01, generator)
        params = self._sample(images_float01, config, generator)
        (out,) = self._empty_views(images_float01, 1)
        for chunk in self._chunks(images_float01):
            out[chunk.rows] = self._augment_chunk(chunk, params)
        return out

    def _check_inputs(self, images: Tensor, generator: torch.Generator | None) -> None:
        """Raise ValueError unless ``images`` is a (B, C, H, W) batch this module can augment."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape (B, C, H, W), got {shape}")
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images must have {self.channels} channels, got shape {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        if images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the images are on {images.device}; "
                "pass a generator of the images' device"
            )

    def _empty_views(self, images: Tensor, count: int) -> list[Tensor]:
        """Allocate ``count`` float32 output batches on the images' device."""
        shape = (images.shape[0], self.channels, self.image_size, self.image_size)
        return [torch.empty(shape, dtype=torch.float32, device=images.device) for _ in range(count)]

    def _resizes_per_sample(self, images: Tensor) -> bool:
        """Whether crops are resized one sample at a time (see ``_PER_SAMPLE_RESIZE_MIN``)."""
        return images.device.type == "cpu" and self.image_size >= _PER_SAMPLE_RESIZE_MIN

    def _chunks(self, images: Tensor) -> Iterator[_Chunk]:
        """Yield the batch in chunks that share one set of scratch tensors.

        Reusing the scratch tensors across chunks spares the allocator from mapping (and the
        kernel from zero-filling) fresh pages for every chunk.
        """
        batch, channels, height, width = images.shape
        per_sample_resize = self._resizes_per_sample(images)
        out_shape = (channels, self.image_size, self.image_size)
        if images.device.type != "cpu":
            size = max(1, batch)
        elif per_sample_resize:
            # Only the resized views are float: the input is read in place or as uint8.
            size = max(1, min(batch, _CPU_CHUNK_ELEMENTS // math.prod(out_shape)))
        else:
            per_sample = channels * max(height * width, self.image_size**2)
            size = max(1, min(batch, _CPU_CHUNK_ELEMENTS // per_sample))
        scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        if per_sample_resize:
            # The vectorised uint8 resize needs channels-last input.
            raw = (
                torch.empty_like(images[:size], memory_format=torch.channels_last)
                if images.dtype == torch.uint8
                and not images.is_contiguous(memory_format=torch.channels_last)
                else None
            )
            resized = images.new_empty((size, *out_shape), dtype=torch.float32)
            grid = None
        else:
            # empty_like keeps a channels-last input channels-last, which grid_sample reads
            # faster.
            raw = (
                None
                if images.dtype == torch.float32
                else torch.empty_like(images[:size], dtype=torch.float32)
            )
            grid = images.new_empty(
                (size, self.image_size, self.image_size, 2), dtype=torch.float32
            )
            resized = None
        for start in range(0, batch, size):
            part = images[start : start + size]
            n = part.shape[0]
            if raw is not None and per_sample_resize:
                # Stacking the channel planes is ~1.6x faster than a transposing copy_.
                torch.stack(part.unbind(1), dim=-1, out=raw[:n].permute(0, 2, 3, 1))
                part = raw[:n]
            elif raw is not None:
                part = raw[:n].copy_(part)
            yield _Chunk(
                rows=slice(start, start + n),
                raw=part,
                scale=scale,
                grid=None if grid is None else grid[:n],
                resized=None if resized is None else resized[:n],
            )

    def _sample(
        self, images: Tensor, config: ViewConfig, generator: torch.Generator | None
    ) -> _ViewParams:
        """Draw every random parameter of one view for each sample of the batch."""
        batch, _, height, width = images.shape
        uniforms = torch.rand(
            batch,
            UNIFORMS_PER_SAMPLE,
            generator=generator,
            device=images.device,
            dtype=torch.float32,
        )
        crop, rest = uniforms[:, :CROP_UNIFORMS], uniforms[:, CROP_UNIFORMS:]
        flip, jitter_on, factors, order_keys = rest[:, 0], rest[:, 1], rest[:, 2:6], rest[:, 6:10]
        gray_u, blur_u, sigma_u, solarize_u = rest[:, 10], rest[:, 11], rest[:, 12], rest[:, 13]
        largest_shift = max_shift(config.translate, self.image_size)

        # Grayscale leaves a one-channel image unchanged, as in torchvision.
        gray_prob = config.grayscale_prob if self.channels == 3 else 0.0
        low, high = config.blur_sigma
        return _ViewParams(
            boxes=torch.stack(sample_crop_boxes(crop, height, width, config), dim=1),
            shifts=sample_shifts(rest[:, 14:16], largest_shift),
            largest_shift=largest_shift,
            erase=(
                sample_erase_boxes(rest[:, 17:], height=self.image_size, width=self.image_size)
                * (rest[:, 16:17] < config.erase_prob)
                if config.erase_prob > 0
                else None
            ),
            flip=flip < config.hflip_prob,
            jitter=_jitter_steps(config, self.channels, jitter_on, factors, order_keys),
            grayscale=_bernoulli(gray_u, gray_prob),
            blur=_bernoulli(blur_u, config.blur_prob),
            sigma=low + (high - low) * sigma_u,
            solarize=_bernoulli(solarize_u, config.solarize_prob),
        )

    def _augment_chunk(self, chunk: _Chunk, params: _ViewParams) -> Tensor:
        """Apply one view to a chunk of the batch; the result is in [0, 1]."""
        rows = chunk.rows
        boxes, flip = params.boxes[rows], params.flip[rows]
        if chunk.resized is not None:
            x = resize_each(chunk.raw, boxes, flip, chunk.resized)
        else:
            height, width = chunk.raw.shape[2:]
            top, left, crop_h, crop_w = boxes.unbind(1)
            sign = torch.where(flip, -1.0, 1.0)
            grid_x = crop_axis_map(left, crop_w, width, sign)
            grid_y = crop_axis_map(top, crop_h, height, torch.ones_like(sign))
            assert chunk.grid is not None  # chunks that are not resized per sample have one
            x = resized_crop_grid(chunk.raw, grid_x, grid_y, chunk.grid)
        if params.shifts is not None:
            x = translate(x, params.shifts[rows], params.largest_shift)
        x = _color_jitter(x, params.jitter, rows, chunk.scale)
        if params.grayscale is not None:
            x = _on_subset(x, params.grayscale[rows], _grayscale)
        if params.blur is not None:
            blur = functools.partial(gaussian_blur, kernel_size=self.blur_kernel_size)
            x = _on_subset(x, params.blur[rows], blur, params.sigma[rows])
        if params.solarize is not None:
            x = _on_subset(x, params.solarize[rows], _solarize)
        if params.erase is not None:
            x = erase(x, params.erase[rows], self._mean.to(x.device))
        return x


def _bernoulli(uniforms: Tensor, prob: float) -> Tensor | None:
    """Per-sample coin flips with probability ``prob``; None when it is 0 (skip the operation)."""
    return uniforms < prob if prob > 0 else None


def sample_crop_boxes(
    uniforms: Tensor, height: int, width: int, config: ViewConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vectorised ``RandomResizedCrop.get_params``: integer boxes (top, left, h, w) as floats.

    Each sample tries ten (area, log-ratio) draws and keeps the first that fits inside the
    image; samples with none fall back to the largest centred crop within the ratio range.
    """
    u = uniforms.view(-1, _CROP_TRIALS, 4)
    scale_low, scale_high = config.crop_scale
    log_low, log_high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    target_area = height * width * (scale_low + (scale_high - scale_low) * u[..., 0])
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)  # index of the first fitting trial

    def pick(t: Tensor) -> Tensor:
        return t.gather(1, first).squeeze(1)

    crop_w, crop_h = pick(crop_w), pick(crop_h)
    # floor(u * n) with u in [0, 1) is a uniform integer in [0, n); the clamp guards float
    # rounding of u * n up to n.
    top = torch.minimum(torch.floor(pick(u[..., 2]) * (height - crop_h + 1)), height - crop_h)
    left = torch.minimum(torch.floor(pick(u[..., 3]) * (width - crop_w + 1)), width - crop_w)

    fallback_h, fallback_w = _fallback_crop(height, width, config.crop_ratio)
    found = fits.any(dim=1)
    return (
        torch.where(found, top, float((height - fallback_h) // 2)),
        torch.where(found, left, float((width - fallback_w) // 2)),
        torch.where(found, crop_h, float(fallback_h)),
        torch.where(found, crop_w, float(fallback_w)),
    )


def sample_shifts(uniforms: Tensor, largest: int) -> Tensor | None:
    """Whole-pixel shifts uniform in ``[-largest, largest]`` from uniforms of shape (B, 2)."""
    if largest == 0:
        return None
    # As in sample_crop_boxes, the minimum guards float rounding of u * n up to n.
    steps = torch.minimum(torch.floor(uniforms * (2 * largest + 1)), torch.tensor(2.0 * largest))
    return steps.to(torch.int64) - largest


def translate(x: Tensor, shifts: Tensor, largest: int) -> Tensor:
    """Move each sample of ``x`` (n, C, H, W) by its ``shifts`` (n, 2: down, right) in pixels.

    Pixels moved in from outside the image are 0. One gather from the batch padded by
    ``largest`` (at least every ``|shift|``) does the whole batch, whatever the shifts.
    """
    n, channels, height, width = x.shape
    pad = largest
    padded = F.pad(x, (pad, pad, pad, pad))
    # Output pixel (i, j) of a sample shifted by (dy, dx) is input pixel (i - dy, j - dx).
    rows = torch.arange(height, device=x.device) + pad - shifts[:, :1]  # (n, H)
    cols = torch.arange(width, device=x.device) + pad - shifts[:, 1:]  # (n, W)
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(channels, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def sample_erase_boxes(uniforms: Tensor, height: int, width: int) -> Tensor:
    """Vectorised ``RandomErasing.get_params``: (top, left, h, w) per sample, as floats.

    Each sample tries ten (area, log-ratio) draws and keeps the first whose box fits strictly
    inside the image, as torchvision does; a sample with none gets an empty box.
    """
    u = uniforms.view(-1, _ERASE_TRIALS, 4)
    log_low, log_high = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    area = height * width * (_ERASE_SCALE[0] + (_ERASE_SCALE[1] - _ERASE_SCALE[0]) * u[..., 0])
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    # torchvision's RandomErasing takes the aspect ratio as height / width.
    box_h = torch.round(torch.sqrt(area * aspect))
    box_w = torch.round(torch.sqrt(area / aspect))
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)

    def pick(t: Tensor) -> Tensor:
        return t.gather(1, first).squeeze(1)

    box_h, box_w = pick(box_h), pick(box_w)
    top = torch.minimum(torch.floor(pick(u[..., 2]) * (height - box_h + 1)), height - box_h)
    left = torch.minimum(torch.floor(pick(u[..., 3]) * (width - box_w + 1)), width - box_w)
    found = fits.any(dim=1, keepdim=True)
    return torch.stack((top, left, box_h, box_w), dim=1) * found


def erase(x: Tensor, boxes: Tensor, fill: Tensor) -> Tensor:
    """Set each sample's box (top, left, h, w) of ``x`` (n, C, H, W) to ``fill`` (C,)."""
    height, width = x.shape[2:]
    top, left, box_h, box_w = boxes.unbind(1)
    rows = torch.arange(height, device=x.device, dtype=boxes.dtype)
    cols = torch.arange(width, device=x.device, dtype=boxes.dtype)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (n, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (n, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (n, 1, H, W)
    return torch.where(inside, fill.view(1, -1, 1, 1).to(x.dtype), x)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's centre-crop size when no trial fits: (h, w)."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return round(width / ratio[0]), width
    if in_ratio > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def crop_axis_map(start: Tensor, length: Tensor, size: int, sign: Tensor) -> Tensor:
    """Per-sample ``(scale, offset, low, high)`` of one axis of the sampling grid.

    ``grid_sample`` (align_corners=False) maps the normalised coordinates -1 and 1 to the
    outer edges of the image, so output pixel u of n samples the input at
    ``start + (u + 0.5) * length / n - 0.5``, which is the bilinear resize of the crop
    ``[start, start + length)``; a negative ``sign`` mirrors it. Clamping to the centres of the
    crop's first and last pixels (low, high) repeats the crop's edge instead of reading
    outside it, as a resize of the cropped image does.
    """
    return torch.stack(
        (
            sign * length / size,
            (2 * start + length) / size - 1,
            (2 * start + 1) / size - 1,
            (2 * (start + length) - 1) / size - 1,
        ),
        dim=1,
    )


def resized_crop_grid(raw: Tensor, grid_x: Tensor, grid_y: Tensor, grid: Tensor) -> Tensor:
    """Crop, flip and resize every sample in one bilinear ``grid_sample``.

    ``grid`` is scratch space of shape (n, size, size, 2) that receives the sampling grid.
    """
    n, size = grid.shape[:2]
    # Centres of the output pixels in normalised coordinates.
    base = (2 * torch.arange(size, device=raw.device, dtype=torch.float32) + 1) / size - 1

    def axis(params: Tensor) -> Tensor:  # (n, size)
        coords = params[:, 1:2] + params[:, 0:1] * base
        return torch.clamp(coords, params[:, 2:3], params[:, 3:4])

    gx, gy = axis(grid_x), axis(grid_y)  # x varies along the columns only, y along the rows
    torch.stack(
        (gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)),
        dim=-1,
        out=grid,
    )
    return F.grid_sample(raw, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_each(raw: Tensor, boxes: Tensor, flip: Tensor, out: Tensor) -> Tensor:
    """Crop, resize (bilinear, antialiased) and flip each sample on its own into ``out``.

    Equals torchvision's ``resized_crop(..., BILINEAR, antialias=True)`` of each box; uint8
    samples are resized in uint8 (rounded, as torchvision and PIL do) and only then converted
    to float, in ``raw``'s range.
    """
    size = out.shape[2:]
    for i, ((top, left, height, width), flipped) in enumerate(
        zip(boxes.int().tolist(), flip.tolist(), strict=True)
    ):
        crop = raw[i : i + 1, :, top : top + height, left : left + width]
        resized = F.interpolate(crop, size=size, mode="bilinear", antialias=True)
        # Flipping the small uint8 result is cheaper than flipping the float view.
        out[i : i + 1].copy_(resized.flip(-1) if flipped else resized)
    return out


def _jitter_steps(
    config: ViewConfig, channels: int, on_u: Tensor, factor_u: Tensor, order_u: Tensor
) -> list[_JitterStep]:
    """Per-sample parameters of each position of the random jitter order (none if no jitter)."""
    strengths = {"brightness": config.brightness, "contrast": config.contrast}
    if channels == 3:
        # Saturation and hue leave a one-channel image unchanged, as in torchvision.
        strengths.update(saturation=config.saturation, hue=config.hue)
    ops = [name for name, value in strengths.items() if value > 0]
    if config.color_jitter_prob == 0 or not ops:
        return []
    factors = {}
    for column, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        if name in ops:
            s = strengths[name]
            low, high = (-s, s) if name == "hue" else (max(0.0, 1 - s), 1 + s)
            factors[name] = low + (high - low) * factor_u[:, column]
    zero, one = torch.zeros_like(on_u), torch.ones_like(on_u)
    # (weight of the target, weight of the luma plane in it, weight of the mean luma in it).
    coefficients = {
        "brightness": lambda f: (1 - f, zero, zero),
        "contrast": lambda f: (1 - f, zero, one),
        "saturation": lambda f: (1 - f, one, zero),
    }
    on = on_u < config.color_jitter_prob
    # A random permutation per sample: the ranks of i.i.d. uniform keys.
    order = order_u[:, : len(ops)].argsort(dim=1)
    identity = torch.zeros(on_u.shape[0], 3, device=on_u.device)
    steps = []
    for position in range(len(ops)):
        step = _JitterStep(blend=None, hue=None, hue_shift=None)
        blend = identity
        for index, name in enumerate(ops):
            here = on & (order[:, position] == index)
            if name == "hue":
                step.hue, step.hue_shift = here, factors[name]
            else:
                values = torch.stack(coefficients[name](factors[name]), dim=1)
                blend = torch.where(here[:, None], values, blend)
        if ops != ["hue"]:
            step.blend = blend
        steps.append(step)
    return steps


def _color_jitter(x: Tensor, steps: list[_JitterStep], rows: slice, scale: float) -> Tensor:
    """Apply the jitter steps in place to ``x``, samples ``rows`` of the batch.

    ``scale`` maps ``x`` to [0, 1]; it is folded into the first step's coefficients, saving a
    pass over the chunk. Each blend step is ``x.lerp_(target, w)``, one in-place pass over the
    chunk plus the clip, instead of separate products and sums.
    """
    n, channels = x.shape[:2]
    x = x.contiguous()
    if not steps or steps[0].blend is None:
        x = x.mul_(scale) if scale != 1.0 else x
        scale = 1.0
    # A contiguous (n, 1, C) batch of weights: bmm is twice as slow with a stride-0 batch.
    weights = _GRAY_WEIGHTS if channels == 3 else (1.0,)
    luma = torch.tensor(weights, device=x.device).repeat(n, 1, 1)
    for step in steps:
        if step.blend is not None:
            w, b, c = (step.blend[rows, i, None, None] for i in range(3))
            if scale != 1.0:
                # lerp(s * x, t, w) = lerp(x, t', w') with 1 - w' = s * (1 - w) and
                # w' * t' = s * w * t; w' >= 1 - 1.4 / 255 > 0, as 1 - w = f <= 2.
                w_raw = 1 - scale * (1 - w)
                factor = scale * w / w_raw
                w, b, c, scale = w_raw, b * factor, c * factor, 1.0
            flat = x.view(n, channels, -1)
            # torchvision's saturation blends towards the luma plane, contrast towards its mean.
            target = torch.bmm(luma, flat)
            shift = target.mean(dim=2, keepdim=True).mul_(c)
            flat.lerp_(target.mul_(b).add_(shift), w).clamp_(0.0, 1.0)
        if step.hue is not None and step.hue_shift is not None:
            x = _on_subset(x, step.hue[rows], shift_hue, step.hue_shift[rows])
    return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Shift each sample's HSV hue by ``shift`` turns, as torchvision's ``adjust_hue``.

    Works directly on RGB: the shift keeps each pixel's maximum and minimum channel (HSV value
    and saturation) and moves its position on the hue hexagon, measured in sextants. Branches
    are selected with 0/1 float masks and ``lerp``, which is several times faster on CPU than
    ``torch.where``.
    """
    r, g, b = x.unbind(dim=1)
    high, low = x.amax(dim=1), x.amin(dim=1)
    chroma = high - low
    # torchvision's branches, red first: hue = (g - b) / c, 2 + (b - r) / c or 4 + (r - g) / c.
    mask = torch.empty_like(high)
    hue = (r - g).add_(chroma, alpha=4)
    hue.lerp_((b - r).add_(chroma, alpha=2), torch.eq(high, g, out=mask))
    hue.lerp_(g - b, torch.eq(high, r, out=mask))
    # Gray pixels have a zero numerator; any positive divisor keeps their hue at 0. The hue is
    # then counted in turns, shifted, and is > -0.67 because |shift| <= 0.5 (ViewConfig.hue).
    hue.div_(chroma.clamp(min=1e-12).mul_(6)).add_(shift[:, None, None])
    # Each channel is a trapezoid wave of the hue (1 over two sextants, 0 over two), the three
    # waves a third of a turn apart; all three in one broadcast. The +1 keeps frac's argument
    # positive, where it equals the remainder modulo one turn.
    phases = torch.tensor([1.0, 5 / 3, 4 / 3], device=x.device).view(1, 3, 1, 1)
    level = (hue.unsqueeze(1) + phases).frac_().sub_(0.5).abs_().mul_(6).sub_(1).clamp_(0, 1)
    return level.mul_(chroma.unsqueeze(1)).add_(low.unsqueeze(1))


def _on_subset(x: Tensor, mask: Tensor, op: Callable[..., Tensor], *values: Tensor) -> Tensor:
    """Replace the samples where ``mask`` holds by ``op(samples, *their values)``.

    Every tensor in ``values`` holds one value per sample of ``x``.
    """
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return op(x, *values)
    picked = op(x.index_select(0, index), *(v.index_select(0, index) for v in values))
    return x.index_copy_(0, index, picked)


def _grayscale(x: Tensor) -> Tensor:
    """Luma replicated over the three channels, as torchvision's grayscale."""
    gray = x[:, 0] * _GRAY_WEIGHTS[0]
    gray.add_(x[:, 1], alpha=_GRAY_WEIGHTS[1]).add_(x[:, 2], alpha=_GRAY_WEIGHTS[2])
    return gray.unsqueeze(1).expand_as(x).contiguous()


def _solarize(x: Tensor) -> Tensor:
    """Invert the values at or above one half (the 8-bit threshold 128)."""
    return torch.where(x >= 0.5, 1.0 - x, x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur of each sample with its own sigma, as torchvision's ``gaussian_blur``.

    torchvision convolves with the outer product of a 1-D kernel over a reflect-padded image;
    the two 1-D passes here (rows, then columns) compute the same thing.
    Each sample's kernel is truncated at its own radius, 4 sigma (see
    ``_BLUR_TRUNCATE_SIGMAS``) capped at the kernel size and the image size, so a sample's
    result does not depend on the others. Samples of equal radius are convolved together, so
    small sigmas cost few taps.
    """
    height, width = x.shape[2:]
    cap = min(kernel_size // 2, height - 1, width - 1)
    if cap < 1:
        return x
    radii = torch.ceil(_BLUR_TRUNCATE_SIGMAS * sigma).clamp_(1, cap).to(torch.int64)
    groups = radii.unique().tolist()
    if len(groups) == 1:
        return gaussian_blur_radius(x, sigma, groups[0])
    # A fresh output keeps the input intact, as for a single group.
    out = torch.empty_like(x)
    for radius in groups:
        index = (radii == radius).nonzero().squeeze(1)
        blurred = gaussian_blur_radius(
            x.index_select(0, index), sigma.index_select(0, index), radius
        )
        out.index_copy_(0, index, blurred)
    return out


def gaussian_blur_radius(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur every sample of ``x`` with its own sigma and a kernel of ``2 * radius + 1`` taps.

    Each 1-D pass is a sum of shifted slices of the reflect-padded image, one in-place
    ``addcmul_`` per tap with per-sample weights. Every slice is a plain strided view; on CPU
    this ran 1.2-1.4x faster than the equivalent depthwise ``conv2d`` with one group per
    sample and channel (the whole two-view augmentation at 224 px: ~10 %).
    """
    height, width = x.shape[2:]
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    weights = kernel[:, None, :, None, None].unbind(2)  # per tap: (n, 1, 1, 1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = padded[..., :width] * weights[0]
    for shift in range(1, 2 * radius + 1):
        rows.addcmul_(padded[..., shift : shift + width], weights[shift])
    out = rows[:, :, :height] * weights[0]
    for shift in range(1, 2 * radius + 1):
        out.addcmul_(rows[:, :, shift : shift + height], weights[shift])
    return out
