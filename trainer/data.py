"""Unpaired X/Y training streams from tar shards with WebDataset, per-(rank, worker) plans and exact resume.

The plan. For each domain and epoch the shard list is permuted (or, with `resampled`, drawn with replacement) from
(seed, domain, epoch); its samples form one sequence of `total` positions. With S = world_size x num_workers
slots, slot s reads the L = ceil(total / S) positions starting at s * total // S, wrapping around at the end: every
sample is read once per epoch, and a slot whose share is one short re-reads one sample of the next share (the
documented padding). Every slot, so every rank, reads exactly L samples per epoch, whatever the shard counts.

Inside a slot, samples pass a seeded shuffle buffer, are decoded (a counting handler skips bad ones without
sleeping) and augmented with randomness derived from (seed, domain, epoch, slot, position). A shard that comes up
short (truncated, or a remote one unreadable within its retries: shards.remote) leaves a placeholder in each
position it did not fill, a bad sample when decoded, so no position depends on a failure. The position within
the epoch is therefore the whole state of a slot: resuming replays the raw samples up to it without decoding.
X and Y are separate streams, zipped into batches inside the worker, and every batch carries its worker's state.
Shards are local files, `pipe:` commands or store URLs (http(s), s3, gs), all opened by shards.streams.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import tarfile
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import webdataset as wds

from shards.decode import BadSample, decode_extra, decode_rgb, image_extension
from shards.manifest import MANIFEST, read_manifest, split_urls
from shards.remote import RemoteOptions, ShardUnavailable, is_remote
from shards.streams import Reading, cache_for, open_shard
from shards.synthetic import BUILTIN_PREFIX, builtin_root
from shards.urls import PIPE, ShardsError, expand_shard_spec
from trainer.config import ConfigError, DataConfig
from trainer.preemption import ignore_in_worker

DOMAINS = ("x", "y")
BAD_KINDS = ("corrupt", "missing", "truncated", "unavailable")
STORE_DOWN_SHARDS = 3
"""This many shards in a row unreadable within their retry budget stop training: the store is down."""


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


MIN_SAMPLES_FOR_BAD_FRACTION = 100
"""The bad-sample fraction is judged once at least this many samples were read."""


def check_bad_fraction(bad: Counter, read: int, max_fraction: float) -> None:
    """Stop when more than `max_fraction` of the `read` samples (at least MIN_SAMPLES_FOR_BAD_FRACTION) were bad.

    Raises:
        DataError: one line with the counts by kind and what to do.
    """
    total = sum(bad.values())
    if read >= MIN_SAMPLES_FOR_BAD_FRACTION and total > max_fraction * read:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise DataError(
            f"{total} of {read} samples read were bad ({counts}), more than data.max_bad_fraction={max_fraction}; "
            "check the shards with `python -m shards.verify`"
        )


class BadSampleCounter:
    """Counts bad samples by kind and retries of remote reads; remembers the last few (shard, key) for the log;
    never sleeps."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[str] = []
        self.retries = 0

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        self.note(f"{kind}: {where}")

    def note(self, line: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(line)

    def retry(self) -> None:
        self.retries += 1

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler for tar-level failures: note the error and go on with the next shard (the
        shard then comes up short of its sample count: see `_ring`)."""
        self.note(f"unreadable: {exn.reason if isinstance(exn, ShardUnavailable) else exn!s:.200}")
        return True

    def take(self) -> dict[str, int]:
        """The counts since the last call."""
        counts, self.counts = dict(self.counts), Counter()
        return counts


LOST = "__lost__"
"""The key of a placeholder for a sample a short shard did not deliver; its value is the kind of bad sample."""


@dataclass
class ShardOutcome:
    """What reading one shard found beyond its samples: why it became unavailable, if it did."""

    failure: str | None = None


@dataclass
class StoreHealth:
    """Of one stream, across epochs: shards in a row unreadable within their retry budget, and the shards that gave
    no sample at all since the last one that did."""

    down: int = 0
    empty: set[str] = field(default_factory=set)


def shard_samples(
    url: str,
    skip: int,
    bad: BadSampleCounter,
    how: Reading,
    sha256: str | None = None,
    outcome: ShardOutcome | None = None,
) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard from sample `skip` on; tar-level errors and retries are noted in `bad`, the
    reason an unreadable remote shard gave up in `outcome`."""
    outcome = outcome or ShardOutcome()

    def handler(exn: Exception) -> bool:
        if isinstance(exn, ShardUnavailable):
            outcome.failure = exn.reason
        return bad.handler(exn)

    try:
        stream = open_shard(url, how, sha256, bad.retry)
    except OSError as err:
        handler(err)
        return
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        for index, sample in enumerate(wds.tariterators.group_by_keys(files, handler=handler)):
            if index >= skip:
                yield sample
    finally:
        try:
            stream.close()
        except Exception as err:  # a pipe: command's exit status, a connection that fails once more
            handler(err)


def _ring(
    order: list[Shard], start: int, length: int, bad: BadSampleCounter, how: Reading, health: StoreHealth
) -> Iterator[dict[str, Any]]:
    """`length` raw samples from position `start` of the concatenated `order`, wrapping around. A shard that comes
    up short of its sample count (a truncated tar, or a remote one unreadable within its retry budget) gives a
    placeholder (LOST) for each sample of this range it did not deliver, so positions, and the samples after
    them, never depend on it; they count as bad when decoded. STORE_DOWN_SHARDS unreadable shards in a row raise
    DataError."""
    total = sum(s.samples for s in order)
    index, offset = 0, start % total
    while offset >= order[index].samples:
        offset -= order[index].samples
        index += 1
    produced, distinct = 0, len({s.url for s in order})
    while produced < length:
        shard, got, outcome = order[index], 0, ShardOutcome()
        wanted = min(shard.samples - offset, length - produced)
        for sample in shard_samples(shard.url, offset, bad, how, shard.sha256, outcome):
            yield sample
            got += 1
            if got == wanted:
                break
        if got < wanted:  # a short tar ends quietly in stream mode: compare with the count
            kind = "unavailable" if outcome.failure else "truncated"
            bad.note(f"{kind}: {shard.url}: {offset + got} of {shard.samples} samples")
            for lost in range(offset + got, offset + wanted):
                yield {"__key__": f"{lost:07d}", "__url__": shard.url, LOST: kind}
        produced += wanted
        health.down = health.down + 1 if outcome.failure else 0
        if health.down >= STORE_DOWN_SHARDS:
            raise DataError(f"{outcome.failure}; {health.down} shards in a row were unreadable, the store looks down")
        if got:
            health.empty.clear()
        elif wanted:
            health.empty.add(shard.url)
        if len(health.empty) == distinct:  # with data.max_bad_fraction=1 nothing else would stop the search
            raise DataError(f"no readable samples in any of {len(health.empty)} shards (first: {order[0].url})")
        index, offset = (index + 1) % len(order), 0


def _shuffled(samples: Iterator[dict[str, Any]], rng: random.Random, size: int) -> Iterator[dict[str, Any]]:
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


class DomainStream:
    """One slot's endless stream of one domain's raw training samples, `epoch_length` per epoch."""

    def __init__(self, cfg: DataConfig, shards: list[Shard], seed: int, domain: str, slot: int, slots: int):
        self.cfg, self.shards, self.seed, self.slot, self.slots = cfg, shards, seed, slot, slots
        self.domain_id = DOMAINS.index(domain)
        self.total = sum(s.samples for s in shards)
        if self.total == 0:
            raise ConfigError(f"the {domain} training shards hold no samples (first: {shards[0].url})")
        self.epoch_length = math.ceil(self.total / slots)

    def order(self, epoch: int) -> list[Shard]:
        """This epoch's shard order: a permutation, or with data.resampled a draw with replacement."""
        rng = random.Random(mix(self.seed, self.domain_id, epoch))
        if self.cfg.resampled:
            return rng.choices(self.shards, k=len(self.shards))
        return rng.sample(self.shards, len(self.shards))

    def samples(self, epoch: int, position: int, bad: BadSampleCounter) -> Iterator[tuple[int, int, dict]]:
        """(epoch, position, raw sample) from `position` of `epoch` on, forever; earlier ones are replayed unread."""
        health = StoreHealth()
        while True:
            order = self.order(epoch)
            if self.cfg.resampled:
                total = sum(s.samples for s in order)
            else:
                total = self.total
            start = self.slot * total // self.slots
            rng = random.Random(mix(self.seed, self.domain_id, epoch, self.slot, 1))
            raw = _ring(order, start, self.epoch_length, bad, reading(self.cfg), health)
            for index, sample in enumerate(_shuffled(raw, rng, self.cfg.shuffle_buffer)):
                if index >= position:
                    yield epoch, index, sample
            epoch, position = epoch + 1, 0


def decode(sample: dict[str, Any], extra: str, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sample's image as uint8 [3, H, W] (grey/RGBA/palette converted to RGB) and its extra, if configured:
    hist -> float [24] (8-bin histograms of R, G, B), label -> uint8 [1, H, W].

    Raises:
        BadSample: a part is missing or does not decode (images over `max_pixels` included).
    """
    rgb = decode_rgb(sample[image_extension(sample)], max_pixels)  # [H, W, 3]
    with warnings.catch_warnings():
        # A read-only view: augment() copies only the crop it keeps, never writes into this.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    if extra == "none":
        return tensor, None
    value = torch.from_numpy(decode_extra(sample, extra, max_pixels).copy())
    return tensor, value if extra == "hist" else value[None]


def decode_or_count(
    sample: dict[str, Any], extra: str, bad: BadSampleCounter, max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`decode`, but a bad sample (a part missing or not decoding, or a placeholder for a lost one) is counted in
    `bad` and gives None."""
    if LOST in sample:
        bad.counts[sample[LOST]] += 1  # its shard's line in the log says why
        return None
    try:
        return decode(sample, extra, max_pixels)
    except BadSample as err:
        bad.add(err.kind, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')} ({err})")
    return None


def augment(
    image: torch.Tensor, label: torch.Tensor | None, cfg: DataConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize to load_size (times a random zoom), rotate, random-crop crop_size and flip; uint8 in and out.
    A label map gets the same geometry with nearest-neighbour sampling."""
    size = cfg.load_size
    if cfg.scale_min < 1:
        zoom = cfg.scale_min + (1 - cfg.scale_min) * torch.rand((), generator=generator).item()
        size = max(cfg.crop_size, round(cfg.load_size * zoom))
    image = resize(image, size)
    label = None if label is None else resize(label, size, nearest=True)
    if cfg.rotation_deg > 0:
        angle = math.radians((torch.rand((), generator=generator).item() * 2 - 1) * cfg.rotation_deg)
        theta = torch.tensor([[[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]]])
        image = _warp(image, theta, "bilinear")
        label = None if label is None else _warp(label, theta, "nearest")
    top = int(torch.randint(size - cfg.crop_size + 1, (), generator=generator))
    left = int(torch.randint(size - cfg.crop_size + 1, (), generator=generator))
    crop = (slice(None), slice(top, top + cfg.crop_size), slice(left, left + cfg.crop_size))
    image, label = image[crop], None if label is None else label[crop]
    if cfg.flip and torch.rand((), generator=generator) < 0.5:
        image, label = image.flip(-1), None if label is None else label.flip(-1)
    return image.contiguous(), None if label is None else label.contiguous()


def _warp(image: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="reflection", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def resize(image: torch.Tensor, size: int, nearest: bool = False) -> torch.Tensor:
    """Resize uint8 [C, H, W] to [C, size, size] (antialiased bilinear, or nearest for label maps)."""
    if image.shape[-2:] == (size, size):
        return image
    if nearest:
        return F.interpolate(image[None].float(), size=(size, size), mode="nearest")[0].to(torch.uint8)
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


class UnpairedShards(torch.utils.data.IterableDataset):
    """Batches {"x", "y" (uint8 [B, 3, H, W]), "extra_x", "extra_y", "state", "bad"} of one rank's slots.

    Worker w of the DataLoader serves logical slot (w + offset) % num_workers, so after `consumed` batches a new
    DataLoader (which starts with worker 0) continues with offset = consumed % num_workers.
    """

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        slot_states: dict[int, dict[str, list[int]]],
        offset: int,
        shards: dict[str, list[Shard]] | None = None,
    ):
        super().__init__()
        self.cfg, self.batch_size, self.seed, self.rank, self.world_size = cfg, batch_size, seed, rank, world_size
        self.shards = shards or {d: train_shards(cfg, d) for d in DOMAINS}
        self.slot_states = slot_states
        self.offset = offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.cfg.num_workers)
        logical = ((info.id if info else 0) + self.offset) % workers
        slot, slots = self.rank * workers + logical, self.world_size * workers
        state = self.slot_states.get(logical, {d: [0, 0] for d in DOMAINS})
        bad, worker_bad, worker_read = BadSampleCounter(), Counter(), 0
        streams = {
            d: DomainStream(self.cfg, self.shards[d], self.seed, d, slot, slots).samples(*state[d], bad)
            for d in DOMAINS
        }
        while True:
            batch: dict[str, Any] = {"state": {"slot": logical}}
            read = 0
            for domain in DOMAINS:
                images, extras = [], []
                while len(images) < self.batch_size:
                    epoch, position, sample = next(streams[domain])
                    read += 1
                    batch["state"][domain] = [epoch, position + 1]
                    decoded = decode_or_count(sample, self.cfg.extra, bad, self.cfg.max_image_pixels)
                    if decoded is None:
                        # The main process checks each batch; a worker whose samples are all bad would never
                        # finish one, so it checks the samples it read itself.
                        check_bad_fraction(worker_bad + bad.counts, worker_read + read, self.cfg.max_bad_fraction)
                        continue
                    image, extra = decoded
                    generator = torch.Generator().manual_seed(
                        mix(self.seed, DOMAINS.index(domain), epoch, slot, position)
                    )
                    label = extra if self.cfg.extra == "label" else None
                    image, label = augment(image, label, self.cfg, generator)
                    images.append(image)
                    extras.append(label if self.cfg.extra == "label" else extra)
                batch[domain] = torch.stack(images)
                if self.cfg.extra != "none":
                    batch[f"extra_{domain}"] = torch.stack(extras)
            batch["bad"] = bad.take()
            batch["bad_examples"], bad.examples = bad.examples, []
            batch["read"] = read
            batch["retries"], bad.retries = bad.retries, 0
            worker_bad.update(batch["bad"])
            worker_read += read
            yield batch


def extra_channels(extra: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """Generator extra-input channels from a batch's extras: hist [B, 24] -> [B, 24, H, W] maps; label uint8
    [B, 1, H, W] -> [-1, 1]."""
    if kind == "hist":
        return extra.float()[:, :, None, None].expand(-1, -1, size, size)
    return extra.float().div(127.5).sub(1.0)


class UnpairedLoader:
    """One rank's endless training batches on the device: {"x", "y"} float in [-1, 1], plus "extra_x"/"extra_y"
    generator channels when data.extra is set. Tracks the data position (`state_dict`) and bad-sample counts."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device):
        """Resolves and checks the training shards of both domains and the cache directory now (a wrong data.root
        fails here, before a run writes anything); the stream starts on the first batch.

        Raises:
            ConfigError: data.root, the shard URLs or data.cache_dir cannot be used (one line).
        """
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        check_cache_dir(cfg)
        self.shards = {d: train_shards(cfg, d) for d in DOMAINS}
        self.rank, self.world_size, self.device = rank, world_size, device
        self.consumed = 0
        self.slot_states: dict[int, dict[str, list[int]]] = {}
        self.bad: Counter = Counter()
        self.read = 0
        self.retries = 0
        self._iterator: Iterator | None = None

    def plan_id(self) -> str:
        """What the data plan is made of - each domain's shard names and sample counts, in order - as a digest: a
        position in one plan means nothing in another. Names, not URLs, so the same shards moved elsewhere (a
        node-local copy, a bucket) keep their positions."""
        listing = {d: [(shard.url.rsplit("/", 1)[-1], shard.samples) for shard in self.shards[d]] for d in DOMAINS}
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last batch returned."""
        return {
            "plan": self.plan_id(),
            "world_size": self.world_size,
            "num_workers": max(1, self.cfg.num_workers),
            "consumed": self.consumed,
            "slots": {str(k): v for k, v in self.slot_states.items()},
            "bad": dict(self.bad),
            "read": self.read,
            "retries": self.retries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Continue from `state`: exactly on the same world size, worker count and shards; otherwise from the
        start of the oldest epoch any slot was in (the plan of another size cannot continue mid-epoch), or, when
        the training shards changed (another data.root, shards added or rewritten), from the start of epoch 0.
        Returns what was not continued, in words, or None."""
        slots = {int(k): v for k, v in state["slots"].items()}
        same_data = state.get("plan", self.plan_id()) == self.plan_id()  # checkpoints before plan ids: unknown
        note, workers = None, max(1, self.cfg.num_workers)
        if same_data and state["world_size"] == self.world_size and state["num_workers"] == workers:
            self.consumed, self.slot_states = state["consumed"], slots
        else:
            epochs = {d: min((s[d][0] for s in slots.values()), default=0) for d in DOMAINS}
            if not same_data:
                epochs = dict.fromkeys(DOMAINS, 0)
                note = (
                    "the training shards differ from those the checkpoint's data position refers to (another "
                    "data.root, or shards added, removed or rewritten): the data order starts afresh at epoch 0"
                )
            self.consumed = 0
            self.slot_states = {w: {d: [epochs[d], 0] for d in DOMAINS} for w in range(workers)}
        self.bad, self.read = Counter(state.get("bad", {})), state.get("read", 0)
        self.retries = state.get("retries", 0)
        self._iterator = None
        return note

    def _start(self) -> Iterator:
        workers = self.cfg.num_workers
        dataset = UnpairedShards(
            self.cfg,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.slot_states,
            offset=self.consumed % max(1, workers),
            shards=self.shards,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # Our randomness derives from data positions; a generator of its own keeps the loader's worker seeds
            # from drawing on the global RNG, whose stream a resumed run continues exactly (dropout).
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_in_worker,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except DataError as err:  # from a worker: its message ends with the original one
            failure = str(err).rstrip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
            traceback.clear_frames(err.__traceback__)  # so that nothing but us keeps the loader's iterator alive
        else:
            failure = None
        if failure is not None:
            self._iterator = None  # its workers stop now, not when a garbage collection finds them
            raise DataError(failure)
        self.consumed += 1
        state = batch["state"]
        self.slot_states[state["slot"]] = {d: state[d] for d in DOMAINS}
        self.bad.update(batch["bad"])
        self.read += batch["read"]
        self.retries += batch["retries"]
        for example in batch["bad_examples"]:
            print(f"[data rank {self.rank}] bad sample {example}")
        self._check_bad_fraction()
        out = {}
        for domain in DOMAINS:
            images = batch[domain].to(self.device, non_blocking=True)
            out[domain] = images.float().div_(127.5).sub_(1.0)
            if self.cfg.extra != "none":
                extra = batch[f"extra_{domain}"].to(self.device, non_blocking=True)
                out[f"extra_{domain}"] = extra_channels(extra, self.cfg.extra, images.shape[-1])
        return out

    def counters(self) -> dict[str, float]:
        """The counts of this rank (samples read, bad samples by kind, retried remote reads): summed over ranks
        they are the run's."""
        bad = {f"data/bad_{kind}": float(self.bad.get(kind, 0)) for kind in BAD_KINDS}
        return {"data/samples_read": float(self.read), "data/retries": float(self.retries), **bad}

    def progress(self) -> dict[str, float]:
        """The epoch each domain's reading of this rank has reached (data/epoch_x, data/epoch_y)."""
        out = {}
        for domain in DOMAINS:
            epochs = [state[domain][0] for state in self.slot_states.values()]
            out[f"data/epoch_{domain}"] = float(min(epochs, default=0))
        return out

    def _check_bad_fraction(self) -> None:
        check_bad_fraction(self.bad, self.read, self.cfg.max_bad_fraction)


@dataclass
class TestSet:
    """One rank's share of the test images (every world_size-th of the first `total`), resized, in [-1, 1] on the
    CPU; y[k] = T(x[k]) when `paired` (synthetic data), and then x and y hold the same keys."""

    x: torch.Tensor  # [n, 3, H, W]
    y: torch.Tensor  # [m, 3, H, W]; m == n when paired
    extra_x: torch.Tensor | None  # [n, C, H, W] generator extra channels, or None
    extra_y: torch.Tensor | None
    paired: bool
    total_x: int  # test images of X over all ranks' shares (the largest share is ceil(total_x / world_size))
    total_y: int


def load_test_images(
    cfg: DataConfig, count: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
) -> TestSet | None:
    """This rank's share of the first `count` samples of each test split of data.root (bad samples are skipped;
    paired splits keep only keys readable in both); None without test splits or with count 0."""
    if not cfg.root or count == 0:
        return None
    root = data_root(cfg.root, cfg.load_size)
    try:
        manifest = read_manifest(root, reading(cfg).remote)
    except ShardsError as err:
        raise ConfigError(str(err)) from None
    if not {"x-test", "y-test"} <= set(manifest["splits"]):
        return None
    synthetic = manifest.get("synthetic")
    paired = isinstance(synthetic, dict) and synthetic.get("paired_test") is True
    bad = BadSampleCounter()
    shares, totals = {}, []
    for domain in DOMAINS:
        share: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        seen = 0
        urls = split_urls(root, manifest, f"{domain}-test")
        samples = (s for url in urls for s in shard_samples(url, 0, bad, reading(cfg)))
        for sample in itertools.islice(samples, count):
            seen += 1
            if (seen - 1) % world_size != rank:
                continue
            decoded = decode_or_count(sample, cfg.extra, bad, cfg.max_image_pixels)
            if decoded is not None:
                image, extra = decoded
                if cfg.extra == "label":
                    extra = resize(extra, cfg.crop_size, nearest=True)
                share[sample["__key__"]] = (resize(image, cfg.crop_size), extra)
        shares[domain], totals = share, totals + [seen]
    if bad.examples:
        print(f"test split: skipped {sum(bad.counts.values())} bad samples, e.g. {bad.examples[0]}")
    if paired:
        keys = [k for k in shares["x"] if k in shares["y"]]
        shares = {d: {k: shares[d][k] for k in keys} for d in DOMAINS}
    stacked = [stack_test_images(list(shares[d].values()), cfg.extra, cfg.crop_size, device) for d in DOMAINS]
    (x, extra_x), (y, extra_y) = stacked
    return TestSet(x, y, extra_x, extra_y, paired, *totals)


def stack_test_images(
    items: list[tuple[torch.Tensor, torch.Tensor | None]], extra: str, size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One domain's test images (uint8 [3, size, size]) and their extras as a TestSet holds them, on `device`:
    images in [-1, 1] [n, 3, size, size] (n may be 0) and generator extra channels (None without extras or
    images)."""
    images = torch.stack([i for i, _ in items]) if items else torch.empty(0, 3, size, size, dtype=torch.uint8)
    images = images.float().div(127.5).sub(1.0).to(device)
    if extra == "none" or not items:
        return images, None
    return images, extra_channels(torch.stack([e for _, e in items]), extra, size).to(device)
