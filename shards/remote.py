"""Shards in object storage and on HTTP servers: byte streams that survive dropped connections.

`open_stream(url, options)` is a read-only binary file over an `http(s)://`, `s3://` or `gs://` object. HTTP goes
through the standard library (one streaming GET per shard, `Range: bytes=N-` to continue), S3 and GCS through fsspec
(s3fs / gcsfs, the `[s3]` / `[gcs]` extras), whose files seek. A transient failure (connection refused or reset, a
timeout, HTTP 5xx/429/408, a response cut short) reopens the object at the byte the reader had reached, after an
exponential backoff (at most MAX_BACKOFF_S); `options.retries` failures in a row without a byte of progress give up
with `ShardUnavailable` naming the URL. A store that trickles (a byte now and then, never a timeout) fails too: each
`options.timeout_s` of time spent reading one connection must bring `options.min_rate_bytes_s` bytes per second;
a slower stretch drops the connection like a timeout, and `options.retries` of them in a row give up. The
reader's position, and so the samples a tar parser sees, never depend on how many retries it took. Credentials
come from each store's standard environment and files (AWS_* variables, ~/.aws, Google's application-default
credentials), never from our configuration.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from shards.bounded_read import MAX_SMALL_FILE, read_stream

HTTP_SCHEMES = ("http", "https")
FSSPEC_SCHEMES = {"s3": "s3fs (pip install -e .[s3])", "gs": "gcsfs (pip install -e .[gcs])"}
REMOTE_SCHEMES = (*HTTP_SCHEMES, *FSSPEC_SCHEMES)
TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 30.0


class TooSlow(TimeoutError):
    """A connection that brought less than min_rate_bytes_s over timeout_s of reading (retried like a timeout)."""


class ShardUnavailable(OSError):
    """A remote object that could not be read within the retry budget, that the store refuses (404, 403), or that
    changed while being read. `reason` keeps the one-line message (webdataset appends to `args`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RemoteOptions:
    """How remote objects are read (data.retries, data.retry_backoff_s, data.io_timeout_s, data.s3_endpoint_url,
    data.io_min_rate_kib_s)."""

    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    s3_endpoint_url: str = ""
    min_rate_bytes_s: float = 16384.0
    """The slowest reading accepted over each timeout_s spent reading one connection; 0 accepts any."""


def scheme(url: str) -> str:
    """The URL's scheme ("" for a local path or a pipe: command)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_remote(url: str) -> bool:
    return scheme(url) in REMOTE_SCHEMES


def join(root: str, name: str) -> str:
    """`name` (a checked relative name) under the remote `root`."""
    return f"{root.rstrip('/')}/{name}"


CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
PERMANENT_BOTO = ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError")


@dataclass(frozen=True)
class Opened:
    """An object opened at some byte: its stream, its total size and a version tag (ETag) when the store says, and
    how many bytes of the stream come before that byte (a server that ignores ranges sends them again)."""

    stream: BinaryIO
    size: int | None
    tag: str | None
    skip: int = 0


def _http_transient(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in TRANSIENT_HTTP
    transient = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)
    return isinstance(err, transient)


def _http_open(url: str, start: int, options: RemoteOptions) -> Opened:
    """A streaming GET of `url` from byte `start`; a server that ignores the range answers 200 with the whole
    object, whose first `start` bytes the reader drops."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=options.timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # the range starts at the end: nothing left to read
            return Opened(io.BytesIO(), None, None)
        raise
    tag, length = response.headers.get("ETag"), response.headers.get("Content-Length")
    if response.status == 206:
        match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != start:
            response.close()
            raise ShardUnavailable(f"{url}: asked for bytes {start}- and got {response.headers.get('Content-Range')}")
        return Opened(response, None if match.group(2) == "*" else int(match.group(2)), tag)
    return Opened(response, int(length) if length and length.isdigit() else None, tag, skip=start)


def fsspec_filesystem(kind: str, options: RemoteOptions, fresh: bool = False) -> Any:
    """The fsspec filesystem of `kind` (s3, gs) with the options' endpoint; `fresh`: not fsspec's cached instance
    (a background thread's own)."""
    try:
        import fsspec

        kwargs: dict[str, Any] = {"skip_instance_cache": True} if fresh else {}
        if kind == "s3" and options.s3_endpoint_url:
            kwargs["client_kwargs"] = {"endpoint_url": options.s3_endpoint_url}
        return fsspec.filesystem(kind, **kwargs)
    except ImportError:
        raise ShardUnavailable(f"{kind}:// URLs need {FSSPEC_SCHEMES[kind]}") from None


def _fsspec_open(filesystem: Any, url: str, start: int) -> Opened:
    handle = filesystem.open(url, "rb")
    handle.seek(start)
    details = getattr(handle, "details", None) or {}
    return Opened(handle, getattr(handle, "size", None), details.get("ETag") or details.get("etag"))


def fsspec_transient(err: Exception) -> bool:
    """Whether an fsspec store's error may go away by itself (a timeout, a refused connection), unlike missing
    credentials, a missing object or a refusal."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if type(err).__name__ in PERMANENT_BOTO:  # missing credentials or a malformed request do not get better
        return False
    transient: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    try:
        import botocore.exceptions

        transient += (botocore.exceptions.BotoCoreError,)
    except ImportError:
        pass
    try:
        import aiohttp

        transient += (aiohttp.ClientError,)
    except ImportError:
        pass
    return isinstance(err, transient)


class RetryingReader(io.RawIOBase):
    """A forward-only binary stream over one remote object that reopens it where it was after a transient error.

    `on_retry` is called once per retry (the data loader counts them as data/retries).
    """

    def __init__(self, url: str, options: RemoteOptions, on_retry: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.url, self.options, self.on_retry = url, options, on_retry or (lambda: None)
        self.position, self.size, self.tag = 0, None, None
        self.failed: ShardUnavailable | None = None
        self.slow = 0  # stretches of reading in a row that were too slow (see _read_some)
        self._window = (0.0, 0)  # seconds spent reading the current connection since its last check, bytes read
        kind = scheme(url)
        if kind in HTTP_SCHEMES:
            self._open: Callable[[int], Opened] = lambda start: _http_open(url, start, options)
            self._transient: Callable[[Exception], bool] = _http_transient
        else:
            filesystem = fsspec_filesystem(kind, options)
            self._open = lambda start: _fsspec_open(filesystem, url, start)
            self._transient = fsspec_transient
        self._stream: BinaryIO | None = None
        self._attempt(lambda stream: None)  # a missing object fails here, before anyone reads

    def _attempt(self, action: Callable[[BinaryIO], Any]) -> Any:
        """`action` on the open stream, reopening the object at `position` after each transient failure, up to
        options.retries failures in a row. Once it has given up, every later call fails at once (a tar reader
        that catches the error must not start another round, nor read on from a buffer it has dropped). Stretches
        too slow in a row (TooSlow, or a timeout) count against the same budget, however many bytes they brought."""
        if self.failed is not None:
            raise self.failed
        failures = 0
        while True:
            try:
                if self._stream is None:
                    self._reopen()
                return action(self._stream)
            except ShardUnavailable as err:
                self.failed = err
                raise
            except Exception as err:
                self._drop()
                if isinstance(err, TimeoutError):  # TooSlow, or timeout_s without a byte: a stretch too slow
                    self.slow += 1
                if not self._transient(err):
                    self.failed = ShardUnavailable(f"{self.url}: {type(err).__name__}: {err!s:.200}")
                    raise self.failed from None
                failures += 1
                if max(failures, self.slow) > self.options.retries:
                    self.failed = ShardUnavailable(
                        f"{self.url}: unreadable after {self.options.retries} retries at byte {self.position} "
                        f"({type(err).__name__}: {err!s:.200})"
                    )
                    raise self.failed from None
                self.on_retry()
                time.sleep(min(self.options.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))

    def _reopen(self) -> None:
        """Open the object at `position` as `_stream`: the same object as before (size and version tag), or
        ShardUnavailable: bytes of two versions must never be spliced."""
        opened = self._open(self.position)
        changed = (self.size is not None and opened.size not in (None, self.size)) or (
            self.tag is not None and opened.tag not in (None, self.tag)
        )
        if changed:
            opened.stream.close()
            raise ShardUnavailable(f"{self.url}: the object changed while being read (at byte {self.position})")
        self.size = opened.size if opened.size is not None else self.size
        self.tag = opened.tag if opened.tag is not None else self.tag
        self._stream, skip = opened.stream, opened.skip
        while skip:
            got = len(self._read_some(self._stream, min(skip, CHUNK_BYTES)))
            if not got:
                raise http.client.IncompleteRead(b"", skip)
            skip -= got

    def _read_some(self, stream: BinaryIO, size: int) -> bytes:
        """Up to `size` bytes from one read of `stream` (read1: whatever arrives, so that a trickle cannot keep one
        call waiting). Each timeout_s of time spent in these reads on one connection must bring min_rate_bytes_s
        per second; the time between reads (a consumer that pauses) does not count.

        Raises:
            TooSlow: this stretch of reading was slower.
        """
        started = time.monotonic()
        data = getattr(stream, "read1", stream.read)(size)
        seconds, count = self._window[0] + time.monotonic() - started, self._window[1] + len(data)
        if seconds < self.options.timeout_s:
            self._window = (seconds, count)
            return data
        self._window = (0.0, 0)
        if count >= self.options.min_rate_bytes_s * seconds:
            self.slow = 0
            return data
        rate = self.options.min_rate_bytes_s
        raise TooSlow(f"{count} bytes in {seconds:.1f} s of reading, slower than the minimum of {rate:g} bytes/s")

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail again
                self._stream.close()
            self._stream = None
        self._window = (0.0, 0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def read(stream: BinaryIO) -> int:
            data = self._read_some(stream, len(buffer))
            if not data and len(buffer) and self.size is not None and self.position < self.size:
                # http.client returns b"" when the connection closes before Content-Length arrived
                raise ConnectionError(f"connection closed at byte {self.position} of {self.size}")
            buffer[: len(data)] = data
            return len(data)

        count = self._attempt(read)
        self.position += count
        return count

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, options: RemoteOptions, on_retry: Callable[[], None] | None = None) -> BinaryIO:
    """A buffered binary stream of the remote object `url`.

    Raises:
        ShardUnavailable: the object is refused (not found, forbidden) or unreadable within the retry budget.
    """
    return io.BufferedReader(RetryingReader(url, options, on_retry), buffer_size=CHUNK_BYTES)


def read_bytes(url: str, options: RemoteOptions, limit: int = MAX_SMALL_FILE) -> bytes:
    """The whole remote object `url` (a manifest), read with retries, at most `limit` bytes.

    Raises:
        ShardUnavailable: as open_stream.
        BoundedReadError: the object is larger than `limit` (no more than `limit` + 1 bytes are read).
    """
    with open_stream(url, options) as stream:
        return read_stream(stream, url, limit)
