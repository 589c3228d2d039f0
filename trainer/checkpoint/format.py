"""What a checkpoint directory holds and how it is recognised: names, the step directories, the COMPLETE
marker's hashes, train_state.json read within bounds, and best.json."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shards.bounded_read import BoundedReadError, read_json
from shards.manifest import sha256_file
from shards.urls import check_relative_name

CHECKPOINTS = "checkpoints"

LATEST = "latest"

BEST = "best.json"

COMPLETE = "COMPLETE"

UNIVERSAL = "units.safetensors"

TRAIN_STATE = "train_state.json"

STATE_FORMAT = 1
"""train_state.json's format: 1 adds format, images_seen and config_hash (earlier checkpoints have none: 0)."""

STEP_DIR = re.compile(r"step_(\d{8})")

DAMAGED = ".damaged"
"""Suffix of checkpoints set aside because they were damaged (never resumed from, never deleted)."""

DEBRIS = (".tmp", ".old")
"""Suffixes of the directories an interrupted save or rotation leaves, which the next save removes."""

MAX_STEP = 10**8 - 1
"""Steps a checkpoint name can hold (step_XXXXXXXX)."""

MAX_WORLD_SIZE = 1 << 20

MOMENTS = (".exp_avg", ".exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, damaged, missing, another architecture) or saved."""


def rank_file(rank: int) -> str:
    """The name of rank `rank`'s own state file in a checkpoint."""
    return f"rank_{rank:05d}.safetensors"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory's name (step_XXXXXXXX exactly), else None."""
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def step_dirs(run_dir: Path) -> list[Path]:
    """The real directories (no symlinks) of a run named exactly step_XXXXXXXX, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run (`step_dirs`) that carry a COMPLETE marker, oldest first."""
    return [p for p in step_dirs(run_dir) if (p / COMPLETE).is_file()]


def _read_json(path: Path) -> Any:
    try:
        return read_json(path, "checkpoint file")
    except BoundedReadError as err:
        raise CheckpointError(str(err)) from None


def read_train_state(path: Path) -> dict[str, Any]:
    """A checkpoint's train_state.json, with the fields resuming relies on checked; a checkpoint named
    step_XXXXXXXX must hold that step.

    Raises:
        CheckpointError: the file is missing, not JSON, or a field has the wrong kind of value.
    """
    state = _read_json(path / TRAIN_STATE)
    checks = {
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_STEP,
        "world_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WORLD_SIZE,
        "backend": lambda v: isinstance(v, str),
        "model": lambda v: v is None or isinstance(v, dict),
        "format": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= STATE_FORMAT,
        "images_seen": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    }
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} is not a JSON object")
    state.setdefault("model", None)  # checkpoints of earlier versions did not record the architecture
    state.setdefault("format", 0)
    state.setdefault("images_seen", None)  # unknown before format 1
    for key, ok in checks.items():
        if not ok(state.get(key)):
            raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} has {key}={state.get(key)!r:.60}")
    named = checkpoint_step(path)
    if named is not None and state["step"] != named:
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} has step={state['step']}, its name says {named}")
    return state


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint against its COMPLETE marker (every file listed, a regular file, its hash matching);
    returns its train_state.json.

    Raises:
        CheckpointError: one line naming the checkpoint and what is wrong.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker)")
    hashes = _read_json(path / COMPLETE)
    if not isinstance(hashes, dict) or TRAIN_STATE not in hashes or UNIVERSAL not in hashes:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} does not list {TRAIN_STATE} and {UNIVERSAL}")
    for name, digest in hashes.items():
        try:
            check_relative_name(name, str(path / COMPLETE), "file name")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing or not a regular file")
        if sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its sha256")
    return read_train_state(path)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """RUN/checkpoints/best.json ({step, select, score, metrics}) or None before the first selection.

    Raises:
        CheckpointError: the file is not such a record.
    """
    path = Path(run_dir) / CHECKPOINTS / BEST
    if not path.is_file():
        return None
    record = _read_json(path)
    fields = {"step": int, "select": str, "score": (int, float), "metrics": dict}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        raise CheckpointError(f"{path} is not a best-checkpoint record (step, select, score, metrics)")
    return record
