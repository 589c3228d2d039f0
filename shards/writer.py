"""Write samples into numbered tar shards with webdataset's TarWriter; each shard appears atomically and is
byte-for-byte reproducible (fixed member mtime)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from shards.manifest import shard_entry


def write_shards(
    out_dir: str | Path, split: str, samples: Iterable[dict[str, Any]], maxcount: int, first_index: int = 0
) -> list[dict]:
    """Write `samples` (webdataset dicts with `__key__`) to out_dir/<split>-%06d.tar, `maxcount` per shard,
    numbering the shards from `first_index`.

    Returns:
        The manifest records of the written shards, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    writer, count, path = None, 0, None

    def finish() -> None:
        writer.close()
        final = path.with_suffix("")  # drop the trailing .tmp
        os.replace(path, final)
        entries.append(shard_entry(final, count))

    for sample in samples:
        if writer is None:
            path = out_dir / f"{split}-{first_index + len(entries):06d}.tar.tmp"
            writer, count = wds.TarWriter(str(path), mtime=0.0), 0  # fixed mtime: same samples, same bytes
        writer.write(sample)
        count += 1
        if count == maxcount:
            finish()
            writer = None
    if writer is not None:
        finish()
    return entries
