"""Checkpoints and exported weights.

A checkpoint is RUN/checkpoints/step_XXXXXXXX/: Accelerate's state (both units, optimizers, schedulers, RNG of
every rank), one rank_XXXXX.pt per rank (image pools) and train_state.json. It is written under a `.tmp` name,
marked COMPLETE and renamed only after every rank finished; then RUN/checkpoints/latest is replaced atomically.
A directory without COMPLETE is never used. Exported generators are safetensors plus model.json.
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

from trainer.config import ConfigError, DataConfig, ModelConfig, from_dict
from trainer.engine import Engine
from trainer.models import build_generator

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())


def save_checkpoint(engine: Engine, run_dir: Path, step: int, rank_state: dict[str, Any], keep: int) -> Path:
    """Save the full training state on every rank (a collective: all ranks must call it).

    Args:
        rank_state: this rank's own state (image pools), saved as rank_XXXXX.pt.
        keep: complete checkpoints to keep; older ones are deleted after the new one is published.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.accelerator.save_state(str(tmp))
    torch.save(rank_state, tmp / f"rank_{engine.rank:05d}.pt")
    engine.barrier()
    if engine.is_main:
        _write_atomic(tmp / "train_state.json", json.dumps({"step": step, "world_size": engine.world_size}))
        _write_atomic(tmp / COMPLETE, "")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    engine.barrier()
    return final


def save_generators(out_dir: Path, gens_state: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    """Write g_xy.safetensors and g_yx.safetensors from the generator pair's full state dict (keys `g_xy.*`,
    `g_yx.*`), plus model.json (architecture, training resolution and the extra input channels' kind)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("g_xy", "g_yx"):
        prefix = f"{name}."
        tensors = {k[len(prefix):]: v.contiguous() for k, v in gens_state.items() if k.startswith(prefix)}
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


def load_generators(path: str | Path) -> ExportedGenerators:
    """Load exported generators (safetensors: nothing is unpickled) in eval mode."""
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found; expected a directory written by training's export")
    meta = json.loads(meta_path.read_text())
    model_cfg = from_dict(ModelConfig, meta["model"], "model.")
    nets = []
    for name in ("g_xy", "g_yx"):
        net = build_generator(model_cfg)
        net.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        nets.append(net.eval())
    return ExportedGenerators(nets[0], nets[1], model_cfg, int(meta["image_size"]), meta.get("extra", "none"))
