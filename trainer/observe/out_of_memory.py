"""Out of memory in one line: the rank, the phase and update it happened in, the batch, and the settings that
lower memory which the run does not use yet; on CUDA, a memory snapshot under RUN/diagnostics/ (open it at
https://pytorch.org/memory_viz; with profile.memory=true it holds the stack of every allocation)."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

from trainer.config.schema import Config
from trainer.runtime.engine import Engine
from trainer.runtime.watchdog import DIAGNOSTICS

SHARDED_BACKENDS = ("fsdp2", "zero3", "zero3-offload")


class OutOfMemory(RuntimeError):
    """Memory ran out: where, and what to change (one line)."""


def out_of_memory(err: BaseException, cfg: Config, engine: Engine, where: str, done: int) -> OutOfMemory:
    """The one-line error for `err` (torch.OutOfMemoryError or MemoryError) raised in phase `where` after `done`
    finished updates; writes the CUDA snapshot first."""
    batch = (
        f"batch {cfg.train.batch_size} per rank x {cfg.train.grad_accum_steps} micro-batch(es) of "
        f"{cfg.data.crop_size} px, {engine.precision}, {engine.backend_name}"
    )
    if isinstance(err, MemoryError):
        rss = psutil.Process().memory_info().rss / 2**30
        what = f"out of host memory ({rss:.1f} GiB resident)"
        knobs = ["a smaller train.batch_size", "fewer data.num_workers (each holds decoded batches)",
                 "fewer eval.images (the test split is kept in memory)"]  # fmt: skip
        snapshot = None
    else:
        what = "out of GPU memory"
        knobs = gpu_memory_knobs(cfg, engine)
        snapshot = cuda_snapshot(Path(cfg.train.run_dir), engine.rank, done + 1)
    line = f"rank {engine.rank}: {what} in phase '{where}' during update {done + 1} ({batch}); to use less: "
    line += "; ".join(knobs)
    if snapshot is not None:
        line += f"; memory snapshot in {snapshot} (https://pytorch.org/memory_viz)"
    return OutOfMemory(line)


def gpu_memory_knobs(cfg: Config, engine: Engine) -> list[str]:
    """The settings that lower GPU memory and are not in use yet, most effective first."""
    knobs = [
        f"train.batch_size={max(1, cfg.train.batch_size // 2)} with train.grad_accum_steps="
        f"{cfg.train.grad_accum_steps * 2} (the same global batch)"
    ] if cfg.train.batch_size > 1 else []  # fmt: skip
    if not cfg.train.activation_checkpointing:
        knobs.append("train.activation_checkpointing=true")
    if engine.precision == "fp32":
        knobs.append("train.precision=bf16")
    if engine.backend_name not in SHARDED_BACKENDS:
        knobs.append("sharded weights and optimizer state (launch/zero3.yaml or launch/fsdp2.yaml)")
    return knobs or ["a smaller data.crop_size"]


def cuda_snapshot(run_dir: Path, rank: int, update: int) -> Path | None:
    """torch's CUDA memory snapshot of this process (a pickle that torch's memory_viz reads; we only write it), or
    None without CUDA or when it cannot be written."""
    if not torch.cuda.is_available():
        return None
    path = run_dir / DIAGNOSTICS / f"oom-step{update:08d}-rank{rank:05d}.pickle"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    except (OSError, RuntimeError):
        return None
    return path
