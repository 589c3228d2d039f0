"""Optimizers and learning-rate schedules: the AdamW of each unit with its kernel, the learning rates scaled to
the global batch (optimizer.lr_scaling) with lr_scaling=auto's warm-up, and the schedules as multipliers of the
base LR: warmup, then constant / linear decay to zero (the paper: constant for the first half, then linear to zero)
/ cosine to zero."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

from trainer.config.schema import Config
from trainer.config.sections import OptimizerConfig, ScheduleConfig

AUTO_SCALE_CAP = 8.0
"""lr_scaling=auto scales linearly up to this factor: linear won at global batch 4 and 16 in
benchmarks/time_to_quality.py, and at 64 linear (x64) diverged where sqrt (x8) won."""
AUTO_WARMUP_IMAGES = 512
"""lr_scaling=auto warms the learning rates up over this many images when it scales them up."""


def lr_scale(cfg: OptimizerConfig, global_batch: int) -> float:
    """Multiplier of the configured learning rates for `global_batch` under cfg.lr_scaling."""
    ratio = global_batch / cfg.base_batch
    rules = {"auto": min(ratio, AUTO_SCALE_CAP), "none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    return rules[cfg.lr_scaling]


def warmup(cfg: Config, global_batch: int) -> ScheduleConfig:
    """cfg.schedule, with lr_scaling=auto's warm-up (AUTO_WARMUP_IMAGES) when it scales the learning rates up and
    the schedule has none of its own."""
    if cfg.optimizer.lr_scaling != "auto" or cfg.schedule.warmup_steps or global_batch <= cfg.optimizer.base_batch:
        return cfg.schedule
    return dataclasses.replace(cfg.schedule, warmup_steps=math.ceil(AUTO_WARMUP_IMAGES / global_batch))


def optimizer_kernel(implementation: str, device: torch.device) -> dict[str, bool]:
    """torch.optim keyword arguments for optimizer.implementation on `device`."""
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over `params` at learning rate `lr` with optimizer.* and its kernel on `device`."""
    kernel = optimizer_kernel(cfg.implementation, device)
    betas = (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel)


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
