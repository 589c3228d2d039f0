"""The engine of a training run: the Accelerator, this process's device and rank, autocast, freezing a unit, the
learning-rate schedules and the collectives - for the two trainable units (the generator pair "g" and the
discriminator pair "d"). Everything that depends on how the units are shared across ranks (DDP or DeepSpeed ZeRO)
is delegated to the backend (trainer/runtime/backends/); the engine never branches on it, and the algorithm
(cyclegan.py) never sees either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from datetime import timedelta
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from shards.cpu_budget import CpuBudget
from trainer.config.checks import ConfigError
from trainer.config.sections import DistributedConfig, EMAConfig, OptimizerConfig, TrainConfig
from trainer.runtime.backends import UNITS, Backend, Unit, build_backend, resolve_backend
from trainer.runtime.cpu_threads import apply_threads, torch_threads
from trainer.runtime.ema import GeneratorEMA
from trainer.runtime.precision import resolve_precision
from trainer.runtime.watchdog import Watchdog

EMA_UNIT: Literal["g_ema"] = "g_ema"
"""The generators' moving average in a checkpoint (trainer.runtime.ema)."""
CheckpointUnit = Unit | Literal["g_ema"]
"""A unit of a checkpoint's units.safetensors: the two trainable units and the generators' average."""

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """Owns the Accelerator and, after `prepare`, both units with their optimizers, schedulers and scalers."""

    def __init__(self, cfg: DistributedConfig, train: TrainConfig, optim: OptimizerConfig, log_with: str | None = None):
        cfg = resolve_backend(cfg)
        self.cfg = cfg
        on_cuda = torch.cuda.is_available() and not cfg.cpu
        precision, self.precision_reason = resolve_precision(train.precision, on_cuda)
        train = self.train_cfg = dataclasses.replace(train, precision=precision)
        self.precision = precision
        self.cpu_threads_reason = "torch's default"
        self.cpu_budget: CpuBudget | None = None
        self.accum_steps = train.grad_accum_steps
        self.compile_mode = train.compile_mode if train.compile else None
        self.backend: Backend = build_backend(cfg, train, optim, on_cuda)
        group_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))
        if not on_cuda and (self.backend.always_distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            group_kwargs.backend = "gloo"  # else DeepSpeed on CPU gives every rank process_index 0
        backend_kwargs = self.backend.accelerator_kwargs()
        self.accelerator = Accelerator(
            log_with=log_with,
            # Schedulers are stepped by us once per update; accelerate would step them once per process.
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[group_kwargs, *backend_kwargs.pop("kwargs_handlers", [])],
            **backend_kwargs,
        )
        self._check_launch_shape()
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.ema: GeneratorEMA | None = None
        self.watchdog: Watchdog | None = None  # the training loop's (trainer.train)
        self.waited_s = 0.0  # wall time in calls where ranks wait for each other (trainer.observe.stragglers)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Label the block for the hang watchdog and profiler traces (trainer.runtime.watchdog)."""
        return self.watchdog.phase(name) if self.watchdog is not None else contextlib.nullcontext()

    def unwatched(self) -> contextlib.AbstractContextManager:
        """The block runs without the hang watchdog's timer (a wait with its own bound)."""
        return self.watchdog.unwatched() if self.watchdog is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def synchronizing(self, phase: str | None = None) -> Iterator[None]:
        """Count the block's wall time in `waited_s`: a call where this rank may wait for the others (a backward
        that reduces gradients, an optimizer step, a collective, labelled as `phase` when named)."""
        start = time.perf_counter()
        try:
            with self.phase(phase) if phase else contextlib.nullcontext():
                yield
        finally:
            self.waited_s += time.perf_counter() - start

    def use_cpu_threads(self, requested: int | str, loader_workers: int, budget: CpuBudget) -> None:
        """Run torch's operators on train.cpu_threads=`requested` threads (auto: this rank's share of `budget`)."""
        threads, self.cpu_threads_reason = torch_threads(requested, self.device.type == "cuda", loader_workers, budget)
        apply_threads(threads)
        self.cpu_budget = budget
        self.train_cfg = dataclasses.replace(self.train_cfg, cpu_threads=threads)

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
        """`ddp`, `fsdp2` or `zero1`/`zero2`/`zero3` (+`-offload`), for logs."""
        return self.backend.name

    def global_batch(self, batch_size: int) -> int:
        """Images per domain per optimizer update over all ranks and micro-batches."""
        return batch_size * self.world_size * self.accum_steps

    def prepare(
        self,
        units: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    ) -> dict[str, nn.Module]:
        """Compile (train.compile) and wrap the units ("g", "d") and their optimizers for the backend; returns the
        wrapped units."""
        if self.compile_mode is not None:
            for unit in units.values():
                for child in unit.children():
                    # In place: parameter names (checkpoints, exports) stay the same. Static shapes: each batch
                    # shape (e.g. fused and single passes) gets its own specialized graph and CUDA graph.
                    child.compile(mode=self.compile_mode, dynamic=False)
        self.schedulers = schedulers
        return self.backend.prepare(self.accelerator, units, optimizers)

    def unwrap(self, which: Unit) -> nn.Module:
        """The plain module of unit `which`, for forwards that must bypass the DDP wrapper or DeepSpeed engine
        (the frozen discriminators in the generator step, sampling, evaluation)."""
        return self.backend.unwrap(which)

    @contextlib.contextmanager
    def frozen(self, which: Unit) -> Iterator[nn.Module]:
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

    def accumulate(self, which: Unit, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward of unit `which`: gradients are synchronized across
        ranks only on the last micro-batch."""
        return self.backend.no_sync(which, is_last)

    def backward(self, loss: torch.Tensor, which: Unit) -> None:
        """Backward of one micro-batch's loss into unit `which`, averaged over the accumulation steps."""
        with self.synchronizing():
            self.backend.backward(which, loss)

    def step(self, which: Unit) -> torch.Tensor:
        """Finish the update of unit `which` after its last micro-batch and step its LR schedule. A NaN or
        infinite gradient norm skips the optimizer step.

        Returns:
            The unit's gradient norm before clipping (a device tensor; inf when the backend skipped the step).
        """
        with self.synchronizing():
            norm = self.backend.step(which)
        self.schedulers[which].step()
        return norm

    def lr(self, which: Unit) -> float:
        """Current learning rate of unit `which`."""
        return self.schedulers[which].get_last_lr()[0]

    def loss_scale(self, which: Unit) -> float:
        """Current fp16 loss scale of unit `which` (1.0 without fp16). Syncs with the device: call at log time."""
        return self.backend.loss_scale(which)

    def full_state_dict(self, which: Unit) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights and buffers of unit `which` on CPU; a collective where ranks hold parts of
        them (every rank must call it)."""
        return self.backend.full_state_dict(which)

    def full_shapes(self, which: CheckpointUnit) -> dict[str, tuple[int, ...]]:
        """Full (unpartitioned) shape of every parameter and buffer of unit `which` (or EMA_UNIT), by name."""
        return self.backend.full_shapes("g" if which == EMA_UNIT else which)

    def attach_ema(self, cfg: EMAConfig) -> None:
        """Keep a moving average of the generators' weights from now on (trainer.runtime.ema); checkpoints then hold it
        as the unit EMA_UNIT."""
        self.ema = GeneratorEMA(cfg, self.backend.parameter_shards("g"))

    def update_ema(self, images_seen: int, batch_images: int) -> None:
        """Move the average after a generator update (nothing without one)."""
        if self.ema is not None:
            self.ema.update(self.backend.parameter_shards("g"), images_seen, batch_images)

    def restart_ema(self) -> None:
        """Set the average to the generators' current weights (after loading a checkpoint that has none)."""
        if self.ema is not None:
            self.ema.take(self.backend.parameter_shards("g"))

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The generators hold their moving average for the block (their own weights without one)."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.swapped_in(
            self.backend.parameter_shards("g"), lambda shards: self.backend.write_parameter_shards("g", shards)
        )

    @property
    def checkpoint_units(self) -> tuple[CheckpointUnit, ...]:
        """The units a checkpoint holds: with an average also EMA_UNIT (its parameters and the generators'
        buffers)."""
        return (*UNITS, EMA_UNIT) if self.ema is not None else UNITS

    def state_bytes(self, which: Unit) -> dict[str, int]:
        """Bytes this rank holds of unit `which`: `params` (whole, or its shards) and `optimizer` state."""
        return self.backend.state_bytes(which)

    def universal_state(self, which: CheckpointUnit) -> dict[str, torch.Tensor]:
        """Backend-independent full state of unit `which` on CPU: fp32 weights and buffers by name, Adam's
        `NAME.exp_avg` / `NAME.exp_avg_sq` and its update count `__step__` (once it has stepped); for EMA_UNIT the
        generators' moving average (weights and buffers). A collective where ranks hold parts of it."""
        if which == EMA_UNIT:
            buffers = {name: buf.detach().cpu().clone() for name, buf in self.unwrap("g").named_buffers()}
            return {**buffers, **self.backend.full_from_shards("g", self.ema.average)}
        return self.backend.universal_state(which)

    def load_universal_state(self, which: CheckpointUnit, state: dict[str, torch.Tensor]) -> None:
        """Load what `universal_state` returned, whatever backend and world size wrote it (a collective)."""
        if which == EMA_UNIT:
            self.ema.take(self.backend.shards_from_full("g", state))
            return
        self.backend.load_universal_state(which, state)

    def state_dict(self) -> dict:
        """The schedulers' and loss scalers' states (weights and optimizer states are in `universal_state`)."""
        schedulers = {u: s.state_dict() for u, s in self.schedulers.items()}
        return {"schedulers": schedulers, "scalers": self.backend.scaler_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned: each schedule's position, with this launch's base learning rates
        (scaled for its global batch, which an elastic or resized restart changes) rather than the saved ones, and
        each optimizer's learning rate at that position (a scheduler's load_state_dict alone leaves the optimizer
        at the LR it was built with)."""
        for unit, sched_state in state["schedulers"].items():
            scheduler = self.schedulers[unit]
            base_lrs = list(scheduler.base_lrs)
            scheduler.load_state_dict(sched_state)
            scheduler.base_lrs = base_lrs
            scheduler.last_epoch -= 1
            scheduler.step()  # recomputes the learning rates at the restored position from base_lrs
        self.backend.load_scaler_state(state["scalers"])

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (one tiny all-reduce)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self.synchronizing("collective any_rank"):
            return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def broadcast_json(self, value: Any) -> Any:
        """The main rank's `value` (JSON-serializable) on every rank; JSON, not pickle, travels."""
        if self.world_size == 1:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        size = torch.tensor([len(data)], device=self.device)
        with self.synchronizing("collective broadcast"):
            torch.distributed.broadcast(size, src=0)
            buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
            if self.is_main:
                buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            torch.distributed.broadcast(buffer, src=0)
        return json.loads(bytes(buffer.cpu().tolist()).decode())

    def replica_spread(self) -> float | None:
        """Largest relative difference between ranks of a fingerprint of each unit's weights (their sum and sum of
        squares, in float64): 0 when every rank holds the same weights, as synchronized gradients guarantee. None
        when there is nothing to compare: one process, or FSDP2 and ZeRO-3, whose ranks hold different slices."""
        if self.world_size == 1 or not self.backend.replicas_comparable:
            return None
        rows = []
        for which in UNITS:
            params = [p.detach().double() for p in self.unwrap(which).parameters()]
            rows += [sum(p.sum() for p in params), sum(p.square().sum() for p in params)]
        with self.synchronizing("collective gather"):
            everyone = self.accelerator.gather(torch.stack(rows).to(self.device).unsqueeze(0))  # (world_size, 4)
        spread = (everyone - everyone[0]).abs().amax(dim=0) / everyone[0].abs().clamp_min(1e-30)
        return spread.max().item()

    def memory_metrics(self) -> dict[str, float]:
        """mem/ metrics of this process: host RSS, the parameters and optimizer state it holds (shards under FSDP2
        and ZeRO) and, on CUDA, the peak memory allocated by tensors."""
        import psutil

        held = [self.state_bytes(which) for which in UNITS]
        out = {
            "mem/host_rss_gb": psutil.Process().memory_info().rss / 2**30,
            "mem/params_gb": sum(h["params"] for h in held) / 2**30,
            "mem/optimizer_state_gb": sum(h["optimizer"] for h in held) / 2**30,
        }
        if self.device.type == "cuda":
            out["mem/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def reduce(self, means: dict[str, torch.Tensor], sums: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Each scalar of `means` averaged and each of `sums` summed over ranks (counters: totals stay exact), in
        one collective and one host sync."""
        sums = sums or {}
        per_rank = self.gather_scalars({**means, **sums})
        return {name: sum(per_rank[name]) / (1 if name in sums else self.world_size) for name in per_rank}

    def gather_scalars(self, values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """Every rank's value of each scalar in `values`, indexed by rank, in one collective (an all-gather in
        float64) and one host sync."""
        names = sorted(values)
        if not names:
            return {}
        row = torch.stack([values[n].detach().double().reshape(()).to(self.device) for n in names]).unsqueeze(0)
        with self.synchronizing("collective gather scalars"):
            table = (self.accelerator.gather(row) if self.world_size > 1 else row).cpu().tolist()
        return {name: [rank_row[i] for rank_row in table] for i, name in enumerate(names)}

    def barrier(self) -> None:
        with self.synchronizing("collective barrier"):
            self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Finish trackers and destroy the process group (clean interpreter exit on every rank)."""
        self.accelerator.end_training()
