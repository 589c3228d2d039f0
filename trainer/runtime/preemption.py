"""Stopping on a signal: SIGUSR1 (SLURM's `--signal=B:USR1@T`, forwarded) and SIGTERM mean preemption, SIGINT
(Ctrl-C) means the user stops the run. Both set a flag that the training loop checks on step boundaries; it then
saves a checkpoint and exits, with PREEMPTED_EXIT_CODE (the SLURM scripts requeue) or INTERRUPTED_EXIT_CODE.

The handler only sets a flag, so a second SIGUSR1/SIGTERM during the save changes nothing: the save finishes. A
second SIGINT is the user insisting: the process exits at once, saying what is lost. A SIGUSR1/SIGTERM that arrives
during start-up, before the flag exists, was recorded (process_exit.record_early_signals) and is taken over
by the flag, so the run stops as if signalled in the loop instead of dying of the signal's default action.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from trainer.runtime.process_exit import early_signal, exit_process
from trainer.runtime.run_files import write_atomic

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" - the SLURM scripts requeue on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
PREEMPTED_MARKER = "PREEMPTED"  # written to the run directory with the step, for launchers that hide exit codes
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    """Installs the handlers on creation (main thread only) and takes over a signal recorded before
    (`early_signal`); `raised` tells whether a signal arrived. The training loop keeps `step` and
    `saved_step` current, for the message of a second Ctrl-C. Loader workers ignore the signals
    (`ignore_in_worker`): their parent handles them."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.step = self.saved_step = 0
        self.pid = os.getpid()
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self.signal = self.signal or early_signal()  # after installing: no signal falls between the two

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self.pid:
            return
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            lost = self.step - self.saved_step
            print(
                f"interrupted again: stopped at step {self.step} without saving; the {lost} step(s) since "
                f"{'the checkpoint of step ' + str(self.saved_step) if self.saved_step else 'the start'} are lost",
                file=sys.stderr,
                flush=True,
            )
            exit_process(INTERRUPTED_EXIT_CODE)
        if signum == signal.SIGINT and self.signal is None:
            print(
                "interrupt: saving a checkpoint within a few steps, then stopping (Ctrl-C again stops at once "
                "without saving)",
                file=sys.stderr,
                flush=True,
            )
        self.signal = self.signal or signum

    @property
    def raised(self) -> bool:
        return self.signal is not None

    @property
    def interrupted(self) -> bool:
        """The user pressed Ctrl-C (SIGINT), rather than a scheduler preempting the run."""
        return self.signal == signal.SIGINT


def mark_preempted(run_dir: Path, step: int) -> None:
    """Leave RUN/PREEMPTED naming the step that was saved (removed again when the run resumes)."""
    write_atomic(run_dir / PREEMPTED_MARKER, f"{step}\n")


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: keep the stop signals meant for the training process away from its loader
    workers. A launcher that signals the training process's whole process group (torchelastic stopping its workers
    on a membership change) would otherwise kill the workers first, and the training process would fail instead
    of saving; so each worker leaves the group, and ignores SIGUSR1 and SIGINT. SIGTERM keeps its default action:
    the loader itself stops a worker that way when it shuts down."""
    os.setpgid(0, 0)
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
