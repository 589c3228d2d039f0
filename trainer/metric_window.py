"""MetricWindow: the metrics of one logging interval (logging.every_steps). Per-step stats are summed on the device
(no host sync per step); at the interval's end one collective (Engine.reduce) averages them over ranks together
with this rank's values (data epochs, memory, images/s per rank, non-finite update counts) and sums the data
counters; the window adds the LRs, the timing (images/s, step time, data-wait fraction) and, under fp16, the loss
scales, hands the record to its sinks (tracker, console) and starts over.

It logs nothing itself and decides nothing about stopping (trainer.nonfinite's guard does, from the counts it is
fed here).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch

from trainer.data import UnpairedLoader
from trainer.engine import Engine
from trainer.intervals import is_due
from trainer.nonfinite import NonfiniteGuard

Sink = Callable[[int, dict[str, float]], None]  # (step, logged): Tracker.log, Console.interval


def accumulate(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Add `stats` into `sums` key by key (on the device: no host sync)."""
    for key, value in stats.items():
        sums[key] = sums[key] + value if key in sums else value


class MetricWindow:
    """Accumulates per-step stats; `flush` reduces, times and publishes them when `due`."""

    def __init__(
        self,
        engine: Engine,
        loader: UnpairedLoader,
        nonfinite: NonfiniteGuard,
        every_steps: int,
        total_steps: int,
        rank_images_per_step: int,
        global_batch: int,
        fp16: bool,
        sinks: Sequence[Sink] = (),
    ):
        """
        Args:
            nonfinite: fed every step's stats; its counts since the last flush are logged with the window.
            rank_images_per_step: images per domain per update on this rank (batch size x micro-batches).
            global_batch: images per domain per update on all ranks.
            fp16: log the loss scales (loss_scale/g, loss_scale/d).
            sinks: called with (step, logged) at each flush, in order.
        """
        self.engine, self.loader, self.nonfinite = engine, loader, nonfinite
        self.every_steps, self.total_steps = every_steps, total_steps
        self.rank_images_per_step, self.global_batch, self.fp16 = rank_images_per_step, global_batch, fp16
        self.sinks = tuple(sinks)
        self.restart()

    def restart(self) -> None:
        """Start an empty window now."""
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()
        self.data_wait_s = 0.0

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time the block as waiting for data (perf/data_wait_fraction)."""
        start = time.perf_counter()
        yield
        self.data_wait_s += time.perf_counter() - start

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Account one update's stats (device tensors: loss terms, grad norms)."""
        accumulate(self.sums, stats)
        self.nonfinite.add(stats)
        self.steps += 1

    def due(self, step: int) -> bool:
        """Whether the window closes after update `step`: every logging.every_steps and at the last update."""
        return is_due(step, self.every_steps, self.total_steps)

    def flush(self, step: int) -> dict[str, float]:
        """Close the window after update `step`: one collective (a call on every rank), then the sinks get the
        record, then a new window starts.

        Returns:
            The record: each stat's mean over the window's steps and the ranks, loss/nonfinite_{g,d}, data/*
            (counters summed over ranks), mem/*, lr/*, perf/* and, under fp16, loss_scale/*.
        """
        elapsed = time.perf_counter() - self.started
        rank_values = {
            **self.loader.progress(),
            **self.engine.memory_metrics(),
            "perf/images_per_s_per_rank": self.steps * self.rank_images_per_step / elapsed,
        }
        logged = self.engine.reduce(  # one collective for everything
            {
                **{key: value / self.steps for key, value in self.sums.items()},
                **self.nonfinite.take(),
                **{key: torch.tensor(value) for key, value in rank_values.items()},
            },
            sums={key: torch.tensor(value) for key, value in self.loader.counters().items()},  # totals of all ranks
        )
        logged.update(
            {
                "lr/g": self.engine.lr("g"),
                "lr/d": self.engine.lr("d"),
                "perf/images_per_s": self.steps * self.global_batch / elapsed,
                "perf/step_time_s": elapsed / self.steps,
                "perf/data_wait_fraction": self.data_wait_s / elapsed,
            }
        )
        if self.fp16:
            logged.update({"loss_scale/g": self.engine.loss_scale("g"), "loss_scale/d": self.engine.loss_scale("d")})
        for sink in self.sinks:
            sink(step, logged)
        self.restart()
        return logged
