"""manifest.json of a shard directory: per split its shards (samples, bytes, sha256), totals and image size.

Splits are named `<domain>-<part>`, e.g. x-train, y-train, x-test, y-test; shards `<split>-%06d.tar`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from shards.urls import ShardsError, check_relative_name, manifest_shard_url

MANIFEST = "manifest.json"
VERSION = 1


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def shard_entry(path: str | Path, samples: int) -> dict[str, Any]:
    """The manifest record of one finished shard."""
    path = Path(path)
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def split_entry(shards: list[dict[str, Any]], image_size: tuple[int, int]) -> dict[str, Any]:
    """The manifest record of one split: its shards, total samples and (height, width) of its images."""
    return {"samples": sum(s["samples"] for s in shards), "image_size": list(image_size), "shards": shards}


def write_manifest(root: str | Path, splits: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Atomically write root/manifest.json (temporary file, fsync, rename)."""
    path = Path(root) / MANIFEST
    body = {"version": VERSION, "splits": splits, **(extra or {})}
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        json.dump(body, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and check root/manifest.json, which is data (untrusted): its structure, sample counts and shard names
    (see shards.urls) are checked before anything uses them.

    Raises:
        ShardsError: one line naming the file and what is wrong with it.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardsError(
            f"{path} not found; write shards with `python -m shards.write` or `python -m shards.synthetic`"
        )
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(body, dict) or body.get("version") != VERSION or not isinstance(body.get("splits"), dict):
        raise ShardsError(f"{path} is not a version-{VERSION} manifest with a 'splits' mapping")
    for split, entry in body["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ShardsError(f"{path}: split {split!r:.80} has no list of shard records")
        for shard in shards:
            check_relative_name(shard.get("name"), str(path))
            samples = shard.get("samples")
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
                raise ShardsError(f"{path}: shard {shard['name']} has samples={samples!r:.40}; expected an integer >=0")
    return body


def split_urls(root: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths of the shards of `split` (a checked manifest), in manifest order.

    Raises:
        ShardsError: when the manifest has no such split.
    """
    if split not in manifest["splits"]:
        raise ShardsError(f"{Path(root) / MANIFEST} has no split {split!r}; it has {sorted(manifest['splits'])}")
    source = str(Path(root) / MANIFEST)
    return [manifest_shard_url(root, shard["name"], source) for shard in manifest["splits"][split]["shards"]]
