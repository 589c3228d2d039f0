"""The one place that knows the distributed backend: Accelerate with DDP for the two trainable units.

`Engine` builds the Accelerator, prepares the generator pair and the discriminator pair with their optimizers,
freezes a unit, runs backward + optimizer + scheduler per unit, and reduces metrics across ranks. The algorithm
(cyclegan.py) never sees any of this.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from trainer.config import DistributedConfig

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16"}


class Engine:
    """Owns the Accelerator and, after `prepare`, the two units with their optimizers and schedulers."""

    def __init__(self, cfg: DistributedConfig, precision: str, log_with: str | None = None):
        self.accelerator = Accelerator(
            cpu=cfg.cpu,
            mixed_precision=PRECISION_TO_ACCELERATE[precision],
            log_with=log_with,
            # Schedulers are stepped by us once per update; accelerate would step them once per process.
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))],
        )
        self.units: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def prepare(
        self,
        units: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    ) -> dict[str, nn.Module]:
        """Wrap the units ("g", "d") and their optimizers for the backend; returns the wrapped units."""
        names = list(units)
        prepared = self.accelerator.prepare(*[units[n] for n in names], *[optimizers[n] for n in names])
        self.units = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names) :]))
        self.schedulers = schedulers
        return self.units

    def unwrap(self, which: str) -> nn.Module:
        """The plain module of unit `which`, for forwards that must bypass the DDP wrapper (the frozen D in G's step)."""
        return self.accelerator.unwrap_model(self.units[which])

    @contextlib.contextmanager
    def frozen(self, which: str) -> Iterator[nn.Module]:
        """Turn off requires_grad of unit `which` for the block and yield its plain module."""
        module = self.unwrap(which)
        flags = [p.requires_grad for p in module.parameters()]
        module.requires_grad_(False)
        try:
            yield module
        finally:
            for param, flag in zip(module.parameters(), flags):
                param.requires_grad_(flag)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision autocast for network forwards (a no-op in fp32)."""
        return self.accelerator.autocast()

    def backward_and_step(self, loss: torch.Tensor, which: str) -> None:
        """Backward of `loss` into unit `which` (gradients all-reduced), optimizer step, scheduler step, zero grads."""
        self.accelerator.backward(loss)
        self.optimizers[which].step()
        self.schedulers[which].step()
        self.optimizers[which].zero_grad(set_to_none=True)

    def lr(self, which: str) -> float:
        """Current learning rate of unit `which`."""
        return self.optimizers[which].param_groups[0]["lr"]

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each scalar over ranks, in one collective and one host sync."""
        if not values:
            return {}
        names = sorted(values)
        stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(self.device)
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(names, reduced.cpu().tolist()))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Finish trackers and destroy the process group (clean interpreter exit on every rank)."""
        self.accelerator.end_training()
