"""DeepSpeed ZeRO-1/2/3 (optionally with CPU offload): each unit is its own DeepSpeed engine with its own config.

Everything DeepSpeed lives here: its imports, its configs, the single-process rendezvous it needs, its fp16 loss
scaler state, and the arithmetic that maps a full (unsharded) tensor onto a rank's ZeRO partition for the
portable checkpoint.
"""

from __future__ import annotations

import contextlib
import os

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from deepspeed import utils as ds_utils

from trainer.config.checks import ConfigError
from trainer.config.sections import DistributedConfig, TrainConfig
from trainer.runtime.backends import (
    UNITS,
    Unit,
    buffers_on_cpu,
    host_copy,
    local_bytes,
    optimizer_tensors,
    single_process_rendezvous,
    with_adam_moments,
)

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_config(cfg: DistributedConfig, train: TrainConfig, clip: float, on_cuda: bool) -> dict:
    """The DeepSpeed config of one unit (each unit gets its own: clipping differs, and so would fp16 scaling)."""
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # We hand DeepSpeed a torch AdamW (no compiled DeepSpeed ops needed), also under CPU offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


def scaler_state(optimizer: object) -> dict[str, float]:
    """The dynamic fp16 loss scale of a DeepSpeed optimizer (empty without one), as plain numbers."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return {}
    return {field: float(getattr(scaler, field)) for field in SCALER_FIELDS if hasattr(scaler, field)}


def set_scaler_state(optimizer: object, state: dict[str, float]) -> None:
    """Restore what `scaler_state` returned."""
    scaler = optimizer.loss_scaler
    for field, value in state.items():
        if field in SCALER_FIELDS:
            setattr(scaler, field, value if field == "cur_scale" else int(value))


class DeepSpeedBackend:
    """Two DeepSpeed engines from one Accelerator, one DeepSpeed config each."""

    always_distributed = True
    offloads = True
    batch_norm_synced = True

    def __init__(self, cfg: DistributedConfig, train: TrainConfig, clips: dict[str, float], on_cuda: bool):
        if train.precision == "fp16" and not on_cuda:
            raise ConfigError("train.precision=fp16 with DeepSpeed needs CUDA; use bf16 or fp32 on CPU")
        single_process_rendezvous()  # DeepSpeed needs a process group even for one process without a launcher
        # The launcher's DeepSpeed fields were read by resolve_backend; the DeepSpeed configs below are complete,
        # and accelerate refuses a full config while this variable lists fields from an accelerate config.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        self.cfg, self.precision = cfg, train.precision
        self.plugins = {u: DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, train, clips[u], on_cuda)) for u in UNITS}
        offload = "-offload" if cfg.offload_optimizer or cfg.offload_params else ""
        self.name = f"zero{cfg.zero_stage}{offload}"
        self.replicas_comparable = cfg.zero_stage < 3  # ZeRO-3 ranks hold different slices
        self.double_backward = cfg.zero_stage < 3  # ZeRO-3 releases gathered weights after the inner backward
        self.units: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")

    def accelerator_kwargs(self) -> dict:
        precision = ACCELERATE_PRECISION[self.precision]  # DeepSpeed's config carries it; accelerate checks them
        return {"cpu": False, "mixed_precision": precision, "deepspeed_plugins": self.plugins}

    def prepare(
        self, accelerator: Accelerator, units: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, nn.Module]:
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        for name in UNITS:
            # Two engines from one Accelerator: select this unit's DeepSpeed config, prepare one model at a time.
            accelerator.state.select_deepspeed_plugin(name)
            self.units[name], self.optimizers[name] = accelerator.prepare(units[name], optimizers[name])
        return self.units

    def unwrap(self, which: Unit) -> nn.Module:
        return self.units[which].module

    def no_sync(self, which: Unit, is_last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed manages its own accumulation boundary

    def backward(self, which: Unit, loss: torch.Tensor) -> None:
        engine = self.units[which]
        engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        engine.step()  # counts micro-batches; updates only at the accumulation boundary

    def step(self, which: Unit) -> torch.Tensor:
        """The update happened in the last micro-batch's engine.step(); DeepSpeed skips non-finite steps itself.
        Returns its gradient norm (inf when it skipped the step)."""
        norm = self.units[which].get_global_grad_norm()
        return torch.tensor(float("inf") if norm is None else float(norm))

    def loss_scale(self, which: Unit) -> float:
        return float(getattr(self.units[which].optimizer, "cur_scale", 1.0))

    def parameter_shards(self, which: Unit) -> list[torch.Tensor]:
        """ZeRO-3: each parameter's partition (`ds_tensor`); ZeRO-1/2: the whole parameters. In the module's dtype
        (bf16 under train.precision=bf16: DeepSpeed's fp32 master copies live in its optimizer)."""
        return [getattr(param, "ds_tensor", param).data for param in self.unwrap(which).parameters()]

    def write_parameter_shards(self, which: Unit, shards: list[torch.Tensor]) -> None:
        """ZeRO-3: a collective. Its forward reads gathered copies, which small (persistent) parameters keep between
        forwards: each parameter is written whole and re-partitioned, as loading a checkpoint does."""
        with torch.no_grad():
            for param, shard in zip(self.unwrap(which).parameters(), shards, strict=True):
                if not hasattr(param, "ds_id"):
                    param.data.copy_(shard)
                    continue
                full = self._gather_partition(param, shard)
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(full.to(param.data.device, param.dtype))

    def _gather_partition(self, param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The full tensor of a ZeRO-3 parameter from each rank's `shard` (laid out like its ds_tensor; a
        collective, on the device: partitions offloaded to the CPU cannot go through NCCL)."""
        shard = shard.to(self.device).contiguous()
        parts = [torch.empty_like(shard) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, shard)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    def full_from_shards(self, which: Unit, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """ZeRO-3: a collective (each partition is all-gathered and the padding dropped)."""
        full = {}
        for (name, param), shard in zip(self.unwrap(which).named_parameters(), shards, strict=True):
            if hasattr(param, "ds_id"):
                shard = self._gather_partition(param, shard)
            full[name] = host_copy(shard.float())
        return full

    def shards_from_full(self, which: Unit, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for name, param in self.unwrap(which).named_parameters():
            value = full[name].to(self.device, torch.float32)
            out.append(self._partition(param, value) if hasattr(param, "ds_id") else value)
        return out

    def _partition(self, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a ZeRO-3 parameter's flattened full tensor, padded as DeepSpeed pads it."""
        size = param.ds_tensor.numel()
        flat = F.pad(full.flatten().to(self.device), (0, size * self.world_size - full.numel()))
        return flat.narrow(0, size * self.rank, size)

    def full_state_dict(self, which: Unit) -> dict[str, torch.Tensor]:
        """A collective: ZeRO shards or half-precision copies hold the parameters."""
        module = self.unwrap(which)
        state = buffers_on_cpu(module)
        for name, param in module.named_parameters():
            state[name] = host_copy(ds_utils.safe_get_full_fp32_param(param))
        return state

    def full_shapes(self, which: Unit) -> dict[str, tuple[int, ...]]:
        module = self.unwrap(which)
        shapes = {name: tuple(buf.shape) for name, buf in module.named_buffers()}
        for name, param in module.named_parameters():
            shapes[name] = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape apart
        return shapes

    def universal_state(self, which: Unit) -> dict[str, torch.Tensor]:
        """A collective (every rank must call it)."""
        return with_adam_moments(
            self.full_state_dict(which),
            self.unwrap(which),
            self._base_optimizer(which),
            ds_utils.safe_get_full_optimizer_state,
        )

    def load_universal_state(self, which: Unit, state: dict[str, torch.Tensor]) -> None:
        """A collective. Weights go into the module and DeepSpeed's fp32 master partitions, Adam's moments into
        this rank's share of the optimizer state."""
        module, base = self.unwrap(which), self._base_optimizer(which)
        step = state.get("__step__")
        with torch.no_grad():
            for name, buf in module.named_buffers():
                buf.copy_(state[name])
            if step is not None:
                # torch's Adam creates its state lazily; ZeRO's setters write into existing state tensors, keyed
                # by its flat fp32 partitions (ZeRO-3 keeps them apart from the optimizer's param groups).
                zero = getattr(self.optimizers[which], "optimizer", None)
                flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [
                    p for group in base.param_groups for p in group["params"]
                ]
                for flat in flats:
                    flat_state = base.state[flat]
                    flat_state["step"] = step.clone()
                    for key in ("exp_avg", "exp_avg_sq"):
                        flat_state.setdefault(key, torch.zeros_like(flat))
                # ZeRO-1/2 map each parameter to its slice of that state only after its first step; map it now.
                link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
                if link is not None:
                    link()
            for name, param in module.named_parameters():
                self._set_param(param, state, name, step is not None)

    def _set_param(self, param: nn.Parameter, state: dict[str, torch.Tensor], name: str, moments: bool) -> None:
        keys = ("exp_avg", "exp_avg_sq") if moments else ()
        value = state[name].to(self.device)
        if not hasattr(param, "ds_id"):  # ZeRO-1/2: whole working copy on every rank, fp32 master partitioned
            param.data.copy_(value.to(param.dtype))
            ds_utils.safe_set_full_fp32_param(param, value)
            for key in keys:
                ds_utils.safe_set_full_optimizer_state(param, state[f"{name}.{key}"].to(self.device), key)
            return
        # ZeRO-3: gather, set and re-partition the working copy; write this rank's padded slice of the master
        # and moments (DeepSpeed's full-tensor setter fails when the size does not divide by the world size).
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if self.rank == 0:
                param.data.copy_(value.to(param.dtype))
        ds_utils.safe_set_local_fp32_param(param, self._partition(param, value))
        for key in keys:
            ds_utils.safe_set_local_optimizer_state(param, self._partition(param, state[f"{name}.{key}"]), key)

    def scaler_state(self) -> dict[str, dict]:
        return {u: scaler_state(self.units[u].optimizer) for u in UNITS}

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        for unit, values in state.items():
            if values:
                set_scaler_state(self.units[unit].optimizer, values)

    def state_bytes(self, which: Unit) -> dict[str, int]:
        """The module's parameters (ZeRO-3: this rank's partitions) and the optimizer's state on its flat fp32
        partitions."""
        params = [getattr(p, "ds_tensor", p) for p in self.unwrap(which).parameters()]
        return {"params": local_bytes(params), "optimizer": local_bytes(optimizer_tensors(self._base_optimizer(which)))}

    def _base_optimizer(self, which: Unit) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
        inner = getattr(self.optimizers[which], "optimizer", self.optimizers[which])
        return getattr(inner, "optimizer", inner)
