"""A node-local cache of remote shards (data.cache_dir), so that later epochs read from local disk.

Entries are named by the sha256 the manifest lists for the shard (content addressing: two datasets sharing a shard
share the entry). A shard is downloaded whole into a temporary file of its own, hashed on the way, and renamed into
place only when the hash matches; any number of ranks and loader workers may fill one cache at once (two that fetch
the same shard both download it, and the second rename replaces an identical file). An entry found in the cache is
hashed again the first time each process uses it, and one that is not a regular file is replaced. The total size
is kept under `max_bytes` by deleting the entries used least recently (a use touches the file's mtime); a reader
that still has a deleted entry open keeps reading it. The directory is created and checked for writing when a cache
is made, so that a data.cache_dir that cannot be used is one error at start, not a failure per shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from shards.bounded_read import open_regular
from shards.manifest import sha256_file
from shards.remote import ShardUnavailable

SHA256 = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".tar"
STALE_PART_S = 6 * 3600
"""A temporary download file older than this was left by a process that died; eviction removes it."""


class ShardCache:
    """Verified local copies of remote shards under `root`, at most `max_bytes` in all."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        """Creates `root` if needed and writes (and removes) a probe file in it.

        Raises:
            OSError: `root` cannot be created or written.
        """
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe.", suffix=".part")  # .part: evicted if left
        os.close(fd)
        os.unlink(probe)
        self._verified: set[str] = set()

    def get(self, url: str, sha256: str, fetch: Callable[[], BinaryIO]) -> str:
        """The local path of the shard `url` whose content hashes to `sha256`, downloaded with `fetch()` (a stream
        of the remote object) when the cache lacks it. Another process may evict it before it is opened: `open`
        it instead to read it.

        Raises:
            ShardUnavailable: the download does not match `sha256` (or `fetch` raises it).
            ValueError: `sha256` is not 64 lowercase hex digits.
        """
        if not SHA256.fullmatch(sha256):
            raise ValueError(f"{url}: sha256 {sha256!r:.80} is not 64 lowercase hex digits")
        path = self.root / f"{sha256}{SUFFIX}"
        if self._usable(path, sha256):
            return str(path)
        self._download(url, sha256, fetch, path)
        self._verified.add(sha256)
        self.evict(keep=path)
        return str(path)

    def open(self, url: str, sha256: str, fetch: Callable[[], BinaryIO]) -> BinaryIO:
        """The cached shard opened for reading (see `get`); an entry evicted between finding and opening it is
        fetched again (an open file stays readable whatever eviction does afterwards)."""
        for _ in range(2):
            try:
                return open_regular(self.get(url, sha256, fetch), "cache entry")
            except FileNotFoundError:
                self._verified.discard(sha256)
        return open_regular(self.get(url, sha256, fetch), "cache entry")

    def _usable(self, path: Path, sha256: str) -> bool:
        try:
            os.utime(path)  # marks the use for eviction; fails when the entry is not there
        except FileNotFoundError:
            return False
        if sha256 in self._verified:
            return True
        try:
            good = sha256_file(path) == sha256
        except FileNotFoundError:  # evicted by another process meanwhile
            return False
        except OSError:  # not a regular file (a FIFO would have blocked): replaced like a corrupt entry
            good = False
        if not good:
            path.unlink(missing_ok=True)
            return False
        self._verified.add(sha256)
        return True

    def _download(self, url: str, sha256: str, fetch: Callable[[], BinaryIO], path: Path) -> None:
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{sha256[:16]}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, fetch() as stream:
                while block := stream.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise ShardUnavailable(f"{url}: downloaded content does not match the manifest's sha256")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def evict(self, keep: Path | None = None) -> None:
        """Delete the least recently used entries (never `keep`) until the cache holds at most max_bytes."""
        entries, now = [], time.time()
        for entry in os.scandir(self.root):
            if entry.name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > STALE_PART_S:
                        os.unlink(entry.path)
            elif entry.name.endswith(SUFFIX) and SHA256.fullmatch(entry.name[: -len(SUFFIX)]):
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                entries.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and path == str(keep):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            self._verified.discard(Path(path).name[: -len(SUFFIX)])
