"""Resuming from the checkpoint store (checkpoint.remote) on a node whose run directory is empty or behind: the
store's newest complete checkpoint newer than the run directory's newest intact one is downloaded, every file
checked against the store's COMPLETE marker, and resumed like a local one. An unfinished upload has no COMPLETE
marker and is never a candidate; one that fails its hashes is reported and the previous one tried."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from shards.bounded_read import BoundedReadError, read_json
from shards.manifest import sha256_file
from trainer.checkpoint.format import (
    CHECKPOINTS,
    COMPLETE,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    checkpoint_step,
    rank_file,
    read_train_state,
    verify_checkpoint,
)
from trainer.checkpoint.resume import set_aside_damaged
from trainer.checkpoint.store import CheckpointStore, StoreError
from trainer.config.checks import ConfigError
from trainer.runtime.engine import Engine
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
    if _same_copy(final, hashes):
        return final
    tmp = inside(run_dir, final.with_name(f"{final.name}.tmp"))
    root.mkdir(parents=True, exist_ok=True)
    remove(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, digest in hashes.items():
        store.download(f"{store.checkpoint(step)}/{name}", tmp / name, digest)
    write_file(tmp / COMPLETE, json.dumps(hashes))
    verify_checkpoint(tmp)
    if final.exists():  # a local copy of this step that differs from the store's: debris the next save removes
        old = final.with_name(f"{final.name}.old")
        remove(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    return final


def _same_copy(path: Path, hashes: dict[str, str]) -> bool:
    """Whether `path` is an intact local copy of the store's checkpoint with these hashes."""
    try:
        return path.is_dir() and verify_checkpoint(path) is not None and read_json(path / COMPLETE) == hashes
    except (CheckpointError, BoundedReadError):
        return False


def resume_from_store(
    store: CheckpointStore, run_dir: Path, local: Path | None, report: Callable[[str], None], store_only: bool = False
) -> Path | None:
    """The checkpoint to continue from: the store's newest complete one when it is newer than `local` (the run
    directory's newest intact checkpoint, or None), downloaded; else `local`. A store that cannot be read is
    reported and `local` used, unless there is none; one that does not match its hashes is skipped for the previous
    one. `store_only` (ranks on other nodes get their files from the store): `local` only when it is complete in
    the store too.

    Raises:
        CheckpointError: the store cannot be read, or none of its newer checkpoints is intact, and the run directory
            has no checkpoint to continue from; under `store_only`, a local checkpoint that the store lacks and no
            older one there; a download that cannot be written.
    """
    local_step = checkpoint_step(local) if local is not None else -1
    try:
        complete = store.complete_steps()
    except StoreError as err:
        return _without_store(err, local, report)
    if store_only and local is not None and local_step not in complete:
        if not complete:
            raise CheckpointError(
                f"{local} is not complete in {store.url}, from where the ranks on other nodes get their files, "
                "and no older checkpoint is; start over with train.resume=none train.overwrite=true"
            )
        report(f"{local.name} is not complete in {store.url}, where the other nodes get their files: not used")
        local, local_step = None, -1
    candidates = [step for step in complete if step > local_step]
    if candidates and local_step >= 0:
        set_aside_damaged(run_dir, local)  # newer local ones were skipped as damaged: out of the way
    for step in reversed(candidates):
        try:
            path = download_checkpoint(store, step, run_dir)
        except CheckpointError as err:
            report(f"skipping {err}; trying the previous checkpoint in the store")
            continue
        except StoreError as err:
            return _without_store(err, local, report)
        except OSError as err:
            raise CheckpointError(f"cannot download into {run_dir}: {err.strerror or err} ({err.filename})") from None
        report(f"downloaded {store.path(store.checkpoint(step))} (verified) to continue from")
        return path
    if candidates and local is None:
        raise CheckpointError(
            f"none of the {len(candidates)} complete checkpoint(s) in {store.url} is intact (see above), and "
            f"train.run_dir={run_dir} has none to continue from; train.resume=none train.overwrite=true starts over"
        )
    return local


def _without_store(err: StoreError, local: Path | None, report: Callable[[str], None]) -> Path:
    """`local` when the store cannot be read now (said), else the one-line reason to stop."""
    if local is None:
        raise CheckpointError(f"{err}; the run directory has no checkpoint to continue from either")
    report(f"warning: {err}; continuing from the run directory's {local.name}")
    return local


def check_store(store: CheckpointStore | None, uses: bool, engine: Engine, report: Callable[[str], None]) -> bool:
    """List the store (checkpoint.remote; None: none) from each rank that `uses` it - the main rank and the ranks
    whose run directory is elsewhere - on every rank a collective: a lasting refusal stops every rank in one line,
    a store that is down now is said. Returns whether every rank could read it.

    Raises:
        ConfigError: on every rank, when a rank lacks credentials, the bucket or the right to read it.
    """
    if store is None:
        return True
    error, down = None, False
    try:
        if uses:
            store.check_access()
    except ConfigError as err:
        error = err
    except StoreError as err:
        down = True
        report(f"warning: {err}")
    if engine.any_rank(error is not None):
        raise ConfigError(str(error) if error else "a rank on another node cannot use checkpoint.remote (see its line)")
    return not engine.any_rank(down)


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


def fetch_rank_files(store: CheckpointStore, step: int, run_dir: Path, engine: Engine) -> Path:
    """For a rank whose run directory is not the main rank's (trainer.checkpoint.sharing): the files of the store's
    checkpoint `step` that it loads - train_state.json, units.safetensors and its own rank file (rank 0's after a
    change of world size or backend) - into run_dir/checkpoints/step_XXXXXXXX, each verified; returns the path.

    Raises:
        CheckpointError: the checkpoint is not complete in the store, lacks a file, or a file does not match.
        StoreError: the store failed.
    """
    hashes = store.complete_hashes(step)
    source = store.path(store.checkpoint(step))
    if hashes is None:
        raise CheckpointError(f"checkpoint {source} is not complete in the store, where this node gets its files")
    final = inside(run_dir, run_dir / CHECKPOINTS / f"step_{step:08d}")
    final.mkdir(parents=True, exist_ok=True)

    def fetch(name: str) -> None:
        if name not in hashes:
            raise CheckpointError(f"checkpoint {source}: {COMPLETE} does not list {name}")
        path = final / name
        if path.is_symlink() or not path.is_file() or sha256_file(path) != hashes[name]:
            store.download(f"{store.checkpoint(step)}/{name}", path, hashes[name])

    fetch(TRAIN_STATE)
    state = read_train_state(final)
    same = state["world_size"] == engine.world_size and state["backend"] == engine.backend_name
    fetch(UNIVERSAL)
    fetch(rank_file(engine.rank if same else 0))
    return final


def fetch_where_needed(store: CheckpointStore | None, found: Path, run_dir: Path, engine: Engine) -> Path:
    """The checkpoint `found` (the main rank's choice) as this rank loads it. Where this rank does not see it (its
    run directory is on another node's disk) or lacks its own files in it (written while this rank's files went
    elsewhere), they are fetched from `store` into this rank's run directory. A collective: a failure on any rank
    is raised on every rank.

    Raises:
        CheckpointError: a rank could not fetch its files.
    """
    error, path = None, found
    try:
        path = found if found.is_dir() else run_dir / CHECKPOINTS / found.name
        if store is not None and _lacks_files(path, engine):
            step = checkpoint_step(path)
            if step is None:
                raise CheckpointError(f"{found} is not named step_XXXXXXXX: it cannot be fetched from the store")
            path = fetch_rank_files(store, step, run_dir, engine)
    except (CheckpointError, OSError) as err:
        error = err
    if engine.any_rank(error is not None):
        raise CheckpointError(str(error) if error else "a rank on another node could not fetch its checkpoint files")
    return path


def _lacks_files(path: Path, engine: Engine) -> bool:
    """Whether checkpoint `path` misses a file this rank loads (train_state.json, units.safetensors, its rank file
    or, after a change of world size or backend, rank 0's)."""
    try:
        state = read_train_state(path)
    except (CheckpointError, OSError):
        return True
    same = state["world_size"] == engine.world_size and state["backend"] == engine.backend_name
    return not all((path / name).is_file() for name in (UNIVERSAL, rank_file(engine.rank if same else 0)))
