"""From a sample to training pixels: decoding (bounded, counting bad samples), the optional extra channels, and
the seeded augmentation (resize, crop, flip, warp)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shards.decode import BadSample, decode_extra, decode_image, image_extension
from shards.pixels import RGB8, PixelFormat
from trainer.config.sections import DataConfig
from trainer.data.health import LOST, BadSampleCounter


def pixel_tensor(pixels: np.ndarray) -> torch.Tensor:
    """[H, W, C] uint8 or uint16 as [C, H, W] uint8 or int32 (16-bit values; torch computes little on uint16)."""
    if pixels.dtype == np.uint16:
        return torch.from_numpy(pixels.astype(np.int32)).permute(2, 0, 1)
    with warnings.catch_warnings():
        # A read-only view: augment() copies only the crop it keeps, never writes into this.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels).permute(2, 0, 1)


def decode(
    sample: dict[str, Any], extra: str, max_pixels: int, pixel_format: PixelFormat = RGB8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sample's image as [C, H, W] of `pixel_format` (see `pixel_tensor`; for 8-bit RGB, grey/RGBA/palette
    images are converted) and its extra, if configured: hist -> float [24] (8-bin histograms of R, G, B), label ->
    uint8 [1, H, W].

    Raises:
        BadSample: a part is missing or does not decode (images over `max_pixels` or of another format included).
    """
    tensor = pixel_tensor(decode_image(sample[image_extension(sample)], pixel_format, max_pixels))
    if extra == "none":
        return tensor, None
    value = torch.from_numpy(decode_extra(sample, extra, max_pixels).copy())
    return tensor, value if extra == "hist" else value[None]


def decode_or_count(
    sample: dict[str, Any], extra: str, bad: BadSampleCounter, max_pixels: int, pixel_format: PixelFormat = RGB8
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`decode`, but a bad sample (a part missing or not decoding, or a placeholder for a lost one) is counted in
    `bad` and gives None."""
    if LOST in sample:
        bad.counts[sample[LOST]] += 1  # its shard's line in the log says why
        return None
    try:
        return decode(sample, extra, max_pixels, pixel_format)
    except BadSample as err:
        bad.add(err.kind, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')} ({err})")
    return None


def augment(
    image: torch.Tensor, label: torch.Tensor | None, cfg: DataConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize to load_size (times a random zoom), rotate, random-crop crop_size and flip; pixels of one integer
    type in and out.
    A label map gets the same geometry with nearest-neighbour sampling."""
    size = cfg.load_size
    if cfg.scale_min < 1:
        zoom = cfg.scale_min + (1 - cfg.scale_min) * torch.rand((), generator=generator).item()
        size = max(cfg.crop_size, round(cfg.load_size * zoom))
    image = resize(image, size)
    label = None if label is None else resize(label, size, nearest=True)
    if cfg.rotation_deg > 0:
        angle = math.radians((torch.rand((), generator=generator).item() * 2 - 1) * cfg.rotation_deg)
        theta = torch.tensor([[[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]]])
        image = _warp(image, theta, "bilinear")
        label = None if label is None else _warp(label, theta, "nearest")
    top = int(torch.randint(size - cfg.crop_size + 1, (), generator=generator))
    left = int(torch.randint(size - cfg.crop_size + 1, (), generator=generator))
    crop = (slice(None), slice(top, top + cfg.crop_size), slice(left, left + cfg.crop_size))
    image, label = image[crop], None if label is None else label[crop]
    if cfg.flip and torch.rand((), generator=generator) < 0.5:
        image, label = image.flip(-1), None if label is None else label.flip(-1)
    return image.contiguous(), None if label is None else label.contiguous()


def _warp(image: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="reflection", align_corners=False)[0]
    return out.round().clamp(0, PIXEL_MAX[image.dtype]).to(image.dtype)


PIXEL_MAX = {torch.uint8: 255, torch.int32: 65535}
"""The largest value of the pixel types images are carried in (int32 holds 16-bit pixels)."""


def resize(image: torch.Tensor, size: int, nearest: bool = False) -> torch.Tensor:
    """Resize [C, H, W] integer pixels to [C, size, size] (antialiased bilinear, or nearest for label maps)."""
    if image.shape[-2:] == (size, size):
        return image
    if nearest:
        return F.interpolate(image[None].float(), size=(size, size), mode="nearest")[0].to(image.dtype)
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, PIXEL_MAX[image.dtype]).to(image.dtype)


def extra_channels(extra: torch.Tensor, kind: str, size: int | tuple[int, int]) -> torch.Tensor:
    """Generator extra-input channels from a batch's extras: hist [B, 24] -> [B, 24, H, W] maps (`size`: the side
    of square images, or (H, W)); label uint8 [B, 1, H, W] -> [-1, 1]."""
    if kind == "hist":
        height, width = (size, size) if isinstance(size, int) else size
        return extra.float()[:, :, None, None].expand(-1, -1, height, width)
    return extra.float().div(127.5).sub(1.0)
