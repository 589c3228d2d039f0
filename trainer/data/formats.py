"""Each domain's pixel format (shards.pixels): the channel count the units are built for and the bit depth pixels
are scaled from. The data's manifest says what they are; a config may state them, and a config that contradicts
the data is refused in one line."""

from __future__ import annotations

import dataclasses

import torch

from shards.manifest import read_manifest, split_format
from shards.pixels import RGB8, PixelFormat
from shards.urls import ShardsError
from trainer.config.checks import ConfigError
from trainer.config.schema import Config
from trainer.data.plan import DOMAINS, data_root, reading


def data_formats(cfg: Config, manifest: dict | None) -> dict[str, PixelFormat] | None:
    """The formats of X and Y from data.root's `manifest` (`data_manifest`: their training splits; test splits must
    agree), or None for shards given by URL (data.x_train/y_train), which have no manifest.

    Raises:
        ConfigError: a test split of another format than its training split, or a malformed format record.
    """
    if manifest is None:
        return None
    root = cfg.data.root
    try:
        formats = {d: split_format(manifest, f"{d}-train", f"data.root={root}") for d in DOMAINS}
        for domain in DOMAINS:
            test = f"{domain}-test"
            found = split_format(manifest, test) if test in manifest["splits"] else formats[domain]
            if found != formats[domain]:
                raise ShardsError(
                    f"data.root={root}: {test} is {found.describe()} but {domain}-train is {formats[domain].describe()}"
                )
    except ShardsError as err:
        raise ConfigError(str(err)) from None
    return formats


def data_manifest(cfg: Config) -> dict | None:
    """data.root's checked manifest; None for shards given by URL (data.x_train/y_train).

    Raises:
        ConfigError: it cannot be read or is malformed (one line).
    """
    data = cfg.data
    if data.x_train or data.y_train or not data.root:
        return None
    try:
        return read_manifest(data_root(data.root, data.load_size), reading(data).remote)
    except ShardsError as err:
        raise ConfigError(str(err)) from None


def aspect_note(cfg: Config, manifest: dict | None) -> str | None:
    """A line saying that data.load_size squashes the training images, where data.root's `manifest` says some are
    not square; None otherwise (or when it does not say)."""
    for split, entry in (manifest or {"splits": {}})["splits"].items():
        sizes = entry.get("sizes") if split.endswith("-train") else None
        if isinstance(sizes, dict) and sizes.get("square") is False:
            size = cfg.data.load_size
            return (
                f"data: {split} holds images that are not square; data.load_size={size} resizes each to "
                f"{size}x{size}, changing its aspect (crop them square first to choose what is kept)"
            )
    return None


def resolve_formats(cfg: Config, manifest: dict | None) -> Config:
    """`cfg` with model.x_channels/y_channels and data.x_bits/y_bits from data.root's `manifest` (`data_manifest`)
    where they are null.

    Raises:
        ConfigError: a stated value the data contradicts (one line naming the key), or what `data_formats` raises.
    """
    formats = data_formats(cfg, manifest)
    if formats is None:
        return cfg
    for domain, found in formats.items():
        for key, stated, value in (
            (f"model.{domain}_channels", getattr(cfg.model, f"{domain}_channels"), found.channels),
            (f"data.{domain}_bits", getattr(cfg.data, f"{domain}_bits"), found.bits),
        ):
            if stated is not None and stated != value:
                raise ConfigError(
                    f"{key}={stated} contradicts data.root={cfg.data.root}: its {domain}-train images are "
                    f"{found.describe()}; leave {key} unset (null) to take the data's"
                )
    x, y = formats["x"], formats["y"]
    model = dataclasses.replace(cfg.model, x_channels=x.channels, y_channels=y.channels, input_nc=None)
    data = dataclasses.replace(cfg.data, x_bits=x.bits, y_bits=y.bits)
    return dataclasses.replace(cfg, model=model, data=data)


def pixel_format(cfg: Config, domain: str) -> PixelFormat:
    """The format of `domain`'s images under `cfg` (8-bit RGB where nothing set it)."""
    bits = cfg.data.x_bits if domain == "x" else cfg.data.y_bits
    return PixelFormat(cfg.model.channels(domain), bits or 8)


def domain_formats(cfg: Config) -> dict[str, PixelFormat]:
    """Each domain's format under `cfg` (see `pixel_format`)."""
    return {domain: pixel_format(cfg, domain) for domain in DOMAINS}


def formats_note(cfg: Config) -> str:
    """The start line's words on the formats: empty for 8-bit RGB on both sides."""
    x, y = pixel_format(cfg, "x"), pixel_format(cfg, "y")
    if x == y == RGB8:
        return ""
    note = f"; images: X {x.describe()}, Y {y.describe()}"
    return note + ("; identity loss off: the channel counts differ" if x.channels != y.channels else "")


def to_unit_range(pixels: torch.Tensor, pixel_format: PixelFormat) -> torch.Tensor:
    """Integer pixels (uint8, or int32 holding 16-bit values) as float in [-1, 1]."""
    return pixels.float().div_(pixel_format.max_value / 2).sub_(1.0)


def from_unit_range(images: torch.Tensor, pixel_format: PixelFormat) -> torch.Tensor:
    """Images in [-1, 1] as rounded integer pixels of `pixel_format` (uint8, or int32 for 16 bits)."""
    scaled = images.float().clamp(-1, 1).add(1).mul(pixel_format.max_value / 2).round()
    return scaled.to(torch.uint8 if pixel_format.bits == 8 else torch.int32)
