"""Write samples into numbered tar shards with webdataset's TarWriter; each shard appears atomically (written under
a `.tmp` name, renamed when complete, removed when writing fails) and is byte-for-byte reproducible (fixed member
mtime)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds

from shards.manifest import shard_entry


def write_tar(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write `samples` (webdataset dicts with `__key__`) into one tar at `path`; no samples, no file.

    Returns:
        How many samples were written.

    Raises:
        Whatever iterating `samples` or writing raises; `path` is removed first.
    """
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return 0
    count = 0
    try:
        with wds.TarWriter(str(path), mtime=0.0) as writer:  # fixed mtime: same samples, same bytes
            for sample in itertools.chain([first], samples):
                writer.write(sample)
                count += 1
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return count


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
    samples = iter(samples)
    entries: list[dict] = []
    while True:
        final = out_dir / f"{split}-{first_index + len(entries):06d}.tar"
        tmp = final.with_suffix(".tar.tmp")
        count = write_tar(tmp, itertools.islice(samples, maxcount))
        if count == 0:
            return entries
        os.replace(tmp, final)
        entries.append(shard_entry(final, count))
