"""Unpaired X/Y image streams from tar shards (webdataset), augmentation, and the fixed test images.

X and Y are read independently (unpaired) and zipped into batches {"x": [N, 3, H, W], "y": [N, 3, H, W]} in
[-1, 1]. All randomness (shard order, shuffle buffer, augmentation) derives from (seed, rank, domain, epoch).
Each rank keeps every world_size-th sample of each domain's stream, so ranks see disjoint data.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from shards.manifest import read_manifest, split_urls
from trainer.config import DataConfig

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def decode_image(sample: dict[str, Any], where: str) -> torch.Tensor:
    """The sample's image as a float tensor [3, H, W] in [-1, 1]; grey and RGBA images are converted to RGB."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
            array = torch.from_numpy(np.asarray(image).copy())  # [H, W, 3] uint8
            return array.permute(2, 0, 1).float().div(127.5).sub(1.0)
    raise ValueError(f"{where}: sample {sample.get('__key__')!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")


def augment(image: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Resize to load_size, random crop to crop_size, random flip and rotation (as configured)."""
    image = resize(image, cfg.load_size)
    if cfg.rotation_deg > 0:
        angle = (torch.rand((), generator=generator).item() * 2 - 1) * math.radians(cfg.rotation_deg)
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
        grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
        image = F.grid_sample(image[None], grid, padding_mode="reflection", align_corners=False)[0]
    top = int(torch.randint(cfg.load_size - cfg.crop_size + 1, (), generator=generator))
    left = int(torch.randint(cfg.load_size - cfg.crop_size + 1, (), generator=generator))
    image = image[:, top : top + cfg.crop_size, left : left + cfg.crop_size]
    if cfg.flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    return image


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of [C, H, W] to [C, size, size]; a no-op when already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    # Shard order and splitting are decided by the caller, so webdataset must not shuffle or split again.
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    yield from dataset


class UnpairedStream:
    """Endless batches of unpaired, augmented training images for one rank."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        manifest = read_manifest(cfg.root)
        self.urls = {domain: split_urls(cfg.root, manifest, f"{domain}-train") for domain in ("x", "y")}
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def _domain(self, domain: str) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 65_537 + self.rank * 2 + "xy".index(domain))
        epoch = 0
        while True:
            order = random.Random(f"{self.seed}-{domain}-{epoch}")
            urls = list(self.urls[domain])
            order.shuffle(urls)  # same shard order on every rank; ranks then take disjoint samples
            buffer: list[dict[str, Any]] = []
            shuffle = random.Random(f"{self.seed}-{domain}-{epoch}-{self.rank}")
            for position, sample in enumerate(_raw_samples(urls)):
                if position % self.world_size != self.rank:
                    continue
                buffer.append(sample)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield self._prepare(buffer.pop(shuffle.randrange(len(buffer))), generator)
            shuffle.shuffle(buffer)
            for sample in buffer:
                yield self._prepare(sample, generator)
            epoch += 1

    def _prepare(self, sample: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return augment(decode_image(sample, sample.get("__url__", "shard")), self.cfg, generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        xs, ys = self._domain("x"), self._domain("y")
        while True:
            x = torch.stack([next(xs) for _ in range(self.batch_size)])
            y = torch.stack([next(ys) for _ in range(self.batch_size)])
            yield {"x": x, "y": y}


def load_test_images(root: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Up to `count` test images of each domain, resized to size x size, without augmentation.

    Returns:
        (x [N, 3, size, size], y [N, 3, size, size], paired), where paired means y[k] = T(x[k]) (synthetic data),
        or None when the dataset has no x-test/y-test splits.
    """
    manifest = read_manifest(root)
    if count == 0 or not {"x-test", "y-test"} <= set(manifest["splits"]):
        return None
    images = {}
    for domain in ("x", "y"):
        split = f"{domain}-test"
        samples = []
        for sample in _raw_samples(split_urls(root, manifest, split)):
            samples.append(resize(decode_image(sample, str(Path(root) / split)), size))
            if len(samples) == count:
                break
        images[domain] = torch.stack(samples)
    paired = bool(manifest.get("synthetic", {}).get("paired_test", False))
    return images["x"], images["y"], paired
