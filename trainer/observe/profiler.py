"""A profiler window: torch.profiler over profile.steps updates from profile.start_step on every rank, each rank's
trace written to RUN/traces/rankRRRRR.stepsA-B.pt.trace.json (Chrome trace JSON: Perfetto, chrome://tracing,
TensorBoard's profiler plugin). The loop's phases appear as labelled ranges (trainer.runtime.watchdog's phases are
record_function ranges): data, generator step, discriminator step, metric window, evaluation, checkpoint, and the
collectives inside them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from trainer.config.sections import ProfileConfig

TRACES = "traces"


class ProfileWindow:
    """`around(step)` wraps each update of the loop; the profiler runs from the first update of the window (or the
    first one a resumed run does inside it) to its last, or to `close` when the run stops before."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, on_cuda: bool, say: Callable[[str], None]):
        """`say`: where the main rank tells what was written (Console.message)."""
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.cfg, self.run_dir, self.rank, self.on_cuda, self.say = cfg, run_dir, rank, on_cuda, say
        self.profiler: torch.profiler.profile | None = None
        self.started = 0

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Run update `step` inside the window's profiler when it is one of the window's."""
        if self.profiler is None and self.cfg.steps > 0 and self.first <= step <= self.last:
            self._start(step)
        yield
        if self.profiler is not None:
            self.profiler.step()
            if step >= self.last:
                self._stop(step)

    def close(self, step: int) -> None:
        """The run stopped after update `step`: write what was traced."""
        if self.profiler is not None:
            self._stop(step)

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        memory = self.cfg.memory
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=memory, profile_memory=memory)
        self.profiler.__enter__()
        self.started = step

    def _stop(self, step: int) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        path = self.run_dir / TRACES / f"rank{self.rank:05d}.steps{self.started}-{step}.pt.trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        name = f"rank*.steps{self.started}-{step}.pt.trace.json"
        self.say(f"profiler: updates {self.started}-{step} traced into {path.parent}/{name} (one file per rank)")
