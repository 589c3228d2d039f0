"""Learning-rate schedules as multipliers of the base LR: warmup, then constant / linear decay to zero (the
paper: constant for the first half, then linear to zero) / cosine to zero."""

from __future__ import annotations

import math

import torch

from trainer.config import ScheduleConfig


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate for the update number `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "linear":
        start = max(cfg.warmup_steps, int(cfg.decay_start * total_steps))
        if step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / max(1, total_steps - start))
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """A LambdaLR following `lr_factor`; step it once per optimizer update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
