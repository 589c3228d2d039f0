"""Describe a shard directory: samples, shards and bytes per split, and a contact sheet of a few samples.

python -m shards.info DIR [--sheet DIR/contact_sheet.png] [--per-split 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import webdataset as wds
from PIL import Image

from shards.decode import BadSample, decode_rgb, image_extension
from shards.manifest import read_manifest, split_urls

THUMB = 96


def first_images(root: Path, manifest: dict, split: str, count: int) -> list[Image.Image]:
    """Up to `count` images from the first shards of `split`, as RGB thumbnails."""
    images = []
    for url in split_urls(root, manifest, split):
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=wds.ignore_and_continue):
            try:
                pixels = decode_rgb(sample[image_extension(sample)])
            except BadSample:
                continue  # shards.verify reports it
            images.append(Image.fromarray(pixels).resize((THUMB, THUMB)))
            if len(images) == count:
                return images
    return images


def contact_sheet(root: Path, manifest: dict, per_split: int) -> Image.Image:
    """One row of thumbnails per split."""
    rows = {split: first_images(root, manifest, split, per_split) for split in manifest["splits"]}
    sheet = Image.new("RGB", (per_split * THUMB, len(rows) * THUMB), "white")
    for r, images in enumerate(rows.values()):
        for c, image in enumerate(images):
            sheet.paste(image, (c * THUMB, r * THUMB))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Counts, sizes and a contact sheet of a shard directory.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG (default: ROOT/contact_sheet.png)")
    parser.add_argument("--per-split", type=int, default=8, help="thumbnails per split")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.root)
    except ValueError as err:
        raise SystemExit(f"shards.info: {err}") from None
    print(f"{'split':<10} {'samples':>9} {'shards':>7} {'MiB':>9}  image size")
    for split, entry in manifest["splits"].items():
        mib = sum(s["bytes"] for s in entry["shards"]) / 2**20
        size = "x".join(map(str, entry["image_size"]))
        print(f"{split:<10} {entry['samples']:>9} {len(entry['shards']):>7} {mib:>9.2f}  {size}")
    sheet_path = args.sheet or args.root / "contact_sheet.png"
    contact_sheet(args.root, manifest, args.per_split).save(sheet_path)
    print(f"contact sheet: {sheet_path} (rows: {', '.join(manifest['splits'])})")


if __name__ == "__main__":
    main()
