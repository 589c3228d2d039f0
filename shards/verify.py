"""Check a shard directory against its manifest: every shard's hash and size, every sample decoded as training
decodes it (image within the pixel limit, label map, colour histogram).

    python -m shards.verify DIR [--max-pixels N]

Prints one line per problem (shard and key), a count of bad samples per shard and a summary; exits 1 on any
mismatch or bad sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import webdataset as wds

from shards.decode import DEFAULT_MAX_PIXELS, EXTRA_PARTS, BadSample, decode_extra, decode_rgb, image_extension
from shards.manifest import read_manifest, sha256_file, split_urls


def check_sample(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """None when the sample's image and every extra it carries decode as training would decode them, else what
    is wrong (the first problem)."""
    try:
        decode_rgb(sample[image_extension(sample)], max_pixels)
        for kind, part in EXTRA_PARTS.items():
            if part in sample:
                decode_extra(sample, kind, max_pixels)
    except BadSample as err:
        return str(err)
    return None


def verify(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """All problems found in `root`, one line each, and a line per shard with bad samples (empty when sound)."""
    manifest = read_manifest(root)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard, url in zip(entry["shards"], split_urls(root, manifest, split)):
            path, name = Path(url), shard["name"]
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            if path.stat().st_size != shard.get("bytes"):
                problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {shard.get('bytes')}")
            if sha256_file(path) != shard.get("sha256"):
                problems.append(f"{name}: sha256 differs from the manifest")
            errors: list[str] = []
            count, bad = 0, 0
            samples = wds.tariterators.tarfile_samples([{"url": url}], handler=lambda e: errors.append(str(e)) or True)
            for sample in samples:
                count += 1
                problem = check_sample(sample, max_pixels)
                if problem:
                    bad += 1
                    problems.append(f"{name}:{sample['__key__']}: {problem}")
            problems += [f"{name}: unreadable tar ({e:.200})" for e in errors]
            if count != shard["samples"]:
                problems.append(f"{name}: {count} samples, manifest says {shard['samples']}")
            if bad:
                problems.append(f"{name}: {bad} of {count} samples bad")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify tar shards against their manifest.json.")
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are bad (data.max_image_pixels)"
    )
    args = parser.parse_args(argv)
    try:
        problems = verify(args.root, args.max_pixels)
    except ValueError as err:
        print(f"shards.verify: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    manifest = read_manifest(args.root)
    total = sum(shard["samples"] for entry in manifest["splits"].values() for shard in entry["shards"])
    print(f"{args.root}: {len(manifest['splits'])} splits, {total} samples, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
