"""One bounded way to read the small files that come with data and run directories (manifest.json, COMPLETE,
train_state.json, best.json, model.json, configs): regular files only, opened without following a final symlink
and without blocking on a FIFO, at most `limit` bytes, JSON nested at most MAX_DEPTH deep. Every failure is one
`BoundedReadError` line naming the file; nothing is read without bound and nothing recurses without bound.
`read_stream` bounds a stream the same way (a remote manifest); `open_regular` is how shard files are opened
(regular files only, never blocking)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

MAX_SMALL_FILE = 64 << 20
"""Bytes read at most from one JSON or YAML file (a manifest of ~300k shards fits)."""
MAX_DEPTH = 64
"""Nesting of lists and mappings accepted in JSON and YAML files (ours nest at most 5 deep)."""


FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
"""What a file that is not a regular file is, by its `stat.S_IFMT` type."""


class BoundedReadError(ValueError):
    """A file that is not a regular file, too large, not UTF-8, not valid JSON, or nested too deeply."""


def file_kind(mode: int) -> str:
    """What the file of `st_mode` `mode` is, for a message: "a FIFO", "a directory", ... or "a regular file"."""
    return "a regular file" if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), "a special file")


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """`path` opened for reading when it is a regular file (or a symlink to one), checked on the open descriptor:
    a FIFO or device swapped in never blocks the open or a read.

    Raises:
        OSError: it cannot be opened, or is not a regular file (the message names it and says what it is).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_stream(stream: BinaryIO, source: str, limit: int = MAX_SMALL_FILE) -> bytes:
    """At most `limit` bytes of `stream` (a remote object, a pipe), never more than `limit` + 1 read.

    Raises:
        BoundedReadError: the stream holds more than `limit` bytes.
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BoundedReadError(f"{source} is larger than {limit} bytes")
    return data


def read_limited(path: str | Path, limit: int = MAX_SMALL_FILE, what: str = "file") -> bytes:
    """The bytes of the regular file `path` (a symlink as its last component is refused), at most `limit`.

    Raises:
        BoundedReadError: missing, not a regular file (a FIFO, device, directory or symlink), or over `limit`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:  # the last component is a symlink
            raise BoundedReadError(f"{what} {path} is a symlink; expected a regular file") from None
        raise BoundedReadError(f"{what} {path} cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BoundedReadError(f"{what} {path} is not a regular file")
        return read_stream(handle, f"{what} {path}", limit)


def check_depth(value: Any, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """`value` itself when its lists and mappings nest at most `max_depth` deep (checked without recursion).

    Raises:
        BoundedReadError: nested deeper.
    """
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise BoundedReadError(f"{source} nests deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)
    return value


def parse_json(data: bytes | str, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text or UTF-8 bytes parsed and depth-checked.

    Raises:
        BoundedReadError: not UTF-8, not valid JSON, or nested too deeply.
    """
    try:
        value = json.loads(data)
    except UnicodeDecodeError:
        raise BoundedReadError(f"{source} is not valid JSON: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise BoundedReadError(f"{source} is not valid JSON: {err}") from None
    except RecursionError:
        raise BoundedReadError(f"{source} nests deeper than {max_depth} levels") from None
    return check_depth(value, source, max_depth)


def read_json(path: str | Path, what: str = "file", limit: int = MAX_SMALL_FILE) -> Any:
    """The JSON value of the regular file `path`, read and parsed with the bounds above.

    Raises:
        BoundedReadError: one line naming the file and what is wrong with it.
    """
    return parse_json(read_limited(path, limit, what), f"{what} {path}")
