"""Distributed backends: one module per way of sharing the two units' training across ranks, behind `Backend`.

The engine (trainer/engine.py) owns the Accelerator, devices, autocast and collectives and never branches on the
backend; everything that differs between DDP and DeepSpeed ZeRO - wrapping, gradient sync, loss scaling, the
optimizer step and the full (unsharded) state of a unit - lives in the backend's own module. Adding a backend is
one module implementing `Backend` plus a line in `build_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Mapping, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator

from trainer.config import ConfigError, DistributedConfig, OptimizerConfig, TrainConfig

UNITS = ("g", "d")


class Backend(Protocol):
    """What the engine asks of a backend, per unit ("g" or "d") after `prepare`."""

    name: str
    """For logs: `ddp`, `zero1`/`zero2`/`zero3` (+`-offload`)."""
    replicas_comparable: bool
    """Every rank holds the whole of each unit's weights (so a cross-rank fingerprint must agree)."""
    always_distributed: bool
    """Needs a process group even for one process (then gloo on CPU)."""

    def accelerator_kwargs(self) -> dict:
        """Keyword arguments of the Accelerator this backend needs (cpu, mixed_precision, plugins, and
        `kwargs_handlers` to add to the engine's)."""

    def prepare(
        self, accelerator: Accelerator, units: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, nn.Module]:
        """Wrap the units and their optimizers; returns the wrapped units."""

    def unwrap(self, which: str) -> nn.Module:
        """The plain module of unit `which` (for forwards that bypass the wrapper)."""

    def no_sync(self, which: str, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch of unit `which`: gradients are synchronized only on the last one."""

    def backward(self, which: str, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, averaged over the accumulation steps."""

    def step(self, which: str) -> torch.Tensor:
        """Finish the update after the last micro-batch (skipping a non-finite one); returns the grad norm."""

    def loss_scale(self, which: str) -> float:
        """The current fp16 loss scale (1.0 without one)."""

    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights and buffers on CPU (a collective where ranks hold parts)."""

    def full_shapes(self, which: str) -> dict[str, tuple[int, ...]]:
        """The full shape of every parameter and buffer."""

    def universal_state(self, which: str) -> dict[str, torch.Tensor]:
        """Weights, buffers, Adam's moments (`NAME.exp_avg`, `NAME.exp_avg_sq`) and `__step__`, full and on CPU."""

    def load_universal_state(self, which: str, state: dict[str, torch.Tensor]) -> None:
        """Load what any backend's `universal_state` returned, at any world size."""

    def scaler_state(self) -> dict[str, dict]:
        """The loss scalers' states by unit (plain values)."""

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        """Restore what `scaler_state` returned."""

    def optimizer_state_bytes(self, which: str) -> int:
        """Bytes of optimizer state (and fp32 master partitions) this rank holds for unit `which`."""


def resolve_backend(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> DistributedConfig:
    """Settle backend=auto from the launcher: `accelerate launch` with a DeepSpeed config (launch/zero*.yaml) sets
    ACCELERATE_USE_DEEPSPEED and the ZeRO stage/offload variables; anything else means DDP.

    Raises:
        ConfigError: when the config forces DDP but the launcher set up DeepSpeed.
    """
    launched_deepspeed = environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cfg.backend == "ddp" and launched_deepspeed:
        raise ConfigError(
            "distributed.backend=ddp but accelerate launched with a DeepSpeed config; use distributed.backend=auto "
            "or launch with a DDP config such as launch/cpu-ddp-2.yaml"
        )
    if cfg.backend != "auto":
        return cfg
    if not launched_deepspeed:
        return dataclasses.replace(cfg, backend="ddp")

    def offloaded(key: str) -> bool:
        return environ.get(key, "none").lower() not in ("none", "")

    return dataclasses.replace(
        cfg,
        backend="deepspeed",
        zero_stage=int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", cfg.zero_stage)),
        offload_optimizer=offloaded("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or cfg.offload_optimizer,
        offload_params=offloaded("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or cfg.offload_params,
    )


def build_backend(cfg: DistributedConfig, train: TrainConfig, optim: OptimizerConfig, on_cuda: bool) -> Backend:
    """The backend `cfg.backend` (already resolved) names; only the DeepSpeed one imports DeepSpeed."""
    clips = {"g": optim.clip_grad_norm_g, "d": optim.clip_grad_norm_d}
    if cfg.backend == "deepspeed":
        from trainer.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, train, clips, on_cuda)
    from trainer.backends.ddp import DDPBackend

    return DDPBackend(cfg, train, clips, on_cuda)


def buffers_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's buffers on CPU, by name (buffers are never sharded)."""
    return {name: buf.detach().cpu().clone() for name, buf in module.named_buffers()}


def tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the non-scalar tensors in a torch optimizer's state."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
