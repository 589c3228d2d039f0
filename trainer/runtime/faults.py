"""Faults for tests, injected where a phase begins (trainer.runtime.watchdog): `CYCLEGAN_TEST_FAULT=KIND:PHASE:RANK:N`
makes rank RANK, entering PHASE, sleep N seconds every time (`delay`: a straggler), or raise during update N
(`oom`: a CUDA out-of-memory error, `host_oom`: MemoryError). Unset in real runs, where it costs one None check
per phase."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

ENV = "CYCLEGAN_TEST_FAULT"
KINDS = ("delay", "oom", "host_oom")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    phase: str
    rank: int
    value: float  # seconds (delay) or the update during which to raise (oom, host_oom)

    def at(self, phase: str, rank: int, done: int) -> None:
        """Inject the fault if it is due: entering `phase` on `rank` after `done` finished updates."""
        if phase != self.phase or rank != self.rank:
            return
        if self.kind == "delay":
            time.sleep(self.value)
        elif done + 1 == int(self.value):
            if self.kind == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
            raise MemoryError("injected by a test")


def configured_fault() -> Fault | None:
    """The fault $CYCLEGAN_TEST_FAULT asks for, or None."""
    text = os.environ.get(ENV)
    if not text:
        return None
    kind, phase, rank, value = text.split(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={text}: the kind must be one of {', '.join(KINDS)}")
    return Fault(kind, phase, int(rank), float(value))
