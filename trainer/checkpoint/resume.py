"""Where a run continues: the newest complete checkpoint (or the one named), damaged ones set aside, and the
architecture check against the config before anything is loaded."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from trainer.checkpoint.format import (
    DAMAGED,
    CheckpointError,
    checkpoint_step,
    read_train_state,
    step_dirs,
    verify_checkpoint,
)
from trainer.config.checks import field_defaults
from trainer.config.model import TRAINING_MODEL_FIELDS, ModelConfig


def find_resume(run_dir: Path, resume: str, report: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to continue from: for `auto` the newest intact one in run_dir (damaged ones are reported
    through `report` and skipped), for a path that checkpoint, for `none` nothing. `auto` is no looser than
    `none`: a run directory whose checkpoints are all damaged is refused, never silently started over.

    Raises:
        CheckpointError: a given path that is not an intact checkpoint; under `auto`, checkpoints none of which
            is intact.
    """
    if resume == "none":
        return None
    if resume != "auto":
        verify_checkpoint(Path(resume))
        return Path(resume)
    candidates = step_dirs(run_dir)
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            report(f"skipping {err}; trying the previous checkpoint")
    if candidates:
        raise CheckpointError(
            f"train.run_dir={run_dir} has {len(candidates)} checkpoint(s) and none is intact (see above); "
            "repair or move them away to keep them, or train.resume=none train.overwrite=true to delete them "
            "and start over"
        )
    return None


def set_aside_damaged(run_dir: Path, resumed: Path | None) -> list[Path]:
    """Rename the checkpoints newer than `resumed` (damaged ones, which find_resume skipped) to
    step_XXXXXXXX.damaged: kept for inspection, out of the way of rotation, which would otherwise count them
    among the newest and delete the checkpoints this run saves. Returns their new paths."""
    after = checkpoint_step(resumed) if resumed is not None else -1
    moved = []
    for path in step_dirs(run_dir):
        if checkpoint_step(path) > after:
            target, n = path.with_name(path.name + DAMAGED), 1
            while os.path.lexists(target):  # set aside before, by an earlier resume
                n += 1
                target = path.with_name(f"{path.name}{DAMAGED}-{n}")
            os.replace(path, target)
            moved.append(target)
    return moved


def check_architecture(path: Path, model_cfg: ModelConfig) -> None:
    """Refuse to resume a checkpoint of another architecture, naming every model.* field that differs.

    Raises:
        CheckpointError: the checkpoint's model config differs from `model_cfg`.
    """
    saved = read_train_state(path)["model"]
    if saved is None:
        return  # an earlier version's checkpoint: the tensor names and shapes are checked when loading
    current = dataclasses.asdict(model_cfg)
    # A field added after the checkpoint was written holds its default there (e.g. model.family: cyclegan)
    defaults = field_defaults(ModelConfig)
    saved = {k: saved.get(k, defaults[k]) for k in current}
    for key in ("x_channels", "y_channels"):  # null is 3 (before formats were recorded; shards without a manifest)
        saved[key], current[key] = saved[key] or 3, current[key] or 3
    diffs = [
        f"model.{k}={saved[k]!r:.40}, config says {v!r:.40}"
        for k, v in current.items()
        if saved[k] != v and k not in TRAINING_MODEL_FIELDS
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} has {'; '.join(diffs)}: another architecture; change the config back, or train "
            "it in a new train.run_dir"
        )
