"""manifest.json of a shard directory: per split its shards (samples, bytes, sha256), totals, image sizes and
pixel format.

Splits are named `<domain>-<part>`, e.g. x-train, y-train, x-test, y-test; shards `<split>-%06d.tar`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from shards.bounded_read import MAX_SMALL_FILE, BoundedReadError, open_regular, parse_json, read_limited
from shards.pixels import RGB8, PixelFormat
from shards.remote import RemoteOptions, ShardUnavailable, is_remote, join, read_bytes
from shards.urls import ShardsError, check_relative_name, manifest_shard_url

MANIFEST = "manifest.json"
VERSION = 1
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a regular file, read in chunks.

    Raises:
        OSError: it cannot be opened or is not a regular file (a FIFO never blocks).
    """
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def shard_entry(path: str | Path, samples: int) -> dict[str, Any]:
    """The manifest record of one finished shard."""
    path = Path(path)
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def split_entry(
    shards: list[dict[str, Any]],
    smallest: tuple[int, int],
    largest: tuple[int, int] | None = None,
    pixel_format: PixelFormat = RGB8,
    square: bool | None = None,
) -> dict[str, Any]:
    """The manifest record of one split: its shards, total samples, the (height, width) of its smallest and largest
    images (each side on its own) and whether all are square (`image_size` too when every image has one size),
    and its pixel format."""
    largest = largest or smallest
    if square is None:
        square = smallest == largest and smallest[0] == smallest[1]
    sizes = {"min": list(smallest), "max": list(largest), "square": square}
    entry = {"samples": sum(s["samples"] for s in shards), "sizes": sizes}
    if tuple(smallest) == tuple(largest):
        entry["image_size"] = list(smallest)
    return {**entry, "format": pixel_format.to_json(), "shards": shards}


def split_format(manifest: dict[str, Any], split: str, where: str = MANIFEST) -> PixelFormat:
    """The pixel format of a split of a checked manifest: 8-bit RGB for manifests written before formats were
    recorded.

    Raises:
        ShardsError: the split has no such record or a malformed one.
    """
    if split not in manifest["splits"]:
        raise ShardsError(f"{where} has no split {split!r}; it has {sorted(manifest['splits'])}")
    record = manifest["splits"][split].get("format")
    if record is None:
        return RGB8
    try:
        return PixelFormat.from_json(record, f"{where}: split {split}")
    except ValueError as err:
        raise ShardsError(str(err)) from None


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


def manifest_location(root: str | Path) -> str:
    """Where the manifest of the shard root `root` (a directory or a remote URL) lives."""
    return join(str(root), MANIFEST) if is_remote(str(root)) else str(Path(root) / MANIFEST)


def _manifest_bytes(root: str | Path, remote: RemoteOptions) -> bytes:
    """The manifest's bytes, at most MAX_SMALL_FILE (a local one: a regular file, not a symlink).

    Raises:
        BoundedReadError: too large, or not a regular file.
        ShardsError: missing or unreadable.
    """
    path = manifest_location(root)
    if is_remote(str(root)):
        try:
            return read_bytes(path, remote, MAX_SMALL_FILE)
        except ShardUnavailable as err:
            raise ShardsError(f"{path} cannot be read ({err})") from None
    if not os.path.lexists(path):
        raise ShardsError(
            f"{path} not found; write shards with `python -m shards.write` or `python -m shards.synthetic`"
        )
    return read_limited(path, MAX_SMALL_FILE, "manifest")


def read_manifest(root: str | Path, remote: RemoteOptions | None = None) -> dict[str, Any]:
    """Load and check the manifest.json of `root` (a directory, or a remote URL read with `remote`'s retries).
    It is data (untrusted): read and parsed within bounds (shards.bounded_read), then its structure, sample
    counts, sha256 digests and shard names (see shards.urls) are checked before anything uses them.

    Raises:
        ShardsError: one line naming the file and what is wrong with it.
    """
    path = manifest_location(root)
    try:
        body = parse_json(_manifest_bytes(root, remote or RemoteOptions()), path)
    except BoundedReadError as err:
        raise ShardsError(str(err)) from None
    if not isinstance(body, dict) or body.get("version") != VERSION or not isinstance(body.get("splits"), dict):
        raise ShardsError(f"{path} is not a version-{VERSION} manifest with a 'splits' mapping")
    for split, entry in body["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ShardsError(f"{path}: split {split!r:.80} has no list of shard records")
        split_format(body, split, path)
        for shard in shards:
            check_relative_name(shard.get("name"), path)
            samples = shard.get("samples")
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
                raise ShardsError(f"{path}: shard {shard['name']} has samples={samples!r:.40}; expected an integer >=0")
            digest = shard.get("sha256")
            if digest is not None and not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
                raise ShardsError(f"{path}: shard {shard['name']} has sha256={digest!r:.80}; expected 64 hex digits")
    return body


def split_urls(root: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """The URLs (absolute paths for a local root) of the shards of `split` (a checked manifest), in manifest
    order.

    Raises:
        ShardsError: when the manifest has no such split.
    """
    source = manifest_location(root)
    if split not in manifest["splits"]:
        raise ShardsError(f"{source} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [manifest_shard_url(root, shard["name"], source) for shard in manifest["splits"][split]["shards"]]
