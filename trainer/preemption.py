"""Preemption: SIGUSR1 (SLURM's `--signal=B:USR1@T`, forwarded) and SIGTERM set a flag; the training loop checks
it on step boundaries, saves a checkpoint and exits with PREEMPTED_EXIT_CODE so the job script requeues.

The handler only sets a flag, so a second signal during the save changes nothing: the save finishes.
"""

from __future__ import annotations

import signal
from pathlib import Path

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" - the SLURM scripts requeue on it
PREEMPTED_MARKER = "PREEMPTED"  # written to the run directory with the step, for launchers that hide exit codes
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs the handlers on creation (main thread only); `raised` tells whether a signal arrived."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    @property
    def raised(self) -> bool:
        return self.signal is not None


def mark_preempted(run_dir: Path, step: int) -> None:
    """Leave RUN/PREEMPTED naming the step that was saved (removed again when the run resumes)."""
    (run_dir / PREEMPTED_MARKER).write_text(f"{step}\n")
