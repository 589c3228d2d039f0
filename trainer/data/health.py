"""Bad samples and unreachable shards: counted per kind, tolerated up to data.max_bad_fraction, and a store that
stays down stopping the run in one line."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shards.remote import ShardUnavailable
from trainer.data.plan import DataError

BAD_KINDS = ("corrupt", "missing", "truncated", "unavailable")

STORE_DOWN_SHARDS = 3
"""This many shards in a row unreadable within their retry budget stop training: the store is down."""

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
