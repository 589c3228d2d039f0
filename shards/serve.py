"""Serve a shard directory over HTTP with byte ranges: `python -m shards.serve DIR [--port 8000] [--bind ADDR]`.

Any web server that answers `Range: bytes=N-` works for training (nginx, a bucket's HTTP endpoint); this one needs
nothing but Python, for a node that holds the shards or a quick test. Only regular files under DIR are served,
reached without a symlink: each path component below DIR is opened relative to its parent without following one
(O_NOFOLLOW), so a link in DIR can never serve a file from elsewhere; anything else, a directory listing included,
is 404. The standard library's http.server has no ranges, hence this handler.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class ShardRequestHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of files under `directory`, with single `bytes=` ranges (206) and Content-Length always."""

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def list_directory(self, path: str | os.PathLike) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "directory listings are not served")

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)  # .. and absolute parts dropped
        handle = open_below(self.directory, os.path.relpath(path, self.directory))
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such shard")
            return
        with handle:
            self._send(handle, path, body)

    def _send(self, handle: BinaryIO, path: str, body: bool) -> None:
        size = os.fstat(handle.fileno()).st_size
        start, end = 0, size - 1
        match = RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Type", "application/x-tar" if path.endswith(".tar") else "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            handle.seek(start)
            self.send_body(handle, end - start + 1)

    def send_body(self, handle: BinaryIO, length: int) -> None:
        """Write `length` bytes of `handle` to the client."""
        shutil.copyfileobj(_limited(handle, length), self.wfile, 1 << 20)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def open_below(directory: str, relative: str) -> BinaryIO | None:
    """The regular file `relative` (a normalized relative path) under `directory`, opened one component at a time,
    each relative to its parent and without following a symlink, and without blocking on a FIFO; None for anything
    else (missing, a symlink anywhere below `directory`, a directory, a special file)."""
    parts = relative.split(os.sep)
    if relative in ("", os.curdir) or os.pardir in parts:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW
    try:
        parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            child = os.open(part, flags | os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=parent)
    except OSError:  # ELOOP for a symlink, ENOTDIR for a symlinked or non-directory component
        return None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


class _limited:
    """The first `length` bytes of a file, as a readable for shutil.copyfileobj."""

    def __init__(self, handle: BinaryIO, length: int) -> None:
        self.handle, self.left = handle, length

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data


class ShardServer(ThreadingHTTPServer):
    """A threaded HTTP server of one shard directory; `url` is its base URL. Use as a context manager to run it
    in a background thread."""

    daemon_threads = True

    def __init__(
        self,
        directory: str | os.PathLike,
        bind: str = "127.0.0.1",
        port: int = 0,
        handler: type[ShardRequestHandler] = ShardRequestHandler,
        verbose: bool = False,
    ) -> None:
        super().__init__((bind, port), partial(handler, directory=str(Path(directory).resolve())))
        self.verbose = verbose
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ShardServer:
        self._thread = threading.Thread(target=self.serve_forever, name="shard-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the shard directory (or a directory above several)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    if not Path(args.directory).is_dir():
        print(f"shards.serve: {args.directory} is not a directory", file=sys.stderr)
        return 2
    server = ShardServer(args.directory, args.bind, args.port, verbose=not args.quiet)
    print(f"serving {Path(args.directory).resolve()} at {server.url}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
