"""Plain image folders as inputs: `translate --input DIR` and `evaluate --data DIR` with testA/ and testB/ (the
reference layout that `shards.write --root` packs).

A folder a user points at is data (untrusted), read exactly like a shard sample: only regular files are opened
(`shards.input_files.file_problem`, so a FIFO or device never blocks), and the bytes are decoded by
`shards.decode.decode_image` in the domain's pixel format (the same pixel limit; for 8-bit RGB, grey, RGBA and
palette images are converted). A file that cannot be used is skipped and reported as "PATH: reason", never fatal.
The resolution policy of evaluation is training's test path (`trainer.data.resize` to data.crop_size), so a folder
and the same images packed as shards give the same test set. Writing shards is shards.write's job; shard test
splits are trainer.data's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from shards.decode import DEFAULT_MAX_PIXELS, BadSample, decode_image
from shards.encoding import colour_histogram
from shards.input_files import IMAGE_SUFFIXES, file_problem, open_nonblocking
from shards.pixels import RGB8, PixelFormat
from trainer.config.checks import ConfigError
from trainer.data.augment import pixel_tensor, resize
from trainer.data.plan import DOMAINS
from trainer.data.test_sets import TestSet, stack_test_images

Item = tuple[str, torch.Tensor, torch.Tensor | None]
"""(name relative to the folder, integer pixels [C, H, W] (augment.pixel_tensor), colour histogram float [24] or
None)."""
TEST_FOLDERS = {"x": "testA", "y": "testB"}
"""The reference layout's test folders of X and Y."""


def image_files(root: Path, key: str) -> list[Path]:
    """The entries under `root` (recursively, sorted) whose suffix is an image's (IMAGE_SUFFIXES), directories
    excepted; whether each is a readable image is decided when it is read.

    Raises:
        ConfigError: `root` holds none; the message starts with `key` (the option that named it).
    """
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not files:
        raise ConfigError(f"{key} {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, pixel_format: PixelFormat = RGB8) -> np.ndarray:
    """The image file at `path` as [H, W, C] of `pixel_format`, decoded as a shard sample's image is (8-bit RGB
    by conversion from grey, RGBA and palette images; any other format must be the file's own).

    Raises:
        BadSample: not a non-empty regular file ("missing"), or an image that does not decode, is over
            `max_pixels` or is of another format ("corrupt").
    """
    problem = file_problem(path)  # os.stat + S_ISREG: nothing else is opened
    if problem:
        raise BadSample("missing", problem)
    try:
        # A file swapped for a FIFO after the check reads as empty (and fails to decode) instead of blocking.
        with open(path, "rb", opener=open_nonblocking) as handle:
            data = handle.read()
    except OSError as err:
        raise BadSample("missing", f"cannot read: {err.strerror}") from None
    return decode_image(data, pixel_format, max_pixels)


def read_image_dir(
    root: Path,
    files: list[Path],
    extra: str,
    key: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skipped: list[str] | None = None,
    pixel_format: PixelFormat = RGB8,
) -> Iterator[Item]:
    """The readable ones of `files` (under `root`, e.g. from `image_files`) in `pixel_format`, in order, named by
    their path relative to root; a colour histogram with them when the generators take one (extra=hist).

    Args:
        skipped: each unreadable file is appended as "PATH: reason"; None prints that line to stderr instead.

    Raises:
        ConfigError: the generators take label maps (extra=label), which a folder of images lacks.
    """
    if extra == "label":
        raise ConfigError(f"{key} {root}: the model takes label maps (data.extra=label); give shards with label.png")
    for path in files:
        try:
            pixels = read_image(path, max_pixels, pixel_format)
        except BadSample as err:
            if skipped is None:
                print(f"skipped {path}: {err}", file=sys.stderr)
            else:
                skipped.append(f"{path}: {err}")
            continue
        hist = torch.from_numpy(colour_histogram(pixels)).float() if extra == "hist" else None
        yield str(path.relative_to(root)), pixel_tensor(pixels), hist


def has_test_folders(root: Path) -> bool:
    """Whether `root` has the reference layout's testA/ and testB/."""
    return all((root / name).is_dir() for name in TEST_FOLDERS.values())


def load_test_folders(
    root: Path,
    crop_size: int,
    extra: str,
    count: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rank: int = 0,
    world_size: int = 1,
    formats: dict[str, PixelFormat] | None = None,
) -> TestSet:
    """This rank's share (every world_size-th, from `rank`) of the first `count` images of root/testA (X) and
    root/testB (Y) in each domain's format, sorted, resized to crop_size as training's test splits are. Paired when
    both folders hold the same names (without suffixes: a.png and a.tif pair), testB's image being the known answer
    of testA's; else unpaired. Unreadable files are skipped with one line saying how many and the first.

    Raises:
        ConfigError: a folder without images, or generators that take label maps.
    """
    skipped: list[str] = []
    listings = {d: image_files(root / TEST_FOLDERS[d], "--data") for d in DOMAINS}
    names = [{str(p.relative_to(root / TEST_FOLDERS[d]).with_suffix("")): p for p in listings[d]} for d in DOMAINS]
    paired = names[0].keys() == names[1].keys() and all(len(n) == len(listings[d]) for n, d in zip(names, DOMAINS))
    if paired:  # the same names: testB/NAME is the known answer of testA/NAME, in one order
        listings = {d: [names[i][name] for name in sorted(names[0])] for i, d in enumerate(DOMAINS)}
    shares, totals = {}, []
    for domain in DOMAINS:
        folder, files = root / TEST_FOLDERS[domain], listings[domain][:count]
        pixel_format = (formats or {}).get(domain, RGB8)
        share = read_image_dir(folder, files[rank::world_size], extra, "--data", max_pixels, skipped, pixel_format)
        # full-size decodes are not kept
        shares[domain] = {Path(name).with_suffix(""): (resize(image, crop_size), hist) for name, image, hist in share}
        totals.append(len(files))
    if skipped:
        print(f"test folders: skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}")
    if paired:  # a pair with an unreadable side is left out
        shares = {d: {k: v for k, v in shares[d].items() if k in shares["x"] and k in shares["y"]} for d in DOMAINS}
    stacked = [
        stack_test_images(list(shares[d].values()), extra, crop_size, "cpu", (formats or {}).get(d, RGB8))
        for d in DOMAINS
    ]
    (x, extra_x), (y, extra_y) = stacked
    return TestSet(x, y, extra_x, extra_y, paired, *totals)
