"""DDP: every rank holds both units whole; gradients are all-reduced in buckets during backward.

This backend owns what DDP leaves to the trainer: a GradScaler per unit under fp16 (an overflow in the
discriminators skips only their step), clipping, skipping a non-finite update, gradient accumulation without
all-reduce on non-final micro-batches, and SyncBatchNorm on multi-GPU runs. It never imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from trainer.config.sections import DistributedConfig, TrainConfig
from trainer.runtime.backends import (
    UNITS,
    Unit,
    buffers_on_cpu,
    host_copy,
    load_with_adam_moments,
    local_bytes,
    optimizer_tensors,
    step_unless_nonfinite,
    with_adam_moments,
)


class DDPBackend:
    """Two DDP modules (one per unit) with torch optimizers; fp16 loss scaling per unit."""

    name = "ddp"
    replicas_comparable = True
    always_distributed = False
    double_backward = True
    offloads = False
    batch_norm_synced = True

    def __init__(self, cfg: DistributedConfig, train: TrainConfig, clips: dict[str, float], on_cuda: bool):
        self.cfg, self.clips, self.on_cuda = cfg, clips, on_cuda
        self.accum_steps = train.grad_accum_steps
        self.scalers = {
            u: torch.amp.GradScaler("cuda" if on_cuda else "cpu", enabled=train.precision == "fp16") for u in UNITS
        }
        self.units: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.world_size = 1

    def accelerator_kwargs(self) -> dict:
        # cpu=True also makes a multi-process launch on a machine without CUDA use DDP over gloo. Autocast and the
        # per-unit GradScalers are ours, so accelerate's mixed precision stays off.
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=False, bucket_cap_mb=self.cfg.bucket_cap_mb, static_graph=self.cfg.static_graph
        )
        return {"cpu": not self.on_cuda, "mixed_precision": "no", "kwargs_handlers": [ddp]}

    def prepare(
        self, accelerator: Accelerator, units: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, nn.Module]:
        self.world_size = accelerator.num_processes
        if self.cfg.sync_batchnorm and self.world_size > 1 and accelerator.device.type == "cuda":
            units = {n: nn.SyncBatchNorm.convert_sync_batchnorm(u) for n, u in units.items()}
            synced = sum(isinstance(m, nn.SyncBatchNorm) for u in units.values() for m in u.modules())
            if synced and accelerator.is_main_process:
                print(f"SyncBatchNorm: {synced} batch-norm layers share statistics across {self.world_size} ranks")
        prepared = accelerator.prepare(*[units[n] for n in UNITS], *[optimizers[n] for n in UNITS])
        self.units = dict(zip(UNITS, prepared[:2]))
        self.optimizers = dict(zip(UNITS, prepared[2:]))
        return self.units

    def unwrap(self, which: Unit) -> nn.Module:
        unit = self.units[which]
        return unit.module if isinstance(unit, nn.parallel.DistributedDataParallel) else unit

    def no_sync(self, which: Unit, is_last: bool) -> contextlib.AbstractContextManager:
        skip_sync = self.cfg.debug_skip_grad_sync or not is_last
        if self.world_size == 1 or not skip_sync:
            return contextlib.nullcontext()
        return self.units[which].no_sync()

    def backward(self, which: Unit, loss: torch.Tensor) -> None:
        self.scalers[which].scale(loss / self.accum_steps).backward()

    def step(self, which: Unit) -> torch.Tensor:
        """Unscale, clip, optimizer step, zero grads. A NaN or infinite gradient norm skips the optimizer step:
        under fp16 the unit's scaler decides (and lowers its scale); otherwise the fused AdamW skips on the device
        (no host sync), the other kernels after one host check."""
        optimizer, scaler = self.optimizers[which], self.scalers[which]
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clips[which] or math.inf).detach()
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            step_unless_nonfinite(optimizer, norm)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def loss_scale(self, which: Unit) -> float:
        return float(self.scalers[which].get_scale()) if self.scalers[which].is_enabled() else 1.0

    def parameter_shards(self, which: Unit) -> list[torch.Tensor]:
        return [param.data for param in self.unwrap(which).parameters()]

    def write_parameter_shards(self, which: Unit, shards: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for target, shard in zip(self.parameter_shards(which), shards, strict=True):
                target.copy_(shard)

    def full_from_shards(self, which: Unit, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [name for name, _ in self.unwrap(which).named_parameters()]
        return {name: host_copy(shard.float()) for name, shard in zip(names, shards, strict=True)}

    def shards_from_full(self, which: Unit, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [full[name].to(param.device, torch.float32) for name, param in self.unwrap(which).named_parameters()]

    def full_state_dict(self, which: Unit) -> dict[str, torch.Tensor]:
        module = self.unwrap(which)
        state = buffers_on_cpu(module)
        for name, param in module.named_parameters():
            state[name] = host_copy(param.float())
        return state

    def full_shapes(self, which: Unit) -> dict[str, tuple[int, ...]]:
        module = self.unwrap(which)
        return {name: tuple(t.shape) for name, t in [*module.named_buffers(), *module.named_parameters()]}

    def universal_state(self, which: Unit) -> dict[str, torch.Tensor]:
        base = self._base_optimizer(which)
        return with_adam_moments(self.full_state_dict(which), self.unwrap(which), base, lambda p, k: base.state[p][k])

    def load_universal_state(self, which: Unit, state: dict[str, torch.Tensor]) -> None:
        load_with_adam_moments(self.unwrap(which), self._base_optimizer(which), state, lambda param, full: full)

    def scaler_state(self) -> dict[str, dict]:
        return {u: s.state_dict() for u, s in self.scalers.items()}

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        for unit, scaler_state in state.items():
            if scaler_state:
                self.scalers[unit].load_state_dict(scaler_state)

    def state_bytes(self, which: Unit) -> dict[str, int]:
        return {
            "params": local_bytes(self.unwrap(which).parameters()),
            "optimizer": local_bytes(optimizer_tensors(self._base_optimizer(which))),
        }

    def _base_optimizer(self, which: Unit) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper."""
        return getattr(self.optimizers[which], "optimizer", self.optimizers[which])
