"""Saving: a capture into host memory (collectives), each rank writing its part into step_X.tmp, the main rank
publishing it (COMPLETE, rename, `latest`) and rotating old ones; synchronous or in a background thread."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from safetensors.torch import save

from shards.manifest import sha256_file
from trainer.checkpoint.format import (
    BEST,
    CHECKPOINTS,
    COMPLETE,
    DEBRIS,
    LATEST,
    STATE_FORMAT,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    rank_file,
    read_best,
)
from trainer.checkpoint.state_file import state_bytes
from trainer.runtime.engine import Engine
from trainer.runtime.run_files import fsync_dir, inside, remove, write_atomic, write_file


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@dataclasses.dataclass
class CapturedCheckpoint:
    """A checkpoint held in host memory (`capture_checkpoint`), ready to be written without collectives."""

    root: Path
    final: Path
    previous: Path | None
    rank: int
    world_size: int
    rank_bytes: bytes
    universal: dict[str, torch.Tensor] | None  # main rank only
    train_state: dict[str, Any] | None  # main rank only
    best: dict[str, Any] | None
    keep: int
    keep_every_steps: int
    protect: Callable[[], Collection[int]] | None
    ranks_here: tuple[int, ...]

    @property
    def tmp(self) -> Path:
        return tmp_dir(self.final)


def tmp_dir(final: Path) -> Path:
    """Where checkpoint `final` is written until it is complete."""
    return final.with_name(f"{final.name}.tmp")


def _agree(engine: Engine, error: BaseException | None, final: Path, previous: Path | None) -> None:
    """Agree on failure (a collective, so also a barrier) and raise it on every rank; what a failed save of
    checkpoint `final` leaves is debris that the next save removes."""
    if not engine.any_rank(error is not None):
        return
    name = final.name
    kept = f"{previous} is still the newest intact checkpoint" if previous else "no checkpoint was saved before"
    if isinstance(error, OSError):
        what = f"{error.strerror or error} ({error.filename})"
    else:
        what = str(error) if error is not None else "another rank failed to write"
    raise CheckpointError(f"cannot save checkpoint {name}: {what}; {kept}")


@dataclasses.dataclass(frozen=True)
class SaveRequest:
    """What a save writes, besides the engine's units."""

    run_dir: Path
    step: int
    rank_state: dict[str, Any]
    """This rank's own state (pools, data position, ...): JSON-able values and tensors."""
    meta: dict[str, Any]
    """JSON-able facts for train_state.json (model architecture, tracker run ids, ...)."""
    keep: int
    """Complete checkpoints kept; older ones are deleted once the new one is published, except those whose step is
    a multiple of `keep_every_steps` and the best one (best.json)."""
    keep_every_steps: int = 0
    best: dict[str, Any] | None = None
    """{select, score, metrics} to record this checkpoint as the best in best.json before rotating."""
    protect: Callable[[], Collection[int]] | None = None
    """The steps the rotation keeps whatever their age, asked when it runs (checkpoints still being uploaded to
    checkpoint.remote)."""
    ranks_here: tuple[int, ...] | None = None
    """The ranks whose files land in the main rank's run directory (trainer.checkpoint.sharing); None: all."""


def capture_checkpoint(engine: Engine, request: SaveRequest) -> CapturedCheckpoint:
    """Take the full training state into host memory (a collective: every rank must call it) and create the
    checkpoint's temporary directory. What training changes afterwards does not change the capture."""
    run_dir, step, rank_state, meta = Path(request.run_dir), request.step, request.rank_state, request.meta
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:08d}"
    previous = (complete_checkpoints(run_dir) or [None])[-1]
    error = None
    if engine.is_main:
        try:
            inside(run_dir, tmp_dir(final))  # no link on the way: writes and deletions stay in the run
            root.mkdir(parents=True, exist_ok=True)
            for debris in root.glob("step_*"):  # of saves or rotations that a crash interrupted
                if debris.suffix in DEBRIS and checkpoint_step(debris.with_suffix("")) is not None:
                    remove(debris, ignore_errors=True)
            tmp_dir(final).mkdir()
        except OSError as err:
            error = err
    _agree(engine, error, final, previous)  # no rank writes before the directory exists
    universal = {
        f"{unit}/{key}": value
        for unit in engine.checkpoint_units
        for key, value in engine.universal_state(unit).items()
    }
    own = {**rank_state, "engine": engine.state_dict(), "rng": _rng_state(engine.device)}
    train_state = {"format": STATE_FORMAT, "step": step, "world_size": engine.world_size,
                   "backend": engine.backend_name, **meta}  # fmt: skip
    return CapturedCheckpoint(
        root=root, final=final, previous=previous, rank=engine.rank, world_size=engine.world_size,
        rank_bytes=state_bytes(own), universal=universal if engine.is_main else None,
        train_state=train_state if engine.is_main else None, best=request.best, keep=request.keep,
        keep_every_steps=request.keep_every_steps, protect=request.protect,
        ranks_here=request.ranks_here or tuple(range(engine.world_size)),
    )  # fmt: skip


def write_rank_part(saving: CapturedCheckpoint) -> None:
    """This rank's own file, then (main rank) units.safetensors. The rank file appears under its name only once
    complete, so the main rank can wait for the others' files without a collective. A rank whose run directory is
    not the main rank's (another node's disk) makes the directory itself."""
    saving.tmp.mkdir(parents=True, exist_ok=True)
    part = saving.tmp / f"{rank_file(saving.rank)}.part"
    write_file(part, saving.rank_bytes)
    os.replace(part, saving.tmp / rank_file(saving.rank))
    if saving.universal is not None:
        write_file(saving.tmp / UNIVERSAL, save(saving.universal))


def publish_checkpoint(saving: CapturedCheckpoint) -> Path:
    """(Main rank, once every rank's file is written) train_state.json, COMPLETE, the rename to step_XXXXXXXX,
    `latest`, best.json and the rotation."""
    tmp, final, root = saving.tmp, saving.final, saving.root
    write_file(tmp / TRAIN_STATE, json.dumps(saving.train_state))
    hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    write_file(tmp / COMPLETE, json.dumps(hashes))
    fsync_dir(tmp)
    if final.exists():  # a damaged checkpoint of this step, or one a resume from an earlier step replaces
        os.replace(final, final.with_name(final.name + ".old"))
    os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n")
    if saving.best is not None:
        write_atomic(root / BEST, json.dumps({"step": int(final.name[5:]), **saving.best}, indent=2))
    _rotate(root.parent, saving.keep, saving.keep_every_steps, saving.protect() if saving.protect else ())
    return final


def save_checkpoint(engine: Engine, request: SaveRequest) -> Path:
    """Save the full training state and `request` (a collective: every rank must call it) and return once it is
    published.

    Raises:
        CheckpointError: (on every rank) a rank could not write its part, e.g. a full disk; the checkpoints saved
            before are untouched.
    """
    saving = capture_checkpoint(engine, request)
    error = None
    try:
        write_rank_part(saving)
    except Exception as err:  # any failure must reach _agree, or the other ranks wait there until the timeout
        error = err
    _agree(engine, error, saving.final, saving.previous)  # also a barrier: every rank's file is written
    error = None
    if engine.is_main:
        try:
            publish_checkpoint(saving)
        except Exception as err:
            error = err
    _agree(engine, error, saving.final, saving.previous)
    return saving.final


class AsyncCheckpointWriter:
    """checkpoint.async_save: the loop stops only for `capture_checkpoint`; a thread per rank writes its files, and
    the main rank's thread waits for the other ranks' files (no collectives off the main thread), then publishes.
    At most one save is in flight: the next save, the end of training and a preemption `wait` for it, and a
    failure is raised (on every rank) by that `wait`. A kill during the background write leaves a `.tmp`
    directory, never a resumable half checkpoint: the previous one stays the newest intact checkpoint. A process
    that leaves through `exit_process` (also after an error) first lets a started write finish."""

    def __init__(self, engine: Engine, timeout_s: float, on_saved: Callable[[Path], None] | None = None):
        """`on_saved`: called in the writer thread with each checkpoint's final path once this rank's part is
        written (on the main rank: once the checkpoint is published)."""
        self.engine, self.timeout_s, self.on_saved = engine, timeout_s, on_saved
        self.thread: threading.Thread | None = None
        self.saving: CapturedCheckpoint | None = None
        self.error: BaseException | None = None
        atexit.register(self._join)

    def save(self, request: SaveRequest) -> Path:
        """Wait for the save in flight, capture (a collective) and start writing; returns the checkpoint's final
        path."""
        self.wait()
        self.saving = capture_checkpoint(self.engine, request)
        self.thread = threading.Thread(target=self._write, args=(self.saving,), name="checkpoint-writer", daemon=True)
        self.thread.start()
        return self.saving.final

    def wait(self) -> Path | None:
        """Wait for the save in flight (a collective); returns its checkpoint, None when none was in flight.

        Raises:
            CheckpointError: on every rank, when any rank failed to write it.
        """
        if self.saving is None:
            return None
        self._join()
        saving, error, self.saving, self.error = self.saving, self.error, None, None
        _agree(self.engine, error, saving.final, saving.previous)
        return saving.final

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def _write(self, saving: CapturedCheckpoint) -> None:
        try:
            write_rank_part(saving)
            if saving.universal is not None:
                self._wait_for_ranks(saving)
                publish_checkpoint(saving)
            if self.on_saved is not None:
                self.on_saved(saving.final)
        except Exception as err:  # reported by wait(); a thread must not end silently
            self.error = err
            with contextlib.suppress(OSError):  # tell the main rank's writer not to wait for this rank's file
                (saving.tmp / f"{rank_file(saving.rank)}.failed").write_text(str(err))
        finally:
            saving.universal, saving.rank_bytes = None, b""  # the host copy is no longer needed

    def _wait_for_ranks(self, saving: CapturedCheckpoint) -> None:
        deadline = time.monotonic() + self.timeout_s
        names = [rank_file(rank) for rank in saving.ranks_here]
        while not all((saving.tmp / name).is_file() for name in names):
            if any((saving.tmp / f"{name}.failed").exists() for name in names):
                raise CheckpointError("another rank failed to write")
            if time.monotonic() > deadline:
                raise CheckpointError(f"not every rank wrote its file within {self.timeout_s:g} s")
            time.sleep(0.01)


def _rotate(run_dir: Path, keep: int, keep_every_steps: int, protect: Collection[int]) -> None:
    """Delete all but the newest `keep` checkpoints, except every `keep_every_steps`-th, the best one and those of
    the steps in `protect`. Each is
    first renamed out of the step_XXXXXXXX pattern, so a crash mid-deletion never leaves a half checkpoint that
    looks complete."""
    best_step = (read_best(run_dir) or {}).get("step")
    for old in complete_checkpoints(run_dir)[:-keep]:
        old_step = checkpoint_step(old)
        kept = (keep_every_steps and old_step % keep_every_steps == 0) or old_step == best_step or old_step in protect
        if not kept:
            trash = old.with_name(old.name + ".old")
            os.replace(old, trash)
            remove(trash, ignore_errors=True)  # what stays (NFS .nfs* files) is removed as debris later
