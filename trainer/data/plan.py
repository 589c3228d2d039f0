"""Where the training samples come from: the data root (a directory, a store URL or a built-in synthetic task),
each domain's shards with their sample counts, and the seeds every plan derives from."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from shards.manifest import MANIFEST, read_manifest, split_urls
from shards.remote import RemoteOptions, is_remote
from shards.streams import Reading, cache_for, open_shard
from shards.synthetic import BUILTIN_PREFIX, builtin_root
from shards.urls import PIPE, ShardsError, expand_shard_spec
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig

DOMAINS = ("x", "y")


class DataError(RuntimeError):
    """Training data that cannot go on (too many bad samples, a store that is down); one line."""


def mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps); stable across processes and Python runs."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    sha256: str | None = None  # from the manifest; lets a remote shard go through the cache


def reading(cfg: DataConfig) -> Reading:
    """How `cfg` reads shards: remote retries and endpoint, and the local cache."""
    remote = RemoteOptions(
        cfg.retries, cfg.retry_backoff_s, cfg.io_timeout_s, cfg.s3_endpoint_url, cfg.io_min_rate_kib_s * 1024
    )
    return Reading(remote, cfg.cache_dir, int(cfg.cache_max_gb * 2**30))


def count_samples(url: str, how: Reading) -> int:
    """Samples in one tar shard, by reading its headers (a scan, for shards without a manifest).

    Raises:
        ShardsError: the shard cannot be read (one line naming it).
    """
    keys = set()
    mode = "r|*" if url.startswith(PIPE) or is_remote(url) else "r:*"  # a local file seeks past member data
    try:
        with open_shard(url, how) as stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            members = [m.name for m in tar if m.isfile()]
    except (OSError, tarfile.TarError) as err:
        raise ShardsError(f"shard {url} cannot be read ({type(err).__name__}: {err!s:.200})") from None
    for name in members:
        keys.add(wds.tariterators.base_plus_ext(name)[0])
    return len(keys)


def check_cache_dir(cfg: DataConfig) -> None:
    """Create data.cache_dir (when set) and check that it takes files, once at start: a cache that cannot be used
    must not turn into a bad shard per read.

    Raises:
        ConfigError: one line naming data.cache_dir and the system's reason.
    """
    if cfg.cache_dir:
        try:
            cache_for(reading(cfg))
        except OSError as err:
            raise ConfigError(f"data.cache_dir={cfg.cache_dir} cannot be used ({err.strerror or err})") from None


def data_root(root: str, load_size: int = 286) -> str:
    """The shard directory `data.root` names: `builtin:NAME` is made on first use (shards.synthetic); a local
    directory must hold a manifest.json, and a folder of images gets the shards.write command that packs it.

    Raises:
        ConfigError: one line saying what data.root is instead and what to do.
    """
    if root.startswith(BUILTIN_PREFIX):
        try:
            return str(builtin_root(root))
        except ShardsError as err:
            raise ConfigError(str(err)) from None
    if is_remote(root):  # its manifest is read (with retries) by whoever needs it
        return root
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"data.root={root} does not exist; give a shard directory (manifest.json) or builtin:colour")
    if (path / MANIFEST).is_file():
        return root
    pack = f"python -m shards.write --root {root} --out {root.rstrip('/')}-shards --load-size {load_size}"
    if (path / "trainA").is_dir() and (path / "trainB").is_dir():
        raise ConfigError(
            f"data.root={root} holds image folders (trainA/, trainB/), not shards; pack them once with `{pack}` "
            f"and set data.root={root.rstrip('/')}-shards"
        )
    raise ConfigError(
        f"data.root={root} has no {MANIFEST}; write shards with `python -m shards.write` (image folders) or "
        "`python -m shards.synthetic`, or use data.x_train/data.y_train for shard files without a manifest"
    )


def train_shards(cfg: DataConfig, domain: str) -> list[Shard]:
    """The training shards of `domain` with their sample counts (and digests), from data.<domain>_train or root's
    manifest."""
    spec = getattr(cfg, f"{domain}_train")
    try:
        if spec:
            urls = expand_shard_spec(spec, cfg.allow_pipe, f"data.{domain}_train")
            return [Shard(url, count_samples(url, reading(cfg))) for url in urls]
        if not cfg.root:
            raise ConfigError("data.root is empty; set it to a shard directory, or set data.x_train and data.y_train")
        root = data_root(cfg.root, cfg.load_size)
        manifest = read_manifest(root, reading(cfg).remote)
        urls = split_urls(root, manifest, f"{domain}-train")
    except ShardsError as err:
        raise ConfigError(str(err)) from None
    entries = manifest["splits"][f"{domain}-train"]["shards"]
    return [Shard(url, entry["samples"], entry.get("sha256")) for url, entry in zip(urls, entries)]
