"""Any shard URL as a byte stream: a local file (a regular file only: a FIFO or device named like a shard is an
error, never a wait), a `pipe:` command (webdataset's gopen), or a remote object (shards.remote), through the
node-local cache (shards.cache) when one is configured and the shard's sha256 known."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

import webdataset as wds

from shards.bounded_read import open_regular
from shards.cache import ShardCache
from shards.remote import RemoteOptions, is_remote, open_stream
from shards.urls import PIPE


@dataclass(frozen=True)
class Reading:
    """How shards are read: remote options and the optional cache (data.cache_dir, data.cache_max_gb)."""

    remote: RemoteOptions = field(default_factory=RemoteOptions)
    cache_dir: str = ""
    cache_max_bytes: int = 0


_caches: dict[tuple[str, int], ShardCache] = {}


def cache_for(reading: Reading) -> ShardCache:
    """This process's ShardCache of `reading` (one per process, so each entry is verified once per process)."""
    key = (reading.cache_dir, reading.cache_max_bytes)
    if key not in _caches:
        _caches[key] = ShardCache(*key)
    return _caches[key]


def open_shard(
    url: str, reading: Reading, sha256: str | None = None, on_retry: Callable[[], None] | None = None
) -> BinaryIO:
    """A binary stream of the shard `url` (a checked URL: see shards.urls); remote shards with a known `sha256`
    go through the cache when reading.cache_dir is set. `on_retry` counts the retries of remote reads.

    Raises:
        OSError: the shard cannot be opened or is not a regular file (shards.remote.ShardUnavailable for remote
            ones).
    """
    if url.startswith(PIPE):
        return wds.gopen(url)
    if not is_remote(url):
        return open_regular(url, "shard")
    if reading.cache_dir and sha256:
        return cache_for(reading).open(url, sha256, lambda: open_stream(url, reading.remote, on_retry))
    return open_stream(url, reading.remote, on_retry)


@contextlib.contextmanager
def local_copy(url: str, reading: Reading) -> Iterator[str]:
    """A local path of the shard `url`: a local path as it is, a remote shard downloaded into a temporary file
    that is deleted afterwards (for the shard tools, which read a shard more than once).

    Raises:
        ShardUnavailable: the remote shard cannot be downloaded.
    """
    if not is_remote(url):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        path = f"{tmp}/shard.tar"
        with open_stream(url, reading.remote) as stream, open(path, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        yield path


def file_samples(path: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The samples of the local shard file `path`, as webdataset's tarfile_samples gives them, but opened as
    open_shard opens it: a file that cannot be opened or is not a regular file goes to `handler`."""
    try:
        stream = open_regular(path, "shard")
    except OSError as err:
        handler(err)
        return
    with stream:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
