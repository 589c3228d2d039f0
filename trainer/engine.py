"""The one place that knows the distributed backend: Accelerate driving DDP or DeepSpeed ZeRO-1/2/3 for the two
trainable units (the generator pair "g" and the discriminator pair "d").

`Engine` builds the Accelerator, prepares each unit with its optimizer (two DDP modules, or two DeepSpeed engines
with their own DeepSpeed config each), and owns everything between a loss and updated weights: autocast, the
fp16 loss scaler of each unit, gradient accumulation without all-reduce on non-final micro-batches, clipping,
optimizer and scheduler steps, freezing a unit, consolidated weights and the cross-rank reduction of metrics.
The algorithm (cyclegan.py) never sees any of this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

from trainer.config import ConfigError, DistributedConfig, OptimizerConfig, TrainConfig

UNITS = ("g", "d")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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


def _single_process_rendezvous() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    )


DEEPSPEED_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_scaler_state(optimizer: object) -> dict[str, float]:
    """The dynamic fp16 loss scale of a DeepSpeed optimizer (empty without one), as plain numbers."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return {}
    return {field: float(getattr(scaler, field)) for field in DEEPSPEED_SCALER_FIELDS if hasattr(scaler, field)}


def set_deepspeed_scaler_state(optimizer: object, state: dict[str, float]) -> None:
    """Restore what `deepspeed_scaler_state` returned."""
    scaler = optimizer.loss_scaler
    for field, value in state.items():
        if field in DEEPSPEED_SCALER_FIELDS:
            setattr(scaler, field, value if field == "cur_scale" else int(value))


class Engine:
    """Owns the Accelerator and, after `prepare`, both units with their optimizers, schedulers and scalers."""

    def __init__(self, cfg: DistributedConfig, train: TrainConfig, optim: OptimizerConfig, log_with: str | None = None):
        cfg = resolve_backend(cfg)
        self.cfg = cfg
        self.precision = train.precision
        self.accum_steps = train.grad_accum_steps
        self.compile_mode = train.compile_mode if train.compile else None
        self.is_deepspeed = cfg.backend == "deepspeed"
        on_cuda = torch.cuda.is_available() and not cfg.cpu
        if self.is_deepspeed and "WORLD_SIZE" not in os.environ:
            _single_process_rendezvous()  # DeepSpeed needs a process group even for one process without a launcher
        group_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))
        if not on_cuda and (self.is_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            group_kwargs.backend = "gloo"  # else DeepSpeed on CPU gives every rank process_index 0
        self.clips = {"g": optim.clip_grad_norm_g, "d": optim.clip_grad_norm_d}
        plugins = None
        if self.is_deepspeed:
            if train.precision == "fp16" and not on_cuda:
                raise ConfigError("train.precision=fp16 with DeepSpeed needs CUDA; use bf16 or fp32 on CPU")
            # The launcher's DeepSpeed fields were read by resolve_backend; the DeepSpeed configs below are complete,
            # and accelerate refuses a full config while this variable lists fields from an accelerate config.
            os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
            plugins = {
                u: DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, train, self.clips[u], on_cuda)) for u in UNITS
            }
        self.accelerator = Accelerator(
            # cpu=True also makes a multi-process launch on a machine without CUDA use DDP over gloo.
            cpu=not on_cuda and not self.is_deepspeed,
            # DDP: autocast and the per-unit GradScalers are ours; DeepSpeed: its config carries the precision.
            mixed_precision=ACCELERATE_PRECISION[train.precision] if self.is_deepspeed else "no",
            deepspeed_plugins=plugins,
            log_with=log_with,
            # Schedulers are stepped by us once per update; accelerate would step them once per process.
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[
                group_kwargs,
                DistributedDataParallelKwargs(
                    find_unused_parameters=False, bucket_cap_mb=cfg.bucket_cap_mb, static_graph=cfg.static_graph
                ),
            ],
        )
        self._check_launch_shape()
        scaler_on = train.precision == "fp16" and not self.is_deepspeed
        self.scalers = {u: torch.amp.GradScaler(self.device.type, enabled=scaler_on) for u in UNITS}
        self.units: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    def _check_launch_shape(self) -> None:
        """Refuse a multi-node launch whose nodes were started with different shapes. torchrun lets a node that
        was told --num_machines 3 join a 2-node job and hangs at exit; such nodes see another GROUP_WORLD_SIZE."""
        if self.world_size == 1:
            return
        mine = [int(os.environ.get(k, "1")) for k in ("GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE")]
        views = self.accelerator.gather(torch.tensor([mine], device=self.device)).tolist()
        if any(view != views[0] for view in views):
            nodes, procs = sorted({v[0] for v in views}), sorted({v[1] for v in views})
            raise ConfigError(
                f"the nodes of this launch disagree on its shape: ranks were told num_machines={nodes} and "
                f"processes per node={procs}; start every node with the same --num_machines and --num_processes"
            )

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

    @property
    def backend_name(self) -> str:
        """`ddp` or `zero1`/`zero2`/`zero3` (+`-offload`), for logs."""
        if not self.is_deepspeed:
            return "ddp"
        offload = "-offload" if self.cfg.offload_optimizer or self.cfg.offload_params else ""
        return f"zero{self.cfg.zero_stage}{offload}"

    def global_batch(self, batch_size: int) -> int:
        """Images per domain per optimizer update over all ranks and micro-batches."""
        return batch_size * self.world_size * self.accum_steps

    def prepare(
        self,
        units: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    ) -> dict[str, nn.Module]:
        """Wrap the units ("g", "d") and their optimizers for the backend; returns the wrapped units."""
        if self.compile_mode is not None:
            for unit in units.values():
                for child in unit.children():
                    # In place: parameter names (checkpoints, exports) stay the same. Static shapes: each batch
                    # shape (e.g. fused and single passes) gets its own specialized graph and CUDA graph.
                    child.compile(mode=self.compile_mode, dynamic=False)
        if self.is_deepspeed:
            for name in UNITS:
                # Two engines from one Accelerator: select this unit's DeepSpeed config, prepare one model at a time.
                self.accelerator.state.select_deepspeed_plugin(name)
                self.units[name], self.optimizers[name] = self.accelerator.prepare(units[name], optimizers[name])
        else:
            if self.cfg.sync_batchnorm and self.world_size > 1 and self.device.type == "cuda":
                units = {n: nn.SyncBatchNorm.convert_sync_batchnorm(u) for n, u in units.items()}
                synced = sum(isinstance(m, nn.SyncBatchNorm) for u in units.values() for m in u.modules())
                if synced and self.is_main:
                    print(f"SyncBatchNorm: {synced} batch-norm layers share statistics across {self.world_size} ranks")
            prepared = self.accelerator.prepare(*[units[n] for n in UNITS], *[optimizers[n] for n in UNITS])
            self.units = dict(zip(UNITS, prepared[:2]))
            self.optimizers = dict(zip(UNITS, prepared[2:]))
        self.schedulers = schedulers
        return self.units

    def unwrap(self, which: str) -> nn.Module:
        """The plain module of unit `which`, for forwards that must bypass the DDP wrapper or DeepSpeed engine
        (the frozen discriminators in the generator step, sampling, evaluation). Not accelerate's unwrap_model,
        which imports DeepSpeed (and its start-up warnings) into every run."""
        unit = self.units[which]
        return unit.module if isinstance(unit, nn.parallel.DistributedDataParallel) or self.is_deepspeed else unit

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
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def accumulate(self, which: str, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward of unit `which`: under DDP, gradients are all-reduced
        only on the last micro-batch (DeepSpeed manages its own accumulation boundary)."""
        skip_sync = self.cfg.debug_skip_grad_sync or not is_last
        if self.is_deepspeed or self.world_size == 1 or not skip_sync:
            return contextlib.nullcontext()
        return self.units[which].no_sync()

    def backward(self, loss: torch.Tensor, which: str) -> None:
        """Backward of one micro-batch's loss into unit `which`, averaged over the accumulation steps."""
        if self.is_deepspeed:
            engine = self.units[which]
            engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
            engine.step()  # counts micro-batches; updates only at the accumulation boundary
        else:
            self.scalers[which].scale(loss / self.accum_steps).backward()

    def step(self, which: str) -> torch.Tensor:
        """Finish the update of unit `which` after its last micro-batch: unscale, clip, optimizer step, scheduler
        step, zero grads. A NaN or infinite gradient norm skips the optimizer step: under fp16 the unit's own
        scaler decides (and lowers its scale); otherwise the fused AdamW skips on the device (no host sync), the
        other kernels after one host check; DeepSpeed skips such steps itself.

        Returns:
            The unit's gradient norm before clipping (a device tensor; inf when DeepSpeed skipped the step).
        """
        if self.is_deepspeed:
            self.schedulers[which].step()
            norm = self.units[which].get_global_grad_norm()
            return torch.tensor(float("inf") if norm is None else float(norm))
        optimizer, scaler = self.optimizers[which], self.scalers[which]
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clips[which] or math.inf).detach()
        base = self._base_optimizer(which)
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        elif getattr(base, "_step_supports_amp_scaling", False):  # fused: reads found_inf on the device
            base.found_inf = (~torch.isfinite(norm)).float()
            optimizer.step()
            del base.found_inf
        elif torch.isfinite(norm):
            optimizer.step()
        self.schedulers[which].step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self, which: str) -> float:
        """Current learning rate of unit `which`."""
        return self.schedulers[which].get_last_lr()[0]

    def loss_scale(self, which: str) -> float:
        """Current fp16 loss scale of unit `which` (1.0 without fp16). Syncs with the device: call at log time."""
        if self.is_deepspeed:
            return float(getattr(self.units[which].optimizer, "cur_scale", 1.0))
        return float(self.scalers[which].get_scale()) if self.scalers[which].is_enabled() else 1.0

    def full_state_dict(self, which: str) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights and buffers of unit `which` on CPU; a collective under DeepSpeed (every rank
        must call it), since ZeRO shards or half-precision copies hold the parameters."""
        module = self.unwrap(which)
        state = {name: buf.detach().cpu().clone() for name, buf in module.named_buffers()}
        if self.is_deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in module.named_parameters():
                state[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
        else:
            for name, param in module.named_parameters():
                state[name] = param.detach().float().cpu().clone()
        return state

    def full_shapes(self, which: str) -> dict[str, tuple[int, ...]]:
        """Full (unpartitioned) shape of every parameter and buffer of unit `which`, by name."""
        module = self.unwrap(which)
        shapes = {name: tuple(buf.shape) for name, buf in module.named_buffers()}
        for name, param in module.named_parameters():
            shapes[name] = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape apart
        return shapes

    def _base_optimizer(self, which: str) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
        inner = getattr(self.optimizers[which], "optimizer", self.optimizers[which])
        return getattr(inner, "optimizer", inner)

    def optimizer_state_bytes(self, which: str) -> int:
        """Bytes of optimizer state (and fp32 master partitions under DeepSpeed) that this rank holds for `which`."""
        base = self._base_optimizer(which)
        return sum(
            t.numel() * t.element_size()
            for state in base.state.values()
            for t in state.values()
            if torch.is_tensor(t) and t.dim() > 0
        )

    def universal_state(self, which: str) -> dict[str, torch.Tensor]:
        """Backend-independent full state of unit `which` on CPU: fp32 weights and buffers by name, Adam's
        `NAME.exp_avg` / `NAME.exp_avg_sq` and its update count `__step__` (once it has stepped). A collective
        under DeepSpeed: every rank must call it."""
        state = self.full_state_dict(which)
        base = self._base_optimizer(which)
        steps = [s["step"] for s in base.state.values() if "step" in s]
        if not steps:
            return state
        state["__step__"] = torch.as_tensor(steps[0], dtype=torch.float32).reshape(()).cpu().clone()
        for name, param in self.unwrap(which).named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                if self.is_deepspeed:
                    from deepspeed.utils import safe_get_full_optimizer_state

                    value = safe_get_full_optimizer_state(param, key)
                else:
                    value = base.state[param][key]
                state[f"{name}.{key}"] = value.detach().float().cpu().clone()
        return state

    def load_universal_state(self, which: str, state: dict[str, torch.Tensor]) -> None:
        """Load what `universal_state` returned, whatever backend and world size wrote it (a collective under
        DeepSpeed). Weights go into the module (and DeepSpeed's fp32 master partitions), Adam's moments into this
        rank's share of the optimizer state."""
        module = self.unwrap(which)
        base = self._base_optimizer(which)
        step = state.get("__step__")
        with torch.no_grad():
            for name, buf in module.named_buffers():
                buf.copy_(state[name])
            if self.is_deepspeed and step is not None:
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
                if self.is_deepspeed:
                    self._set_deepspeed_param(param, state, name, step is not None)
                else:
                    param.copy_(state[name].to(param.dtype))
                    if step is not None:
                        base.state[param] = {
                            "step": step.clone(),
                            "exp_avg": state[f"{name}.exp_avg"].clone(),
                            "exp_avg_sq": state[f"{name}.exp_avg_sq"].clone(),
                        }

    def _set_deepspeed_param(
        self, param: nn.Parameter, state: dict[str, torch.Tensor], name: str, moments: bool
    ) -> None:
        import deepspeed
        from deepspeed import utils

        keys = ("exp_avg", "exp_avg_sq") if moments else ()
        value = state[name].to(self.device)
        if not hasattr(param, "ds_id"):  # ZeRO-1/2: whole working copy on every rank, fp32 master partitioned
            param.data.copy_(value.to(param.dtype))
            utils.safe_set_full_fp32_param(param, value)
            for key in keys:
                utils.safe_set_full_optimizer_state(param, state[f"{name}.{key}"].to(self.device), key)
            return
        # ZeRO-3: gather, set and re-partition the working copy; write this rank's padded slice of the master
        # and moments (DeepSpeed's full-tensor setter fails when the size does not divide by the world size).
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if self.rank == 0:
                param.data.copy_(value.to(param.dtype))
        size = param.ds_tensor.numel()

        def local(full: torch.Tensor) -> torch.Tensor:
            flat = full.flatten().to(self.device)
            flat = F.pad(flat, (0, size * self.world_size - flat.numel()))
            return flat.narrow(0, size * self.rank, size)

        utils.safe_set_local_fp32_param(param, local(value))
        for key in keys:
            utils.safe_set_local_optimizer_state(param, local(state[f"{name}.{key}"]), key)

    def state_dict(self) -> dict:
        """The schedulers' and loss scalers' states (weights and optimizer states are in `universal_state`)."""
        scalers = {u: s.state_dict() for u, s in self.scalers.items()}
        if self.is_deepspeed:
            scalers = {u: deepspeed_scaler_state(self.units[u].optimizer) for u in UNITS}
        return {"schedulers": {u: s.state_dict() for u, s in self.schedulers.items()}, "scalers": scalers}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, including each optimizer's current learning rate (a scheduler's
        load_state_dict restores its position but leaves the optimizer at the LR it was built with)."""
        for unit, sched_state in state["schedulers"].items():
            scheduler = self.schedulers[unit]
            scheduler.load_state_dict(sched_state)
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        for unit, scaler_state in state["scalers"].items():
            if not scaler_state:
                continue
            if self.is_deepspeed:
                set_deepspeed_scaler_state(self.units[unit].optimizer, scaler_state)
            else:
                self.scalers[unit].load_state_dict(scaler_state)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (one tiny all-reduce)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def replica_spread(self) -> float | None:
        """Largest relative difference between ranks of a fingerprint of each unit's weights (their sum and sum of
        squares, in float64): 0 when every rank holds the same weights, as synchronized gradients guarantee. None
        when there is nothing to compare: one process, or ZeRO-3, whose ranks hold different slices."""
        if self.world_size == 1 or (self.is_deepspeed and self.cfg.zero_stage == 3):
            return None
        rows = []
        for which in UNITS:
            params = [p.detach().double() for p in self.unwrap(which).parameters()]
            rows += [sum(p.sum() for p in params), sum(p.square().sum() for p in params)]
        everyone = self.accelerator.gather(torch.stack(rows).to(self.device).unsqueeze(0))  # (world_size, 4)
        spread = (everyone - everyone[0]).abs().amax(dim=0) / everyone[0].abs().clamp_min(1e-30)
        return spread.max().item()

    def memory_metrics(self) -> dict[str, float]:
        """mem/ metrics of this process: host RSS and, on CUDA, the peak memory allocated by tensors."""
        import psutil

        out = {"mem/host_rss_gb": psutil.Process().memory_info().rss / 2**30}
        if self.device.type == "cuda":
            out["mem/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each scalar over ranks, in one collective and one host sync."""
        if not values:
            return {}
        names = sorted(values)
        stacked = torch.stack([values[n].detach().float().reshape(()).to(self.device) for n in names])
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(names, reduced.cpu().tolist()))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Finish trackers and destroy the process group (clean interpreter exit on every rank)."""
        self.accelerator.end_training()
