"""Describe shards: per manifest split, or per TARGET without a manifest, the samples, shards, MiB, extras present
and the distribution of image sizes read from every image's header; and a contact sheet of a few samples.

    python -m shards.info TARGET... [--sheet PATH] [--per-split 8]

TARGETs are those of shards.verify: a shard directory with or without manifest.json, a shard file, a brace pattern
(quote it) or several separated by spaces. Image sizes are height x width (HxW, as the manifest's image_size),
taken from each image's header (PIL reads the header only, no pixels are decoded): the most common sizes with their
counts, how many images have other sizes, and the smallest and largest size by pixel count, e.g.
`256x256 (980), 200x300 (15), 3 other sizes (7); min 90x120, max 768x1024`. Images whose header does not read,
samples without an image and unreadable shards are counted separately; `shards.verify` names them. What is read is
not judged: the exit status is 0 unless a TARGET cannot be used (2, one line on stderr) or the contact sheet cannot
be written (1).

The contact sheet has one row per split or target: its first `--per-split` images that decode (shards.decode, the
decoder training uses). It is the only file written: at --sheet, by default `contact_sheet.png` in the first
TARGET when that is a directory, else in the current directory. It is written to a temporary file beside it and
renamed, so a symlink planted at that path is replaced, never followed.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import secrets
import stat
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from shards.decode import DEFAULT_MAX_PIXELS, EXTRA_PARTS, BadSample, image_extension
from shards.pixels import PixelFormat, display_rgb, npy_shape, read_pixels
from shards.remote import ShardUnavailable
from shards.streams import Reading, file_samples, local_copy
from shards.urls import ShardsError
from shards.verify import ShardGroup, add_targets, positive_int, resolve_targets, shown, usage_error

THUMB = 96
TOP_SIZES = 3
"""Image sizes listed with their own count; the rest are summed up as other sizes."""


@dataclass
class GroupInfo:
    """What was read from the shards of one group (a split or a target)."""

    shards: int = 0
    samples: int = 0
    bytes: int = 0
    sizes: Counter = field(default_factory=Counter)
    """(height, width) -> images of that size."""
    extras: Counter = field(default_factory=Counter)
    """Sample part (label.png, hist.npy) -> samples that carry it."""
    bad_headers: int = 0
    no_image: int = 0
    unreadable_shards: int = 0
    """Shards missing, not regular files, or with a tar-level error (not a tar, truncated, duplicate members)."""
    thumbnails: list[Image.Image] = field(default_factory=list)


def _record(errors: list[Exception], err: Exception) -> bool:
    """A tar reader's error handler: note the error and go on reading."""
    errors.append(err)
    return True


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image (an .npy array's included), from its header only.

    Raises:
        Exception: whatever PIL raises for data it cannot identify (a hostile file can make it raise anything).
    """
    if data.startswith(b"\x93NUMPY"):
        return npy_shape(data)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a size is all we want from it
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    return height, width


def read_group(group: ShardGroup, thumbnails: int) -> GroupInfo:
    """Read every sample header of a group's shards (remote ones downloaded one at a time) and decode its first
    `thumbnails` good images."""
    info = GroupInfo(shards=len(group.urls))
    for url in group.urls:
        try:
            with local_copy(url, Reading()) as path:
                _read_shard(path, info, thumbnails)
        except ShardUnavailable:
            info.unreadable_shards += 1
    return info


def _read_shard(path: str, info: GroupInfo, thumbnails: int) -> None:
    try:
        status = os.stat(path)
    except OSError:
        status = None
    if status is None or not stat.S_ISREG(status.st_mode):  # a manifest's shard missing, or a FIFO that blocks
        info.unreadable_shards += 1
        return
    info.bytes += status.st_size
    errors: list[Exception] = []
    for sample in file_samples(path, handler=functools.partial(_record, errors)):
        info.samples += 1
        info.extras.update(part for part in EXTRA_PARTS.values() if part in sample)
        try:
            data = sample[image_extension(sample)]
        except BadSample:
            info.no_image += 1
            continue
        try:
            info.sizes[header_size(data)] += 1
        except Exception:  # any header PIL cannot read is one bad header
            info.bad_headers += 1
            continue
        if len(info.thumbnails) < thumbnails:
            try:
                pixels = display_rgb(read_pixels(data, DEFAULT_MAX_PIXELS))
                info.thumbnails.append(Image.fromarray(pixels).resize((THUMB, THUMB)))
            except ValueError:
                pass  # shards.verify reports it
    info.unreadable_shards += bool(errors)


def hxw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def describe_sizes(sizes: Counter, top: int = TOP_SIZES) -> str:
    """The size distribution in one line: the `top` most common sizes (ties: smaller first) with their counts, the
    count of images of any other size, and the smallest and largest size by pixel count."""
    if not sizes:
        return "no readable image"
    ranked = sorted(sizes.items(), key=lambda item: (-item[1], item[0][0] * item[0][1], item[0]))
    parts = [f"{hxw(size)} ({count})" for size, count in ranked[:top]]
    if len(ranked) > top:
        parts.append(f"{len(ranked) - top} other sizes ({sum(count for _, count in ranked[top:])})")
    text = ", ".join(parts)
    if len(sizes) > 1:
        by_pixels = sorted(sizes, key=lambda size: (size[0] * size[1], size))
        text += f"; min {hxw(by_pixels[0])}, max {hxw(by_pixels[-1])}"
    return text


def describe(name: str, info: GroupInfo, pixel_format: PixelFormat | None = None) -> list[str]:
    """The table row of one group and its detail lines (with the images' format when a manifest records it)."""
    extras = ", ".join(f"{part} {info.extras[part]}" for part in EXTRA_PARTS.values() if info.extras[part]) or "none"
    lines = [
        f"{shown(name):<10} {info.samples:>9} {info.shards:>7} {info.bytes / 2**20:>9.2f}  {extras}",
        f"  image sizes HxW (images): {describe_sizes(info.sizes)}"
        + (f"; {pixel_format.describe()}" if pixel_format is not None else ""),
    ]
    bad = {
        "unreadable image headers": info.bad_headers,
        "samples without an image": info.no_image,
        "unreadable shards": info.unreadable_shards,
    }
    if any(bad.values()):
        counts = ", ".join(f"{count} {what}" for what, count in bad.items() if count)
        lines.append(f"  bad: {counts} (python -m shards.verify names them)")
    return lines


def contact_sheet(rows: list[list[Image.Image]], per_row: int) -> Image.Image:
    """One row of thumbnails per group."""
    sheet = Image.new("RGB", (per_row * THUMB, max(len(rows), 1) * THUMB), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image, (c * THUMB, r * THUMB))
    return sheet


def save_replacing(image: Image.Image, path: Path) -> None:
    """Save `image` as PNG at `path` through a temporary file in the same directory and a rename: whatever is at
    `path` (a symlink included) is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never opens something already there; mode 0o666 lets the umask decide, as for any new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards.info",
        description="Samples, shards, sizes, extras and a contact sheet of tar shards.",
    )
    add_targets(parser)
    parser.add_argument(
        "--sheet",
        type=Path,
        help="contact sheet PNG (default: contact_sheet.png in the first TARGET if it is a directory, else in .)",
    )
    parser.add_argument("--per-split", type=positive_int, default=8, help="thumbnails per split or target")
    args = parser.parse_args(argv)
    try:
        targets = resolve_targets(args.targets, "shards.info")
    except ShardsError as err:
        print(usage_error("shards.info", err), file=sys.stderr)
        return 2
    rows: list[tuple[str, list[Image.Image]]] = []
    for target in targets:
        print(target.note)
        name = "split" if target.manifest is not None else "target"
        print(f"{name:<10} {'samples':>9} {'shards':>7} {'MiB':>9}  extras")
        for group in target.groups:
            info = read_group(group, args.per_split)
            print("\n".join(describe(group.name, info, group.pixel_format)), flush=True)
            several_manifests = len(targets) > 1 and target.manifest is not None
            rows.append((f"{target.arg} {group.name}" if several_manifests else group.name, info.thumbnails))
    sheet_path = args.sheet or (targets[0].directory or Path(".")) / "contact_sheet.png"
    try:
        save_replacing(contact_sheet([images for _, images in rows], args.per_split), sheet_path)
    except OSError as err:
        problem = f"cannot write the contact sheet {sheet_path} ({err})"
        print(f"shards.info: {shown(problem)}; choose another path with --sheet", file=sys.stderr)
        return 1
    print(f"contact sheet: {shown(str(sheet_path))} (rows: {shown(', '.join(name for name, _ in rows))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
