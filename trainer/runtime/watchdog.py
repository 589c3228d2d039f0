"""A watchdog per rank. The loop names the phase it is in (`Watchdog.phase`: data, generator step, evaluation,
checkpoint write, a collective, ...); a thread ends the process when no phase began or ended for
train.hang_timeout_s: a frozen peer, a stalled filesystem, a collective that never completes. It writes every
thread's Python stack (faulthandler) under the phase to RUN/diagnostics/, prints one line naming the rank, phase and
file, leaves RUN/HUNG for the Slurm scripts (which requeue the job, as after a preemption) and exits with
HANG_EXIT_CODE, which an elastic launch restarts. A frozen rank cannot report: its peers, waiting in the collective
it never joins, do.

With the stacks goes the flight recorder of torch's collectives (gloo and NCCL; `record_collectives` turns it on
before the process group exists): the last FLIGHT_RECORDER_ENTRIES collectives of this rank with their sequence
numbers and states, as JSON, so the ranks' dumps show which collective one of them never reached.

The phases also label torch.profiler traces (record_function), so a trace and a stack dump use the same names.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from trainer.runtime.faults import configured_fault
from trainer.runtime.preemption import PREEMPTED_EXIT_CODE
from trainer.runtime.run_files import write_atomic

HANG_EXIT_CODE = PREEMPTED_EXIT_CODE  # "try again later": the Slurm scripts requeue, an elastic agent restarts
HANG_MARKER = "HUNG"  # RUN/HUNG: "STEP rank R: PHASE", for launchers that hide exit codes (removed on resume)
DIAGNOSTICS = "diagnostics"
WRITE_TIMEOUT_S = 10.0  # the run directory may be the stalled filesystem: never wait longer to report
FLIGHT_RECORDER_ENTRIES = 2000


def record_collectives() -> None:
    """Turn on torch's flight recorder of collectives (unless the environment already sets its size); before the
    process group is created."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))


class Watchdog:
    """Phases and the thread that watches them; `timeout_s` 0 watches nothing (the phases still label traces)."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float, exit_fn: Callable[[int], object] = os._exit):
        """`exit_fn`: how the watchdog thread ends the process (tests pass a recorder)."""
        self.run_dir, self.rank, self.timeout_s, self.exit_fn = run_dir, rank, timeout_s, exit_fn
        self.phases: list[str] = []
        self.step = 0
        self.last_change = time.monotonic()
        self.report: Path | None = None  # the diagnostics file, once written
        self.failure: tuple[BaseException, str] | None = None  # the last exception out of a phase, and where
        self.fault = configured_fault()  # tests only (trainer.runtime.faults)
        self._closed = threading.Event()
        self._paused = 0
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run the body as phase `name` (nested in the current one) and label it in profiler traces."""
        self.phases.append(name)
        self.last_change = time.monotonic()
        try:
            if self.fault is not None:
                self.fault.at(name, self.rank, self.step)
            with torch.profiler.record_function(name):
                yield
        except BaseException as err:
            if self.failure is None or self.failure[0] is not err:  # the innermost phase names it
                self.failure = (err, self.where)
            raise
        finally:
            self.phases.pop()
            self.last_change = time.monotonic()

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """Run the block without the hang timer: a wait bounded by a timeout of its own (the final uploads)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.last_change = time.monotonic()

    def where_raised(self, err: BaseException) -> str:
        """The phase path `err` was raised in (the current one if it came from outside every phase)."""
        return self.failure[1] if self.failure is not None and self.failure[0] is err else self.where

    def at_step(self, step: int) -> None:
        """The loop finished update `step` (named in a report)."""
        self.step = step

    @property
    def where(self) -> str:
        """The phase and what it is nested in: `checkpoint > collective barrier`."""
        return " > ".join(list(self.phases)) or "between phases"

    def close(self) -> None:
        """Stop watching (the run ends, or hands over to code that has its own bounds)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._closed.wait(poll):
            if self._paused:
                continue
            idle = time.monotonic() - self.last_change
            if idle >= self.timeout_s:
                self._hang(idle)
                return

    def _hang(self, idle: float) -> None:
        where, step = self.where, self.step
        path = self.run_dir / DIAGNOSTICS / f"hang-step{step:08d}-rank{self.rank:05d}.txt"
        header = (
            f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}) made no progress for {idle:.0f} s "
            f"after update {step}, in phase: {where}\n\n"
        )
        if _bounded(lambda: _write_stacks(path, header)):
            self.report = path
            told = f"every thread's stack in {path}, the last collectives beside it"
        else:
            told = f"could not write {path} within {WRITE_TIMEOUT_S:.0f} s; every thread's stack follows"
        sys.stdout.flush()
        print(
            f"rank {self.rank}: no progress for {idle:.0f} s in phase '{where}' after update {step}; {told}; "
            f"exiting with code {HANG_EXIT_CODE} to be requeued",
            file=sys.stderr,
            flush=True,
        )
        if self.report is None:
            faulthandler.dump_traceback(2, all_threads=True)  # the descriptor: sys.stderr may be a wrapper
        else:
            _bounded(lambda: _write_collectives(path.with_suffix(".collectives.json")))
        _bounded(lambda: write_atomic(self.run_dir / HANG_MARKER, f"{step} rank {self.rank}: {where}\n"))
        self.exit_fn(HANG_EXIT_CODE)


def _write_stacks(path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        out.write(header)
        out.flush()
        faulthandler.dump_traceback(out, all_threads=True)


def _write_collectives(path: Path) -> None:
    """The flight recorder's JSON (empty without a process group)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json
    except ImportError:  # a torch built without distributed support
        return
    path.write_bytes(_dump_fr_trace_json(True, False))


def _bounded(work: Callable[[], None]) -> bool:
    """Run `work` in a thread for at most WRITE_TIMEOUT_S; True when it finished without an OSError."""
    finished, succeeded = threading.Event(), []

    def run() -> None:
        try:
            work()
            succeeded.append(True)
        except OSError:
            pass
        finally:
            finished.set()

    threading.Thread(target=run, name="hang-report", daemon=True).start()
    return finished.wait(WRITE_TIMEOUT_S) and bool(succeeded)
