"""trainer/main.py, killed (SIGKILL) at one point of one checkpoint's upload to checkpoint.remote:

    python tests/integration/crash_during_upload.py PHASE STEP [trainer/main.py arguments]

PHASE is where the upload of checkpoint STEP dies:
  before-complete  every file of the checkpoint in the store, its COMPLETE marker not yet
  after-latest     the checkpoint complete in the store and `latest` naming it (the node is lost afterwards)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import from the repo root

from trainer.checkpoint.store import CheckpointStore  # noqa: E402
from trainer.main import main  # noqa: E402

PHASES = ("before-complete", "after-latest")


def arm(phase: str, step: int) -> None:
    """Patch CheckpointStore's uploads so that the upload of checkpoint `step` dies at `phase`."""
    put_bytes = CheckpointStore.put_bytes
    name = f"step_{step:08d}"

    def put_bytes_then_die(store: CheckpointStore, remote: str, data: bytes) -> None:
        if phase == "before-complete" and remote.endswith(f"{name}/COMPLETE"):
            os.kill(os.getpid(), signal.SIGKILL)
        put_bytes(store, remote, data)
        if phase == "after-latest" and remote.endswith("/latest") and data.strip() == name.encode():
            os.kill(os.getpid(), signal.SIGKILL)

    CheckpointStore.put_bytes = put_bytes_then_die


if __name__ == "__main__":
    assert sys.argv[1] in PHASES, f"PHASE must be one of {PHASES}"
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
