"""Resuming from the checkpoint store (checkpoint.remote) on a node whose run directory is empty or behind: the
store's newest complete checkpoint newer than the run directory's newest intact one is downloaded, every file
checked against the store's COMPLETE marker, and resumed like a local one. An unfinished upload has no COMPLETE
marker and is never a candidate; one that fails its hashes is reported and the previous one tried."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from trainer.checkpoint.format import (
    CHECKPOINTS,
    COMPLETE,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    checkpoint_step,
    verify_checkpoint,
)
from trainer.checkpoint.resume import set_aside_damaged
from trainer.checkpoint.store import CheckpointStore, StoreError
from trainer.config.checks import ConfigError
from trainer.runtime.run_files import inside, remove, write_file


def download_checkpoint(store: CheckpointStore, step: int, run_dir: Path) -> Path:
    """The store's checkpoint `step` into run_dir/checkpoints/step_XXXXXXXX (through step_XXXXXXXX.tmp, so a kill
    leaves debris, never a checkpoint), verified; returns its path.

    Raises:
        CheckpointError: the checkpoint is not complete in the store, or a file does not match its hash.
        StoreError: the store failed.
    """
    hashes = store.complete_hashes(step)
    source = store.path(store.checkpoint(step))
    if hashes is None:
        raise CheckpointError(f"checkpoint {source} is incomplete (no {COMPLETE} marker)")
    if TRAIN_STATE not in hashes or UNIVERSAL not in hashes:
        raise CheckpointError(f"checkpoint {source}: {COMPLETE} does not list {TRAIN_STATE} and {UNIVERSAL}")
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = inside(run_dir, final.with_name(f"{final.name}.tmp"))
    root.mkdir(parents=True, exist_ok=True)
    remove(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, digest in hashes.items():
        store.download(f"{store.checkpoint(step)}/{name}", tmp / name, digest)
    write_file(tmp / COMPLETE, json.dumps(hashes))
    verify_checkpoint(tmp)
    os.replace(tmp, final)
    return final


def resume_from_store(
    store: CheckpointStore, run_dir: Path, local: Path | None, report: Callable[[str], None]
) -> Path | None:
    """The checkpoint to continue from: the store's newest complete one when it is newer than `local` (the run
    directory's newest intact checkpoint, or None), downloaded; else `local`. A store that cannot be read is
    reported and `local` used, unless there is none.

    Raises:
        CheckpointError: the store cannot be read and the run directory has no checkpoint to continue from.
    """
    local_step = checkpoint_step(local) if local is not None else -1
    try:
        candidates = [step for step in store.complete_steps() if step > local_step]
        if candidates:
            set_aside_damaged(run_dir, local)  # newer local ones were skipped as damaged: out of the way
        for step in reversed(candidates):
            try:
                path = download_checkpoint(store, step, run_dir)
            except CheckpointError as err:
                report(f"skipping {err}; trying the previous checkpoint in the store")
                continue
            report(f"downloaded {store.path(store.checkpoint(step))} (verified) to continue from")
            return path
    except StoreError as err:
        if local is None:
            raise CheckpointError(f"{err}; the run directory has no checkpoint to continue from either") from None
        report(f"warning: {err}; continuing from the run directory's {local.name}")
    return local


def newest_in_store(store: CheckpointStore) -> int | None:
    """The store's newest complete checkpoint step; None when it has none or cannot be read now."""
    try:
        return store.newest_complete()
    except (StoreError, CheckpointError):
        return None


def clear_store(store: CheckpointStore, overwrite: bool) -> None:
    """Under train.resume=none: refuse a store holding checkpoints (a later resume would pick them up), unless
    train.overwrite=true, which deletes them.

    Raises:
        ConfigError: the store holds checkpoints and overwrite is false.
    """
    try:
        steps = store.steps()
    except StoreError as err:
        raise CheckpointError(str(err)) from None
    if steps and not overwrite:
        raise ConfigError(
            f"checkpoint.remote={store.url} already has checkpoints; use train.resume=auto to continue, or "
            "train.overwrite=true to delete them and start over"
        )
    try:
        for step in steps:
            store.remove_checkpoint(step)
    except StoreError as err:
        raise CheckpointError(str(err)) from None
