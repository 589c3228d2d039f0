"""One domain's samples for one (rank, worker) slot: its share of each epoch's permuted shards, read in order,
shuffled in a seeded buffer, with a placeholder wherever a shard came up short."""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

import webdataset as wds

from shards.remote import ShardUnavailable
from shards.streams import Reading, open_shard
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig
from trainer.data.health import LOST, STORE_DOWN_SHARDS, BadSampleCounter, ShardOutcome, StoreHealth
from trainer.data.plan import DOMAINS, DataError, Shard, mix, reading


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
