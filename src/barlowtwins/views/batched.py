"""Batched Barlow Twins augmentation with independent random parameters per sample.

torchvision's ``transforms.v2`` applied to a batch draws *one* set of parameters for the whole
batch (one crop box, one flip decision, ...), which would give every image of a batch the same
augmentation. :class:`BatchedBarlowTwinsAugment` applies the views of
:func:`barlow_twins_views` (paper appendix A) to a whole batch on its own device, drawing every
parameter per sample as tensors, so it can run in the training step instead of in DataLoader
workers.

How each operation relates to torchvision's per-sample pipeline
(:class:`barlowtwins.views.pil.BarlowTwinsTransform`):

* Random resized crop: crop boxes follow ``RandomResizedCrop``'s sampling (area fraction
  uniform, log aspect ratio uniform, ten trials, centre-crop fallback) on integer pixel boxes
  of each sample's *source* image, the whole of it: a dataset holds each image stretched to a
  square canvas and knows its source size (``sizes``), so a box is drawn in the source's
  pixels and read from the canvas at the two axes' scales (see ``boxes_on_canvas``).
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from barlowtwins.views.kernels import (
    CROP_UNIFORMS,
    ERASE_UNIFORMS,
    JitterStep,
    boxes_on_canvas,
    coin_flips,
    color_jitter,
    crop_axis_map,
    erase,
    gaussian_blur,
    grayscale,
    on_subset,
    resize_each,
    resized_crop_grid,
    sample_crop_boxes,
    sample_erase_boxes,
    sample_jitter_steps,
    sample_shifts,
    solarize,
    translate,
)
from barlowtwins.views.view_config import (
    ViewConfig,
    barlow_twins_views,
    blur_kernel_size,
    max_shift,
    resolve_normalization,
)

# Float elements per CPU chunk (8 MiB): large enough to amortise per-operation overhead,
# small enough to stay in cache and be recycled by the allocator.
_CPU_CHUNK_ELEMENTS = 1 << 21
# Smallest view side that is resized sample by sample on CPU. Below it the per-call overhead
# of 2 x B small resizes outweighs their work and one grid_sample per chunk is faster (whole
# forward: 1.04x at 64 px, 4x for the resize alone at 32 px); above it the per-sample uint8
# resize wins (forward 1.1x at 96 and 128 px; the resize alone is 6x faster at 224 px).
_PER_SAMPLE_RESIZE_MIN = 96
# Columns of the single uniform draw per sample: crop (4 per trial), flip, jitter on/off,
# four jitter factors, four order keys, grayscale, blur on/off, blur sigma, solarize, two
# shifts, erase on/off, erase box (4 per trial). Public, so that tests can draw the same
# layout.
UNIFORMS_PER_SAMPLE = CROP_UNIFORMS + 17 + ERASE_UNIFORMS


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
    jitter: list[JitterStep]
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
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        sizes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return two normalised views of a batch (no gradient flows through them).

        Args:
            images: uint8 images in [0, 255] or floating images in [0, 1], shape (B, C, H, W).
            generator: Source of randomness on the images' device; torch's default one for
                that device when None.
            sizes: ``(B, 2)`` height and width of the source image that each sample holds
                stretched to its ``H x W`` canvas (see :class:`barlowtwins.data.ImageDataset`):
                crops are drawn on the source, as ``RandomResizedCrop`` on the whole image,
                and read from the canvas. None: each sample is its own source.

        Returns:
            Two contiguous float32 tensors of shape (B, C, image_size, image_size).

        Raises:
            ValueError: If the images or the generator do not fit (see the messages).
        """
        self._check_inputs(images, generator)
        params_a = self._sample(images, self.view_a, generator, sizes)
        params_b = self._sample(images, self.view_b, generator, sizes)
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
        sizes: Tensor | None = None,
    ) -> Tensor:
        """Apply one view to a batch and return it before normalisation, in [0, 1].

        Args:
            images_float01: Images of shape (B, C, H, W), floating in [0, 1] (uint8 in
                [0, 255] is accepted too).
            config: The view's configuration.
            generator: Source of randomness on the images' device.
            sizes: Each sample's source size, as for :meth:`forward`.

        Returns:
            A contiguous float32 tensor of shape (B, C, image_size, image_size).

        Raises:
            ValueError: If the images or the generator do not fit (see the messages).
        """
        self._check_inputs(images_float01, generator)
        params = self._sample(images_float01, config, generator, sizes)
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
        self,
        images: Tensor,
        config: ViewConfig,
        generator: torch.Generator | None,
        sizes: Tensor | None,
    ) -> _ViewParams:
        """Draw every random parameter of one view for each sample of the batch."""
        batch, _, height, width = images.shape
        canvas = torch.tensor([height, width], device=images.device)
        sources = canvas.expand(batch, 2) if sizes is None else sizes.to(images.device)
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
            boxes=boxes_on_canvas(
                torch.stack(sample_crop_boxes(crop, sources, config), dim=1),
                sources,
                (height, width),
            ),
            shifts=sample_shifts(rest[:, 14:16], largest_shift),
            largest_shift=largest_shift,
            erase=(
                sample_erase_boxes(rest[:, 17:], height=self.image_size, width=self.image_size)
                * (rest[:, 16:17] < config.erase_prob)
                if config.erase_prob > 0
                else None
            ),
            flip=flip < config.hflip_prob,
            jitter=sample_jitter_steps(config, self.channels, jitter_on, factors, order_keys),
            grayscale=coin_flips(gray_u, gray_prob),
            blur=coin_flips(blur_u, config.blur_prob),
            sigma=low + (high - low) * sigma_u,
            solarize=coin_flips(solarize_u, config.solarize_prob),
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
        x = color_jitter(x, params.jitter, rows, chunk.scale)
        if params.grayscale is not None:
            x = on_subset(x, params.grayscale[rows], grayscale)
        if params.blur is not None:
            blur = functools.partial(gaussian_blur, kernel_size=self.blur_kernel_size)
            x = on_subset(x, params.blur[rows], blur, params.sigma[rows])
        if params.solarize is not None:
            x = on_subset(x, params.solarize[rows], solarize)
        if params.erase is not None:
            x = erase(x, params.erase[rows], self._mean.to(x.device))
        return x
