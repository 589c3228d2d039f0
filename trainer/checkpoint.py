"""Checkpoints: save (synchronous or in the background), verify, find, load.

A checkpoint is RUN/checkpoints/step_XXXXXXXX/ holding safetensors and JSON only, so resuming from a checkpoint
someone else wrote cannot run code (nothing is unpickled, not even by DeepSpeed or Accelerate):
  - units.safetensors: the backend-independent state of both units (full fp32 weights, Adam moments, update
    count), written by rank 0 (gathered from FSDP2 shards or ZeRO partitions);
  - rank_XXXXX.safetensors per rank: its image pools, data position, schedulers, loss scalers and RNG states
    (trainer.state_file: tensors as tensors, the rest as JSON);
  - train_state.json: step, world size, backend, the model architecture and tracker ids.
It is written as `step_XXXXXXXX.tmp`; once every rank has written its part, COMPLETE (the sha256 of every file) is
written and the directory renamed, then `latest` is replaced atomically and old checkpoints are rotated out
(renamed to `*.old`, then deleted). A save is a capture into host memory (collectives) followed by writing, which
`save_checkpoint` does before it returns and `AsyncCheckpointWriter` in a background thread. Only real
directories (never symlinks) named exactly step_XXXXXXXX that hold COMPLETE are ever resumed from; the debris of an
interrupted save or rotation (`.tmp`, `.old`) is removed by the next save, and damaged checkpoints a resume skipped
are kept as `.damaged`. Every JSON file is read with shards.bounded_read's bounds; every file is written through
trainer.run_files, which never follows a link.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save

from shards.bounded_read import BoundedReadError, read_json
from shards.manifest import sha256_file
from shards.urls import check_relative_name
from trainer.config import TRAINING_MODEL_FIELDS, ModelConfig, field_defaults
from trainer.engine import EMA_UNIT, Engine
from trainer.run_files import fsync_dir, inside, remove, write_atomic, write_file
from trainer.state_file import load_state_file, state_bytes

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


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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

    @property
    def tmp(self) -> Path:
        return _tmp_dir(self.final)


def _tmp_dir(final: Path) -> Path:
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


def capture_checkpoint(
    engine: Engine,
    run_dir: Path,
    step: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    keep_every_steps: int = 0,
    best: dict[str, Any] | None = None,
) -> CapturedCheckpoint:
    """Take the full training state into host memory (a collective: every rank must call it) and create the
    checkpoint's temporary directory; `save_checkpoint` documents the arguments. What training changes afterwards
    does not change the capture."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    previous = (complete_checkpoints(run_dir) or [None])[-1]
    error = None
    if engine.is_main:
        try:
            inside(Path(run_dir), _tmp_dir(final))  # no link on the way: writes and deletions stay in the run
            root.mkdir(parents=True, exist_ok=True)
            for debris in root.glob("step_*"):  # of saves or rotations that a crash interrupted
                if debris.suffix in DEBRIS and checkpoint_step(debris.with_suffix("")) is not None:
                    remove(debris, ignore_errors=True)
            _tmp_dir(final).mkdir()
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
        train_state=train_state if engine.is_main else None, best=best, keep=keep, keep_every_steps=keep_every_steps,
    )  # fmt: skip


def write_rank_part(saving: CapturedCheckpoint) -> None:
    """This rank's own file, then (main rank) units.safetensors. The rank file appears under its name only once
    complete, so the main rank can wait for the others' files without a collective."""
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
    _rotate(root.parent, saving.keep, saving.keep_every_steps)
    return final


def save_checkpoint(
    engine: Engine,
    run_dir: Path,
    step: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    keep_every_steps: int = 0,
    best: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state (a collective: every rank must call it) and return once it is published.

    Args:
        rank_state: this rank's own state (pools, data position, ...): JSON-able values and tensors.
        meta: JSON-able facts for train_state.json (model architecture, tracker run ids, ...).
        keep: complete checkpoints kept; older ones are deleted once the new one is published, except those whose
            step is a multiple of `keep_every_steps` and the best one (best.json).
        best: {select, score, metrics} to record this checkpoint as the best in best.json before rotating.

    Raises:
        CheckpointError: (on every rank) a rank could not write its part, e.g. a full disk; the checkpoints saved
            before are untouched.
    """
    saving = capture_checkpoint(engine, run_dir, step, rank_state, meta, keep, keep_every_steps, best)
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

    def __init__(self, engine: Engine, timeout_s: float):
        self.engine, self.timeout_s = engine, timeout_s
        self.thread: threading.Thread | None = None
        self.saving: CapturedCheckpoint | None = None
        self.error: BaseException | None = None
        atexit.register(self._join)

    def save(
        self,
        run_dir: Path,
        step: int,
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        keep: int,
        keep_every_steps: int = 0,
        best: dict[str, Any] | None = None,
    ) -> Path:
        """Wait for the save in flight, capture (a collective; the arguments are `save_checkpoint`'s) and start
        writing; returns the checkpoint's final path."""
        self.wait()
        self.saving = capture_checkpoint(self.engine, run_dir, step, rank_state, meta, keep, keep_every_steps, best)
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
        except Exception as err:  # reported by wait(); a thread must not end silently
            self.error = err
            with contextlib.suppress(OSError):  # tell the main rank's writer not to wait for this rank's file
                (saving.tmp / f"{rank_file(saving.rank)}.failed").write_text(str(err))
        finally:
            saving.universal, saving.rank_bytes = None, b""  # the host copy is no longer needed

    def _wait_for_ranks(self, saving: CapturedCheckpoint) -> None:
        deadline = time.monotonic() + self.timeout_s
        names = [rank_file(rank) for rank in range(saving.world_size)]
        while not all((saving.tmp / name).is_file() for name in names):
            if any((saving.tmp / f"{name}.failed").exists() for name in names):
                raise CheckpointError("another rank failed to write")
            if time.monotonic() > deadline:
                raise CheckpointError(f"not every rank wrote its file within {self.timeout_s:g} s")
            time.sleep(0.01)


def _rotate(run_dir: Path, keep: int, keep_every_steps: int) -> None:
    """Delete all but the newest `keep` checkpoints, except every `keep_every_steps`-th and the best one. Each is
    first renamed out of the step_XXXXXXXX pattern, so a crash mid-deletion never leaves a half checkpoint that
    looks complete."""
    best_step = (read_best(run_dir) or {}).get("step")
    for old in complete_checkpoints(run_dir)[:-keep]:
        old_step = checkpoint_step(old)
        if not (keep_every_steps and old_step % keep_every_steps == 0) and old_step != best_step:
            trash = old.with_name(old.name + ".old")
            os.replace(old, trash)
            remove(trash, ignore_errors=True)  # what stays (NFS .nfs* files) is removed as debris later


def _units_state(path: Path, engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    """units.safetensors split by unit, checked against this run's units (names and full shapes), in loading
    order. A checkpoint written without the generators' moving average lacks EMA_UNIT.

    Raises:
        CheckpointError: an unreadable file, or tensors missing or of another shape.
    """
    try:
        universal = load_file(str(path / UNIVERSAL))
    except Exception as err:  # safetensors' own error type for a malformed file
        raise CheckpointError(f"checkpoint {path}: {UNIVERSAL} is unreadable ({err!s:.120})") from None
    units = {}
    for unit in engine.checkpoint_units:
        prefix = f"{unit}/"
        state = {k[len(prefix) :]: v for k, v in universal.items() if k.startswith(prefix)}
        if unit == EMA_UNIT and not state:
            continue
        expected = engine.full_shapes(unit)
        if "__step__" in state:
            params = [name for name, _ in engine.unwrap(unit).named_parameters()]
            expected.update({f"{name}{m}": expected[name] for name in params for m in MOMENTS})
        wrong = sorted(k for k in expected if k not in state or tuple(state[k].shape) != expected[k])
        if wrong:
            got = tuple(state[wrong[0]].shape) if wrong[0] in state else "missing"
            raise CheckpointError(
                f"checkpoint {path}: {UNIVERSAL} does not fit this run's {unit} unit ({len(wrong)} tensors missing "
                f"or of another shape, e.g. {unit}/{wrong[0]}: {got}, expected {expected[wrong[0]]})"
            )
        units[unit] = state
    return units


def load_checkpoint(
    engine: Engine, path: Path, report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore the units, optimizers, schedulers, scalers and RNG from `path` (a collective).

    units.safetensors is re-partitioned onto this run's backend and world size (bitwise what was saved). On the
    world size and backend that wrote it, each rank also gets back its own state file (pools, data position, RNG),
    so the run continues exactly; otherwise rank 0's schedulers and data position are used.

    Returns:
        (train_state.json, this rank's state; after a topology change only {"data": rank 0's data position},
        from which the data plan restarts at the epoch, and the image pools start empty).

    Raises:
        CheckpointError: files missing, unreadable or not fitting this run.
    """
    train_state = read_train_state(path)
    same = train_state["world_size"] == engine.world_size and train_state["backend"] == engine.backend_name
    source = path / rank_file(engine.rank if same else 0)
    if not source.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {source.name}: it was written by an earlier version of cyclegan-dist; "
            "export its generators with `python -m trainer.export`, or resume from a newer checkpoint"
        )
    try:
        state = load_state_file(source)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    units = _units_state(path, engine)
    for unit, unit_state in units.items():
        engine.load_universal_state(unit, unit_state)
    if engine.ema is not None and EMA_UNIT not in units:
        engine.restart_ema()
        report(f"{path} holds no moving average of the generators: it starts from their loaded weights")
    try:
        engine_state = state["engine"]
        if train_state["backend"] != engine.backend_name:  # loss scalers of another backend: start afresh
            engine_state = {**engine_state, "scalers": {}}
        engine.load_state_dict(engine_state)
        if same:
            _set_rng_state(state["rng"], engine.device)
            return train_state, state
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: {source.name} is malformed ({type(err).__name__}: {err})") from None
    report(
        f"resuming {path} (written by {train_state['world_size']} x {train_state['backend']}) on "
        f"{engine.world_size} x {engine.backend_name}: weights and optimizer state re-partitioned, "
        "image pools empty, data from the start of the epoch"
    )
    return train_state, {"data": state["data"]}


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
