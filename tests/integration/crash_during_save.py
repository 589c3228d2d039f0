"""trainer/main.py, killed (SIGKILL, as a preemption's grace period ends) at one phase of one checkpoint's save:

    python tests/integration/crash_during_save.py PHASE STEP [trainer/main.py arguments]

PHASE is where the save of checkpoint STEP dies:
  rank-state     every rank state written, before units.safetensors
  mid-units      half of units.safetensors written
  before-rename  COMPLETE written, before step_X.tmp is renamed to step_X
  before-latest  renamed, before `latest` is replaced
  mid-rotation   during the deletion of the checkpoint the rotation drops (one file of it removed)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import from the repo root

import trainer.checkpoint.save as checkpoint  # noqa: E402
from trainer.main import main  # noqa: E402

PHASES = ("rank-state", "mid-units", "before-rename", "before-latest", "mid-rotation")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, step: int) -> None:
    """Patch the file operations of trainer.checkpoint so that the save of `step` dies at `phase`."""
    name = f"step_{step:08d}"
    write_file, write_atomic, replace, rmtree = (
        checkpoint.write_file,
        checkpoint.write_atomic,
        os.replace,
        shutil.rmtree,
    )

    def write_file_then_die(path: Path, data: bytes | str) -> None:
        if path.parent.name == f"{name}.tmp" and path.name == checkpoint.UNIVERSAL:
            if phase == "mid-units":
                write_file(path, data[: len(data) // 2])
            if phase in ("rank-state", "mid-units"):
                die()
        write_file(path, data)

    def replace_then_die(src, dst) -> None:
        if phase == "before-rename" and Path(src).name == f"{name}.tmp":
            die()
        replace(src, dst)

    def write_atomic_then_die(path: Path, data: bytes | str) -> None:
        if phase == "before-latest" and path.name == checkpoint.LATEST and data.strip() == name:
            die()
        write_atomic(path, data)

    def rmtree_then_die(path, *args, **kwargs) -> None:
        latest = Path(path).parent / checkpoint.LATEST
        if phase == "mid-rotation" and str(path).endswith(".old") and latest.read_text().strip() == name:
            next(p for p in Path(path).iterdir() if p.is_file()).unlink()
            die()
        rmtree(path, *args, **kwargs)

    checkpoint.write_file, checkpoint.write_atomic = write_file_then_die, write_atomic_then_die
    os.replace, shutil.rmtree = replace_then_die, rmtree_then_die


if __name__ == "__main__":
    assert sys.argv[1] in PHASES, f"PHASE must be one of {PHASES}"
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
