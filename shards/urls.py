"""Shard locations: the one place where a shard name from a manifest, a URL list or a brace pattern becomes
something webdataset may open.

webdataset decides what to do with a URL by its scheme: `pipe:CMD` runs CMD in a shell, `http://` runs curl, a
string without a scheme is a local file. Joining a directory and an untrusted name can forge a scheme
(`str(Path(".") / "pipe:rm x")` is `"pipe:rm x"`), so
  - names read from a manifest must be plain relative paths of safe components (letters, digits, `_.+-`, no
    leading dot or dash, no `..`, no `:`), and are joined to the absolute path of their root;
  - URLs a user wrote (data.x_train, data.root, --input) are remote URLs of the schemes shards.remote reads
    (http, https, s3, gs), local paths, made absolute so that no part of them reads as a scheme, or `pipe:`
    commands, accepted only when the caller allows them (data.allow_pipe).
"""

from __future__ import annotations

import os
import re
import stat
from urllib.parse import urlparse

import webdataset as wds

from shards.remote import REMOTE_SCHEMES, is_remote, join

SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
PIPE = "pipe:"


class ShardsError(ValueError):
    """A manifest, shard name or shard URL that cannot be used; the message names the file or key."""


def check_relative_name(name: object, source: str, what: str = "shard name") -> str:
    """`name` if it is a safe relative path (see the module docstring); also used for the file names a checkpoint's
    COMPLETE marker lists.

    Raises:
        ShardsError: one line naming `source` (the manifest or marker) and the name.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(SAFE_COMPONENT.fullmatch(part) and ".." not in part for part in parts):
        raise ShardsError(
            f"{source}: {what} {name!r:.120} is not a plain relative file name (letters, digits and _.+- only, "
            "no leading dot or dash, no ':' or '..')"
        )
    return name


def manifest_shard_url(root: str | os.PathLike, name: object, source: str) -> str:
    """The URL of shard `name` listed in the manifest `source` of `root`: under a remote root, or the absolute
    local path."""
    name = check_relative_name(name, source)
    if is_remote(str(root)):
        return join(str(root), name)
    return os.path.join(os.path.abspath(root), name)


def check_url(url: str, allow_pipe: bool, key: str) -> str:
    """A shard URL written by the user, ready to open (shards.streams): remote URLs and `pipe:` commands (only
    with `allow_pipe`) as they are, local files as absolute paths.

    Raises:
        ShardsError: a `pipe:` URL without allow_pipe, another scheme, or a local path that is not a file.
    """
    if url.startswith(PIPE):
        if not allow_pipe:
            raise ShardsError(f"{key}={url!r} runs a shell command; set data.allow_pipe=true to allow pipe: URLs")
        return url
    if is_remote(url):
        return url
    scheme = urlparse(url).scheme
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        schemes = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        raise ShardsError(
            f"{key}: {url!r} has the scheme {scheme}:; shards are local paths, {schemes} URLs or pipe: commands"
        )
    try:
        is_file = stat.S_ISREG(os.stat(url).st_mode)
    except OSError:
        is_file = False
    if not is_file:
        raise ShardsError(f"{key}: shard {url} does not exist or is not a regular file")
    return os.path.abspath(url)


def expand_shard_spec(spec: str, allow_pipe: bool, key: str) -> list[str]:
    """Checked shard URLs (see `check_url`) from a path, a brace pattern or several separated by spaces; a spec
    that starts with `pipe:` is one command (brace patterns inside it expand).

    Raises:
        ShardsError: a URL `check_url` refuses, or a spec naming no shards.
    """
    parts = [spec] if spec.startswith(PIPE) else spec.split()
    urls = [check_url(url, allow_pipe, key) for part in parts for url in wds.shardlists.expand_urls(part)]
    if not urls:
        raise ShardsError(f"{key}={spec!r} names no shards")
    return urls
