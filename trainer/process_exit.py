"""Leaving a process that ran gloo collectives without the interpreter teardown that can abort it.

A gloo worker thread drops its last reference to a finished collective, and with it to the Python tensors the
collective used, when the scheduler next runs it. On a busy machine that can be after the main thread has returned
and begun finalizing the interpreter; the worker then needs the GIL to free those tensors, CPython ends any thread
that asks for the GIL during finalization, and libstdc++ aborts the process ("terminate called without an active
exception", SIGABRT) after a run that had finished and saved everything. `destroy_process_group` does not help while
DDP or DeepSpeed still hold the groups, and they do until the teardown itself.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """Run the atexit handlers (trackers, DataLoader workers, logging) while the interpreter is whole, flush the
    standard streams, then exit with `status`, skipping the finalization in which gloo's threads can abort."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
