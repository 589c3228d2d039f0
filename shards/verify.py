"""Check a shard directory against its manifest: every shard's hash and size, every sample decoded.

    python -m shards.verify DIR

Prints one line per problem (shard and key) and a summary; exits 1 on any mismatch or bad sample.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from shards.encoding import IMAGE_EXTENSIONS
from shards.manifest import read_manifest, sha256_file


def check_sample(sample: dict) -> str | None:
    """None when the sample holds one decodable image, else what is wrong with it."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return "no image"
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.convert("RGB").load()
    except (OSError, ValueError, SyntaxError) as err:
        return f"does not decode ({type(err).__name__})"
    return None


def verify(root: Path) -> list[str]:
    """All problems found in `root`, one line each (empty when the directory is sound)."""
    manifest = read_manifest(root)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = root / shard["name"]
            if not path.is_file():
                problems.append(f"{shard['name']}: missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['name']}: sha256 differs from the manifest")
            errors: list[str] = []
            count = 0
            samples = wds.tariterators.tarfile_samples(
                [{"url": str(path)}], handler=lambda e: errors.append(str(e)) or True
            )
            for sample in samples:
                count += 1
                problem = check_sample(sample)
                if problem:
                    problems.append(f"{shard['name']}:{sample['__key__']}: {problem}")
            problems += [f"{shard['name']}: unreadable tar ({e:.200})" for e in errors]
            if count != shard["samples"]:
                problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify tar shards against their manifest.json.")
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    try:
        problems = verify(args.root)
    except ValueError as err:
        print(f"shards.verify: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    manifest = read_manifest(args.root)
    total = sum(s["samples"] for s in manifest["splits"].values())
    print(f"{args.root}: {len(manifest['splits'])} splits, {total} samples, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
