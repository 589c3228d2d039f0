"""Distributed backends: one module per way of sharing the two units' training across ranks, behind `Backend`.

The engine (trainer/runtime/engine.py) owns the Accelerator, devices, autocast and collectives and never branches on the
backend; everything that differs between DDP, FSDP2 and DeepSpeed ZeRO - wrapping or sharding, gradient sync,
loss scaling, the optimizer step and the full (unsharded) state of a unit - lives in the backend's own module.
Adding a backend is one module implementing `Backend` plus a line in `build_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from typing import Callable, Iterable, Literal, Mapping, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator

from trainer.config.checks import ConfigError
from trainer.config.sections import DistributedConfig, OptimizerConfig, TrainConfig

Unit = Literal["g", "d"]
"""A trainable unit: the generator pair (g) or the discriminator pair (d)."""
UNITS: tuple[Unit, ...] = ("g", "d")
LAUNCHED_NAMES = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2"}


class Backend(Protocol):
    """What the engine asks of a backend, per unit ("g" or "d") after `prepare`."""

    name: str
    """For logs: `ddp`, `fsdp2`, `zero1`/`zero2`/`zero3` (+`-offload`)."""
    replicas_comparable: bool
    """Every rank holds the whole of each unit's weights (so a cross-rank fingerprint must agree)."""
    always_distributed: bool
    """Needs a process group even for one process (then gloo on CPU)."""
    double_backward: bool
    """A unit's weights stay usable through a backward whose graph was built with create_graph (a gradient
    penalty): false where the backend frees gathered weights after the first backward (FSDP2, ZeRO-3)."""
    offloads: bool
    """Can keep optimizer states or parameters in host memory (distributed.offload_optimizer/offload_params)."""
    batch_norm_synced: bool
    """Batch-norm running statistics stay the same on every rank (DDP broadcasts rank 0's buffers): false where
    each rank keeps its own (FSDP2, no SyncBatchNorm)."""

    def accelerator_kwargs(self) -> dict:
        """Keyword arguments of the Accelerator this backend needs (cpu, mixed_precision, plugins, and
        `kwargs_handlers` to add to the engine's)."""

    def prepare(
        self, accelerator: Accelerator, units: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, nn.Module]:
        """Wrap the units and their optimizers; returns the wrapped units."""

    def unwrap(self, which: Unit) -> nn.Module:
        """The plain module of unit `which` (for forwards that bypass the wrapper)."""

    def no_sync(self, which: Unit, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch of unit `which`: gradients are synchronized only on the last one."""

    def backward(self, which: Unit, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, averaged over the accumulation steps."""

    def step(self, which: Unit) -> torch.Tensor:
        """Finish the update after the last micro-batch (skipping a non-finite one); returns the grad norm."""

    def loss_scale(self, which: Unit) -> float:
        """The current fp16 loss scale (1.0 without one)."""

    def full_state_dict(self, which: Unit) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights and buffers on CPU (a collective where ranks hold parts)."""

    def full_shapes(self, which: Unit) -> dict[str, tuple[int, ...]]:
        """The full shape of every parameter and buffer."""

    def parameter_shards(self, which: Unit) -> list[torch.Tensor]:
        """The tensors this rank holds of each parameter of unit `which`, in `parameters()` order, as the forward
        reads them: writing into them changes the weights (whole parameters, or this rank's shards)."""

    def write_parameter_shards(self, which: Unit, shards: list[torch.Tensor]) -> None:
        """Make the forward of unit `which` use `shards` (laid out like `parameter_shards`) as its weights (a
        collective where the forward reads gathered copies)."""

    def full_from_shards(self, which: Unit, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full fp32 tensors on CPU, by parameter name, from tensors laid out like `parameter_shards` (a
        collective where ranks hold parts)."""

    def shards_from_full(self, which: Unit, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """This rank's part of each full tensor (by parameter name) laid out like `parameter_shards`, in fp32 on
        the parameters' device; no communication (every rank holds `full`)."""

    def universal_state(self, which: Unit) -> dict[str, torch.Tensor]:
        """Weights, buffers, Adam's moments (`NAME.exp_avg`, `NAME.exp_avg_sq`) and `__step__`, full and on CPU."""

    def load_universal_state(self, which: Unit, state: dict[str, torch.Tensor]) -> None:
        """Load what any backend's `universal_state` returned, at any world size."""

    def scaler_state(self) -> dict[str, dict]:
        """The loss scalers' states by unit (plain values)."""

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        """Restore what `scaler_state` returned."""

    def state_bytes(self, which: Unit) -> dict[str, int]:
        """Bytes this rank holds of unit `which`: `params` (its parameters or their shards) and `optimizer` (the
        optimizer's state tensors)."""


def launched_backend(environ: Mapping[str, str] = os.environ) -> str | None:
    """The backend the `accelerate launch` config chose: `deepspeed` (launch/zero*.yaml), `fsdp2`
    (launch/fsdp2*.yaml), or None (a DDP config, or no launcher).

    Raises:
        ConfigError: for an FSDP launch config of version 1.
    """
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if environ.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(
                f"the accelerate launch config asks for FSDP version {environ.get('FSDP_VERSION', '1')}; only FSDP2 "
                "is supported: set fsdp_config.fsdp_version: 2 (see launch/fsdp2.yaml)"
            )
        return "fsdp2"
    return None


def resolve_backend(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> DistributedConfig:
    """Settle backend=auto from the launcher (`launched_backend`; DDP without one). DeepSpeed takes the ZeRO
    stage and offload settings of its launch config, FSDP2 its fsdp_reshard_after_forward.

    Raises:
        ConfigError: when the config forces one backend and the launcher set up another.
    """
    launched = launched_backend(environ)
    if cfg.backend != "auto" and launched not in (None, cfg.backend):
        raise ConfigError(
            f"distributed.backend={cfg.backend} but accelerate launched with a {LAUNCHED_NAMES[launched]} config; use "
            "distributed.backend=auto or a launch config for that backend (launch/cpu-ddp-2.yaml for DDP)"
        )
    if cfg.backend != "auto":
        return cfg
    if launched is None:
        return dataclasses.replace(cfg, backend="ddp")
    if launched == "fsdp2":
        reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        return dataclasses.replace(cfg, backend="fsdp2", reshard_after_forward=reshard)

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
        from trainer.runtime.backends.deepspeed import DeepSpeedBackend as chosen
    elif cfg.backend == "fsdp2":
        from trainer.runtime.backends.fsdp2 import FSDP2Backend as chosen
    else:
        from trainer.runtime.backends.ddp import DDPBackend as chosen
    if (cfg.offload_optimizer or cfg.offload_params) and not chosen.offloads:
        raise ConfigError(
            f"distributed.offload_optimizer/offload_params need distributed.backend=deepspeed or auto; {cfg.backend} "
            "keeps everything on the device"
        )
    return chosen(cfg, train, clips, on_cuda)


def single_process_rendezvous() -> None:
    """Without a launcher, set the environment of a one-process rendezvous on a free loopback port, so the
    Accelerator creates a process group for backends that need one (`always_distributed`)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    )


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy on CPU: safetensors refuses the strides of channels_last weights."""
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def buffers_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's buffers on CPU, by name (buffers are never sharded)."""
    return {name: host_copy(buf) for name, buf in module.named_buffers()}


def adam_state(
    param: torch.Tensor, group: dict, step: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> dict[str, torch.Tensor]:
    """torch Adam's state of `param` from loaded values, laid out as torch keeps it: the moments like the parameter
    (device, dtype, memory format), the update count on the parameter's device for fused and capturable kernels
    and on the CPU otherwise."""
    on_device = group.get("fused") or group.get("capturable")
    return {
        "step": step.to(device=param.device, dtype=torch.float32) if on_device else step.clone(),
        "exp_avg": torch.empty_like(param).copy_(exp_avg),
        "exp_avg_sq": torch.empty_like(param).copy_(exp_avg_sq),
    }


def load_with_adam_moments(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, torch.Tensor],
    layout: Callable[[nn.Parameter, torch.Tensor], torch.Tensor],
) -> None:
    """Load what `with_adam_moments` returned into a module held whole or in torch-native shards: buffers, each
    weight and, when `__step__` is there, Adam's state, where `layout(param, full)` is the full tensor laid out
    like `param` (itself for whole weights, this rank's shard for DTensors)."""
    step = state.get("__step__")
    groups = {param: group for group in optimizer.param_groups for param in group["params"]}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(state[name])
        for name, param in module.named_parameters():
            param.copy_(layout(param, state[name]))
            if step is not None:
                moments = [layout(param, state[f"{name}.{key}"]) for key in ("exp_avg", "exp_avg_sq")]
                optimizer.state[param] = adam_state(param, groups[param], step, *moments)


def local_bytes(tensors: Iterable[object]) -> int:
    """Bytes this rank holds of the non-scalar tensors among `tensors` (a DTensor counts its local shard)."""
    total = 0
    for tensor in tensors:
        if hasattr(tensor, "to_local"):  # a DTensor (torch.distributed.tensor is imported only under FSDP2)
            tensor = tensor.to_local()
        if torch.is_tensor(tensor) and tensor.dim() > 0:
            total += tensor.numel() * tensor.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[object]:
    """Every value in a torch optimizer's per-parameter state (for `local_bytes`)."""
    return [value for state in optimizer.state.values() for value in state.values()]


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> None:
    """optimizer.step() unless the gradient norm is NaN or infinite: the fused AdamW reads the verdict on the device
    (no host sync), other kernels after one host check."""
    base = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if getattr(base, "_step_supports_amp_scaling", False):
        base.found_inf = (~torch.isfinite(norm)).float()
        optimizer.step()
        del base.found_inf
    elif torch.isfinite(norm):
        optimizer.step()


def with_adam_moments(
    state: dict[str, torch.Tensor],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    moment: Callable[[nn.Parameter, str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """`state` plus, once the optimizer has stepped, its update count `__step__` and each parameter's full Adam
    moments `NAME.exp_avg` / `NAME.exp_avg_sq` as `moment(param, key)` returns them (fp32, on CPU)."""
    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    if not steps:
        return state
    state["__step__"] = torch.as_tensor(steps[0], dtype=torch.float32).reshape(()).cpu().clone()
    for name, param in module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}.{key}"] = host_copy(moment(param, key).float())
    return state
