"""Checkpoints in object storage (checkpoint.remote = s3://... or gs://...): the store's layout, bounded reads of
what it says, and transfers of whole files. The store mirrors a run directory:

    REMOTE/checkpoints/step_XXXXXXXX/{rank_*.safetensors, units.safetensors, train_state.json, COMPLETE}
    REMOTE/checkpoints/latest, REMOTE/checkpoints/best.json
    REMOTE/export/..., REMOTE/metrics.jsonl, REMOTE/config.yaml   (at the end of the run)

A checkpoint in the store is complete once its COMPLETE marker (the same {name: sha256} as a local one) exists;
the main rank writes it only after every rank's files are there (trainer.checkpoint.upload). Nothing the store says
is trusted: step names must be step_XXXXXXXX exactly, file names in COMPLETE are checked relative names, small
files are read within MAX_SMALL_FILE, and a download reads at most the size the store states (at most
MAX_DOWNLOAD_BYTES) and is kept only when its sha256 matches COMPLETE. Credentials and the endpoint are the data
path's: the store's standard environment and files, data.s3_endpoint_url or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from shards.bounded_read import MAX_SMALL_FILE, BoundedReadError, parse_json, read_stream
from shards.remote import (
    FSSPEC_SCHEMES,
    RemoteOptions,
    ShardUnavailable,
    fsspec_filesystem,
    fsspec_transient,
    join,
    scheme,
)
from shards.urls import check_relative_name
from trainer.checkpoint.format import CHECKPOINTS, COMPLETE, CheckpointError, checkpoint_step
from trainer.config.checks import ConfigError
from trainer.runtime.run_files import create_file

MAX_DOWNLOAD_BYTES = 1 << 40
CHUNK_BYTES = 1 << 22


class StoreError(OSError):
    """A transfer that failed (the store down, refused or answering nonsense); the caller retries or reports."""


class CheckpointStore:
    """The checkpoint store at `url`: transfers and listings (each call may raise StoreError)."""

    def __init__(self, url: str, options: RemoteOptions):
        kind = scheme(url)
        if kind not in FSSPEC_SCHEMES:
            schemes = " or ".join(f"{s}://bucket/prefix" for s in FSSPEC_SCHEMES)
            raise ConfigError(f"checkpoint.remote={url!r} is not a store URL; expected {schemes}")
        self.url = url.rstrip("/")
        self.kind, self.options = kind, options
        try:
            self.fs = fsspec_filesystem(kind, options, fresh=True)
        except ShardUnavailable as err:
            raise ConfigError(f"checkpoint.remote={url}: {err.reason}") from None

    def check_access(self) -> None:
        """List the store's bucket: fail now, in one line, without credentials or a bucket.

        Raises:
            ConfigError: a lasting refusal (no credentials, no such bucket, access denied), naming checkpoint.remote.
            StoreError: a failure that may pass (the store down, a timeout).
        """
        try:
            self.fs.invalidate_cache()
            self.fs.ls(self.url.split("://", 1)[1].split("/", 1)[0])  # the bucket: refused without credentials
        except Exception as err:
            if fsspec_transient(err):
                raise StoreError(f"cannot list {self.url}: {_reason(err)}") from None
            raise ConfigError(f"checkpoint.remote={self.url}: cannot list the store ({_reason(err)})") from None

    def path(self, name: str) -> str:
        return join(self.url, name)

    def checkpoint(self, step: int) -> str:
        """The store name of checkpoint `step` (relative to the store root)."""
        return f"{CHECKPOINTS}/step_{step:08d}"

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write `data` as object `name` (replacing it)."""
        self._call(lambda: self.fs.pipe_file(self.path(name), data), f"upload {name}")

    def put_file(self, local: Path, name: str) -> None:
        """Upload the local file `local` as object `name`, checking its size on the store."""
        size = local.stat().st_size
        self._call(lambda: self.fs.put_file(str(local), self.path(name)), f"upload {name}")
        stored = self._call(lambda: self.fs.size(self.path(name)), f"check {name}")
        if stored != size:
            raise StoreError(f"{self.path(name)}: {stored} bytes on the store after the upload, {size} here")

    def exists(self, name: str) -> bool:
        return bool(self._call(lambda: self._fresh(lambda: self.fs.exists(self.path(name))), f"look for {name}"))

    def read_small(self, name: str) -> bytes | None:
        """Object `name` (a marker, a pointer, a record) read within MAX_SMALL_FILE; None when it does not exist.

        Raises:
            StoreError: the store failed or the object is larger than MAX_SMALL_FILE.
        """
        if not self.exists(name):
            return None

        def read() -> bytes:
            with self.fs.open(self.path(name), "rb") as stream:
                return read_stream(stream, self.path(name), MAX_SMALL_FILE)

        try:
            return self._call(read, f"read {name}")
        except FileNotFoundError:  # deleted in between (a rotation)
            return None

    def steps(self) -> list[int]:
        """The steps of the store's checkpoint directories (named step_XXXXXXXX exactly), oldest first."""
        root = self.path(CHECKPOINTS)
        try:
            names = self._call(lambda: self._fresh(lambda: self.fs.ls(root, detail=False)), "list checkpoints")
        except FileNotFoundError:
            return []
        steps = (checkpoint_step(Path(str(name).rstrip("/").rsplit("/", 1)[-1])) for name in names)
        return sorted(step for step in steps if step is not None)

    def complete_hashes(self, step: int) -> dict[str, str] | None:
        """Checkpoint `step`'s COMPLETE record ({file name: sha256}), None while it has none.

        Raises:
            CheckpointError: a marker that is not such a record (a name with a path in it, a hash that is not one).
            StoreError: the store failed.
        """
        name = f"{self.checkpoint(step)}/{COMPLETE}"
        data = self.read_small(name)
        if data is None:
            return None
        try:
            hashes = parse_json(data, self.path(name))
        except BoundedReadError as err:
            raise CheckpointError(str(err)) from None
        if not isinstance(hashes, dict) or not hashes:
            raise CheckpointError(f"{self.path(name)} is not a {{file: sha256}} record")
        for file, digest in hashes.items():
            try:
                check_relative_name(file, self.path(name), "file name")
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            if "/" in file or not (isinstance(digest, str) and len(digest) == 64):
                raise CheckpointError(f"{self.path(name)}: {file!r:.60} is not a file of the checkpoint with a sha256")
        return hashes

    def complete_steps(self) -> list[int]:
        """The store's checkpoints with a COMPLETE marker, oldest first."""
        return [step for step in self.steps() if self.exists(f"{self.checkpoint(step)}/{COMPLETE}")]

    def newest_complete(self) -> int | None:
        complete = self.complete_steps()
        return complete[-1] if complete else None

    def download(self, name: str, local: Path, sha256: str) -> None:
        """Object `name` into `local` (through `local`.part), kept only when its sha256 is `sha256`.

        Raises:
            CheckpointError: the object does not match (a damaged or unfinished upload).
            StoreError: the store failed.
        """
        part = local.with_name(f"{local.name}.part-{os.getpid()}")

        def fetch() -> str:
            size = self.fs.size(self.path(name))
            if size is None or size > MAX_DOWNLOAD_BYTES:
                raise StoreError(f"{self.path(name)}: the store states {size} bytes")
            digest, left = hashlib.sha256(), size
            with self.fs.open(self.path(name), "rb") as stream, os.fdopen(create_file(part), "wb") as out:
                while left > 0:
                    chunk = stream.read(min(CHUNK_BYTES, left))
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
            return digest.hexdigest()

        try:
            try:
                got = self._call(fetch, f"download {name}")
            except FileNotFoundError:
                raise CheckpointError(f"{self.path(name)} is missing in the store") from None
            if got != sha256:
                raise CheckpointError(f"{self.path(name)} does not match its sha256 in {COMPLETE}")
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)

    def remove_marker(self, step: int) -> None:
        """Delete checkpoint `step`'s COMPLETE marker, if any (before its files are replaced)."""
        marker = f"{self.checkpoint(step)}/{COMPLETE}"
        if self.exists(marker):
            self._call(lambda: self.fs.rm_file(self.path(marker)), f"delete {marker}")

    def remove_checkpoint(self, step: int) -> None:
        """Delete checkpoint `step` from the store, its COMPLETE marker first (never a half checkpoint that looks
        complete)."""
        root = self.checkpoint(step)
        self.remove_marker(step)
        self._call(lambda: self.fs.rm(self.path(root), recursive=True), f"delete {root}")

    def _fresh(self, call: Any) -> Any:
        self.fs.invalidate_cache()  # listings are cached by fsspec: another rank or process may have written
        return call()

    def _call(self, call: Any, what: str) -> Any:
        try:
            return call()
        except (FileNotFoundError, CheckpointError, StoreError):
            raise
        except Exception as err:
            raise StoreError(f"cannot {what} at {self.url}: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text:.200}" if text else type(err).__name__
