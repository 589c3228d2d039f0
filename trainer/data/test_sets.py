"""The test split (x-test/y-test): the images evaluation and the sample grids use, split over ranks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from shards.manifest import read_manifest, split_urls
from shards.pixels import RGB8, PixelFormat
from shards.urls import ShardsError
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig
from trainer.data.augment import decode_or_count, extra_channels, resize
from trainer.data.formats import to_unit_range
from trainer.data.health import BadSampleCounter
from trainer.data.plan import DOMAINS, data_root, reading
from trainer.data.stream import shard_samples


@dataclass
class TestSet:
    """One rank's share of the test images (every world_size-th of the first `total`), resized, in [-1, 1] on the
    CPU; y[k] = T(x[k]) when `paired` (synthetic data), and then x and y hold the same keys."""

    x: torch.Tensor  # [n, C_x, H, W]
    y: torch.Tensor  # [m, C_y, H, W]; m == n when paired
    extra_x: torch.Tensor | None  # [n, C, H, W] generator extra channels, or None
    extra_y: torch.Tensor | None
    paired: bool
    total_x: int  # test images of X over all ranks' shares (the largest share is ceil(total_x / world_size))
    total_y: int


def load_test_images(
    cfg: DataConfig,
    count: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    formats: dict[str, PixelFormat] | None = None,
) -> TestSet | None:
    """This rank's share of the first `count` samples of each test split of data.root in each domain's format
    (`formats`; 8-bit RGB by default); bad samples are skipped, paired splits keep only keys readable in both.
    None without test splits or with count 0."""
    formats = formats or {d: RGB8 for d in DOMAINS}
    if not cfg.root or count == 0:
        return None
    root = data_root(cfg.root, cfg.load_size)
    try:
        manifest = read_manifest(root, reading(cfg).remote)
    except ShardsError as err:
        raise ConfigError(str(err)) from None
    if not {"x-test", "y-test"} <= set(manifest["splits"]):
        return None
    synthetic = manifest.get("synthetic")
    paired = isinstance(synthetic, dict) and synthetic.get("paired_test") is True
    bad = BadSampleCounter()
    shares, totals = {}, []
    for domain in DOMAINS:
        share: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        seen = 0
        urls = split_urls(root, manifest, f"{domain}-test")
        samples = (s for url in urls for s in shard_samples(url, 0, bad, reading(cfg)))
        for sample in itertools.islice(samples, count):
            seen += 1
            if (seen - 1) % world_size != rank:
                continue
            decoded = decode_or_count(sample, cfg.extra, bad, cfg.max_image_pixels, formats[domain])
            if decoded is not None:
                image, extra = decoded
                if cfg.extra == "label":
                    extra = resize(extra, cfg.crop_size, nearest=True)
                share[sample["__key__"]] = (resize(image, cfg.crop_size), extra)
        shares[domain], totals = share, totals + [seen]
    if bad.examples:
        print(f"test split: skipped {sum(bad.counts.values())} bad samples, e.g. {bad.examples[0]}")
    if paired:
        keys = [k for k in shares["x"] if k in shares["y"]]
        shares = {d: {k: shares[d][k] for k in keys} for d in DOMAINS}
    stacked = [
        stack_test_images(list(shares[d].values()), cfg.extra, cfg.crop_size, device, formats[d]) for d in DOMAINS
    ]
    (x, extra_x), (y, extra_y) = stacked
    return TestSet(x, y, extra_x, extra_y, paired, *totals)


def stack_test_images(
    items: list[tuple[torch.Tensor, torch.Tensor | None]],
    extra: str,
    size: int,
    device: torch.device | str = "cpu",
    pixel_format: PixelFormat = RGB8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One domain's test images (integer pixels [C, size, size] of `pixel_format`) and their extras as a TestSet
    holds them, on `device`: images in [-1, 1] [n, C, size, size] (n may be 0) and generator extra channels (None
    without extras or images)."""
    empty = torch.empty(0, pixel_format.channels, size, size, dtype=torch.uint8)
    images = to_unit_range(torch.stack([i for i, _ in items]) if items else empty, pixel_format).to(device)
    if extra == "none" or not items:
        return images, None
    return images, extra_channels(torch.stack([e for _, e in items]), extra, size).to(device)
