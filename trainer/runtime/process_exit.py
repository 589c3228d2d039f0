"""How a training process ends: without the interpreter teardown that gloo can abort, in one line when a peer
process ended, and not killed by a stop signal that arrives while it starts.

A gloo worker thread drops its last reference to a finished collective, and with it to the Python tensors the
collective used, when the scheduler next runs it. On a busy machine that can be after the main thread has returned
and begun finalizing the interpreter; the worker then needs the GIL to free those tensors, CPython ends any thread
that asks for the GIL during finalization, and libstdc++ aborts the process ("terminate called without an active
exception", SIGABRT) after a run that had finished and saved everything. `destroy_process_group` does not help while
DDP or DeepSpeed still hold the groups, and they do until the teardown itself.

This module imports nothing heavy: trainer/main.py imports it before torch, to record SIGUSR1/SIGTERM at once.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
from typing import NoReturn

PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "/gloo/transport/")
"""Words of a gloo collective's RuntimeError whose other side ended, closed or stopped responding."""
_early: list[int] = []


def exit_process(status: int) -> NoReturn:
    """Run the atexit handlers (trackers, DataLoader workers, logging) while the interpreter is whole, flush the
    standard streams, then exit with `status`, skipping the finalization in which gloo's threads can abort."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def record_early_signals() -> None:
    """Record SIGUSR1 and SIGTERM, whose default action kills the process, until trainer.runtime.preemption's flag takes
    them over (`early_signal`). Main thread only."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _early.append(signum))


def early_signal() -> int | None:
    """The first signal `record_early_signals` recorded (forgotten once returned), or None."""
    first = _early[0] if _early else None
    _early.clear()
    return first


def peer_failure(err: BaseException) -> str | None:
    """One line for a failed collective (a torch.distributed error, or gloo's words for a peer that ended or
    stopped responding) in `err` or what it was raised from, naming this rank; None for any other error."""
    dist = sys.modules.get("torch.distributed")
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        lines = str(link).splitlines() or [type(link).__name__]
        hit = [line for line in lines if any(word in line for word in PEER_LOST)] if type(link) is RuntimeError else []
        if hit or (dist is not None and isinstance(link, dist.DistError)):
            gist = _gist(hit or lines)
            return f"rank {os.environ.get('RANK', '0')}: a peer process ended or stopped responding ({gist}); stopping"
        link = link.__cause__ or link.__context__
    return None


def _gist(lines: list[str]) -> str:
    """The first line without gloo's source location and advice: `Connection closed by peer [127.0.0.1]:39607`."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0].strip())
    return text.split(". ")[0].rstrip(".")
