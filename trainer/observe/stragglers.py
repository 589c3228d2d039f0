"""Per-rank timing across ranks. Each logging window gathers, with its one collective, every rank's own time per
update (the wall time of data loading and the update outside the calls where ranks wait for each other: the
backward passes that reduce gradients, the optimizer steps, the collectives; Engine.synchronizing), its data wait
per update and its memory, and logs each as min/median/max over the ranks with the slowest rank named.

A rank that is slow (a throttled device, a slow disk, a busy host) makes its peers wait in the next gradient
reduction, so under DDP every rank's step takes as long as the slowest one's: the step time names nobody, the own
time does. Under ZeRO-3 and FSDP2 the forward passes gather parameters too, so a peer's wait for a slow rank
counts as its own time there, and only a slow loader (data wait) stands out.

StragglerWatch warns on the console when the same rank's own time exceeds the median rank's by
logging.straggler_factor in logging.straggler_windows windows in a row (once per such episode). It skips a process's
first window, which holds one-time work: warm-up, and DDP rebuilding its gradient buckets in the second update's
forward pass, where each rank waits for the main one.
"""

from __future__ import annotations

import statistics
from typing import Callable

OWN_TIME = "perf/own_time_s"  # per update, this rank's own time (see the module docstring)
DATA_WAIT = "perf/data_wait_s"  # per update, this rank's wait for its loader
SPREAD = (OWN_TIME, DATA_WAIT, "mem/host_rss_gb", "mem/peak_allocated_gb")  # logged as /min, /median, /max
SLOWEST_RANK = "perf/slowest_rank"  # the rank with the largest own time in the window
MIN_EXCESS_S = 1e-3  # an own time less than this above the median is never slow (timer noise on tiny steps)


def spread(name: str, per_rank: list[float]) -> dict[str, float]:
    """`name`/min, /median and /max of the ranks' values."""
    return {f"{name}/min": min(per_rank), f"{name}/median": statistics.median(per_rank), f"{name}/max": max(per_rank)}


def slowest(own: list[float]) -> int:
    """The rank with the largest own time (the lowest such rank on ties)."""
    return max(range(len(own)), key=lambda rank: (own[rank], -rank))


class StragglerWatch:
    """Follows the slowest rank from window to window and warns when one stays slow."""

    def __init__(self, factor: float, windows: int, warn: Callable[[str], None]):
        """
        Args:
            factor: a rank is slow in a window when its own time exceeds the median rank's (the lower median: with
                two ranks, the faster one) by this factor; 0 never warns.
            windows: warn when the same rank is slow in this many windows in a row.
            warn: called with the one-line warning (Console.message).
        """
        self.factor, self.windows, self.warn = factor, windows, warn
        self.suspect: int | None = None
        self.count = 0
        self.first = True

    def update(self, step: int, own: list[float], data_wait: list[float]) -> None:
        """Account a window that ended after update `step`, from each rank's own time and data wait per update."""
        if self.first:
            self.first = False
            return
        rank = slowest(own)
        median = statistics.median_low(own)
        is_slow = self.factor > 0 and own[rank] > self.factor * median and own[rank] - median >= MIN_EXCESS_S
        if not is_slow:
            self.suspect, self.count = None, 0
            return
        self.count = self.count + 1 if rank == self.suspect else 1
        self.suspect = rank
        if self.count == self.windows:
            self.warn(
                f"warning: rank {rank} has been the slow rank for {self.count} logging windows in a row (to update "
                f"{step}): {own[rank]:.3g} s of its own time per update against the median rank's {median:.3g} s "
                f"(logging.straggler_factor={self.factor:g}), {data_wait[rank]:.3g} s of it waiting for data; every "
                "other rank waits for it"
            )
