"""Copy a shard directory to object storage: `python -m shards.upload DIR s3://bucket/prefix [--s3-endpoint-url U]`.

Every shard the manifest lists is uploaded and its size checked on the store, then manifest.json last: a reader
that finds the manifest finds every shard it names, and an interrupted upload is repeated with the same command
(everything is uploaded again: shards of another data set can have the same names and sizes). Works for the fsspec
stores (s3://, gs://); credentials come from the store's standard environment and files. HTTP servers are filled by
their own means (copy the directory to where the server serves it, or serve it with `python -m shards.serve`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shards.manifest import MANIFEST, read_manifest
from shards.remote import FSSPEC_SCHEMES, RemoteOptions, ShardUnavailable, fsspec_filesystem, join, scheme
from shards.urls import ShardsError


def upload(root: str | Path, url: str, options: RemoteOptions) -> list[str]:
    """Upload the shard directory `root` to `url`; returns the names uploaded, the manifest last.

    Raises:
        ShardsError: an invalid manifest, a shard missing locally, a store that is not an fsspec one, or a size
            differing on the store after the upload.
    """
    kind = scheme(url)
    if kind not in FSSPEC_SCHEMES:
        raise ShardsError(f"{url}: uploads go to {', '.join(f'{s}://' for s in FSSPEC_SCHEMES)} stores")
    manifest = read_manifest(root)
    names = [shard["name"] for entry in manifest["splits"].values() for shard in entry["shards"]]
    for name in names:
        if not (Path(root) / name).is_file():
            raise ShardsError(f"{Path(root) / name}: listed in {MANIFEST} but missing")
    filesystem = fsspec_filesystem(kind, options)
    uploaded = []
    for name in [*names, MANIFEST]:
        local, remote = Path(root) / name, join(url, name)
        size = local.stat().st_size
        filesystem.put_file(str(local), remote)
        if filesystem.size(remote) != size:
            raise ShardsError(f"{remote}: {filesystem.size(remote)} bytes on the store after the upload, {size} here")
        uploaded.append(name)
        print(f"uploaded {name} ({size} bytes)", flush=True)
    return uploaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.upload", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="shard directory with manifest.json")
    parser.add_argument("url", help="destination, e.g. s3://bucket/colour")
    parser.add_argument(
        "--s3-endpoint-url", default="", help="an S3-compatible store's endpoint (data.s3_endpoint_url)"
    )
    args = parser.parse_args(argv)
    try:
        names = upload(args.root, args.url, RemoteOptions(s3_endpoint_url=args.s3_endpoint_url))
    except (ShardsError, ShardUnavailable) as err:
        print(f"shards.upload: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # the store client's own errors (credentials, network, permissions)
        print(f"shards.upload: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    print(f"{args.url}: {len(names)} file(s) uploaded, manifest last")
    return 0


if __name__ == "__main__":
    sys.exit(main())
