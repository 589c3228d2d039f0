"""Checkpoints (save, verify, find, load) and exported generators.

A checkpoint is RUN/checkpoints/step_XXXXXXXX/ holding
  - Accelerate's native state: both units and optimizers (per-rank ZeRO shards under DeepSpeed), RNG of each rank;
  - units.safetensors: the backend-independent state of both units (full fp32 weights, Adam moments, update
    count), used to resume on another world size or backend and to export;
  - rank_XXXXX.pt per rank: its image pools, data position, schedulers and loss scalers (plain tensors and
    numbers: loaded with weights_only=True);
  - train_state.json: step, world size, backend and tracker ids.
It is written as `step_XXXXXXXX.tmp`, then COMPLETE (the sha256 of every file) is written and the directory renamed
once every rank is done; `latest` is replaced atomically after that. A directory without COMPLETE, or whose files
do not match it, is never resumed from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from shards.manifest import sha256_file
from trainer.config import ConfigError, DataConfig, ModelConfig, from_dict
from trainer.engine import UNITS, Engine
from trainer.models import build_generator

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best.json"
COMPLETE = "COMPLETE"
UNIVERSAL = "units.safetensors"
TRAIN_STATE = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, damaged or missing."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> dict[str, str]:
    """fsync every file under root; returns {relative path: sha256}."""
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        hashes[str(path.relative_to(root))] = sha256_file(path)
    return hashes


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run that carry a COMPLETE marker, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint against its COMPLETE marker; returns its train_state.json.

    Raises:
        CheckpointError: one line naming the checkpoint and what is wrong.
    """
    marker = path / COMPLETE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker)")
    try:
        hashes = json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is not valid JSON") from None
    for name, digest in hashes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its sha256")
    return json.loads((path / TRAIN_STATE).read_text())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to continue from: for `auto` the newest intact one in run_dir (damaged ones are reported
    and skipped), for a path that checkpoint, for `none` nothing.

    Raises:
        CheckpointError: a given path that is not an intact checkpoint.
    """
    if resume == "none":
        return None
    if resume != "auto":
        verify_checkpoint(Path(resume))
        return Path(resume)
    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            print(f"skipping {err}; trying the previous checkpoint")
    return None


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
    """Save the full training state (a collective: every rank must call it).

    Args:
        rank_state: this rank's own state (pools, data position, ...), saved as rank_XXXXX.pt.
        meta: JSON-able facts for train_state.json (tracker run ids, ...).
        keep: complete checkpoints kept; older ones are deleted once the new one is published, except those whose
            step is a multiple of `keep_every_steps` and the best one (best.json).
        best: {select, score, metrics} to record this checkpoint as the best in best.json before rotating.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.accelerator.save_state(str(tmp))
    universal = {f"{unit}/{key}": value for unit in UNITS for key, value in engine.universal_state(unit).items()}
    torch.save({**rank_state, "engine": engine.state_dict()}, tmp / f"rank_{engine.rank:05d}.pt")
    if engine.is_main:
        save_file(universal, str(tmp / UNIVERSAL))
    engine.barrier()
    if engine.is_main:
        train_state = {"step": step, "world_size": engine.world_size, "backend": engine.backend_name, **meta}
        _write_atomic(tmp / TRAIN_STATE, json.dumps(train_state))
        _write_atomic(tmp / COMPLETE, json.dumps(_fsync_tree(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        if best is not None:
            _write_atomic(root / BEST, json.dumps({"step": step, **best}, indent=2))
            best_step = step
        else:
            best_step = (read_best(run_dir) or {}).get("step")
        for old in complete_checkpoints(run_dir)[:-keep]:
            old_step = int(old.name.split("_")[1])
            if not (keep_every_steps and old_step % keep_every_steps == 0) and old_step != best_step:
                shutil.rmtree(old)
    engine.barrier()
    return final


def load_checkpoint(engine: Engine, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore the units, optimizers, schedulers and scalers from `path` (a collective).

    On the world size and backend that wrote it, Accelerate's native state is loaded (bitwise exact). Otherwise
    the backend-independent units.safetensors is re-partitioned onto this run's backend.

    Returns:
        (train_state.json, this rank's state; after a topology change only {"data": rank 0's data position},
        from which the data plan restarts at the epoch, and the image pools start empty).
    """
    train_state = json.loads((path / TRAIN_STATE).read_text())
    same = train_state["world_size"] == engine.world_size and train_state["backend"] == engine.backend_name
    rank_file = path / f"rank_{engine.rank:05d}.pt"
    if same:
        engine.accelerator.load_state(str(path))
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    else:
        universal = load_file(str(path / UNIVERSAL))
        for unit in UNITS:
            prefix = f"{unit}/"
            engine.load_universal_state(
                unit, {k[len(prefix) :]: v for k, v in universal.items() if k.startswith(prefix)}
            )
        rank_state = None
        print(
            f"resuming {path} (written by {train_state['world_size']} x {train_state['backend']}) on "
            f"{engine.world_size} x {engine.backend_name}: weights and optimizer state re-partitioned, "
            "image pools empty, data from the start of the epoch"
        )
    if rank_state is not None:
        engine.load_state_dict(rank_state["engine"])
    else:
        first = torch.load(path / "rank_00000.pt", map_location="cpu", weights_only=True)
        engine.load_state_dict(first["engine"])
        rank_state = {"data": first["data"]}
    return train_state, rank_state


def save_generators(
    out_dir: Path, gens_state: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig
) -> None:
    """Write g_xy.safetensors and g_yx.safetensors from the generator pair's full state dict (keys `g_xy.*`,
    `g_yx.*`), plus model.json (architecture, training resolution and the extra input channels' kind)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("g_xy", "g_yx"):
        prefix = f"{name}."
        tensors = {k[len(prefix) :]: v.contiguous() for k, v in gens_state.items() if k.startswith(prefix)}
        tmp = out_dir / f"{name}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / f"{name}.safetensors")
    meta = {"model": dataclasses.asdict(model_cfg), "image_size": data_cfg.crop_size, "extra": data_cfg.extra}
    _write_atomic(out_dir / "model.json", json.dumps(meta, indent=2))


@dataclass
class ExportedGenerators:
    g_xy: nn.Module  # the paper's G: X -> Y, in eval mode
    g_yx: nn.Module  # the paper's F: Y -> X
    model: ModelConfig
    image_size: int  # the training resolution
    extra: str  # data.extra of the training run


def generators_from_weights(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, image_size: int, extra: str, source: str
) -> ExportedGenerators:
    """Build G and F from full weights (keys `g_xy.*`, `g_yx.*`) in eval mode.

    Raises:
        ConfigError: the weights do not fit the architecture (one line naming `source` and the first mismatch).
    """
    nets = []
    for name in ("g_xy", "g_yx"):
        net = build_generator(model_cfg)
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        expected = net.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            example = (
                f"{reshaped[0]} is {tuple(state[reshaped[0]].shape)}, expected {tuple(expected[reshaped[0]].shape)}"
                if reshaped
                else f"e.g. {(missing or unexpected)[0]}"
            )
            raise ConfigError(
                f"{source}: the {name} weights do not fit generator={model_cfg.generator} ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(reshaped)} of another shape; {example})"
            )
        net.load_state_dict(state)
        nets.append(net.eval())
    return ExportedGenerators(nets[0], nets[1], model_cfg, image_size, extra)


def load_generators(path: str | Path) -> ExportedGenerators:
    """Load exported generators (safetensors: nothing is unpickled) in eval mode.

    Raises:
        ConfigError: a missing or unreadable export, or weights that do not fit its model.json.
    """
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found; expected a directory written by training's export")
    meta = json.loads(meta_path.read_text())
    model_cfg = from_dict(ModelConfig, meta["model"], "model.")
    weights = {}
    for name in ("g_xy", "g_yx"):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ConfigError(f"{file} not found; the export is incomplete")
        weights.update({f"{name}.{k}": v for k, v in load_file(str(file)).items()})
    return generators_from_weights(weights, model_cfg, int(meta["image_size"]), meta.get("extra", "none"), str(path))


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """RUN/checkpoints/best.json ({step, select, score, metrics}) or None before the first selection."""
    path = Path(run_dir) / CHECKPOINTS / BEST
    return json.loads(path.read_text()) if path.is_file() else None
