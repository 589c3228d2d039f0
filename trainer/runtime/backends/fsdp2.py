"""FSDP2: PyTorch's per-parameter sharding (`torch.distributed.fsdp.fully_shard`) over a one-dimensional DeviceMesh.

Each rank holds a dim-0 slice of every parameter (a DTensor), of its gradient and of Adam's moments; a block's
full weights exist only during its forward and backward (all-gathered, then freed when `reshard_after_forward`),
and gradients are reduce-scattered. Each network (`shard_roots`) is a root group; inside it, blocks are the smallest
submodules holding at least `distributed.fsdp_min_block_params` parameters outside smaller blocks.
The torch optimizers work on the DTensor shards directly, so clipping, skipping a non-finite update and Adam are the
same code as under DDP. fp16 is refused (no loss scaler here); bf16 uses FSDP2's mixed-precision policy (bf16
all-gathers and compute, fp32 gradient reduction and master weights).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from typing import Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.config.checks import ConfigError
from trainer.config.sections import DistributedConfig, TrainConfig
from trainer.runtime.backends import (
    UNITS,
    Unit,
    buffers_on_cpu,
    host_copy,
    load_with_adam_moments,
    local_bytes,
    optimizer_tensors,
    single_process_rendezvous,
    step_unless_nonfinite,
    with_adam_moments,
)

LAUNCHER_FSDP_VARIABLES = ("ACCELERATE_USE_FSDP", "FSDP_VERSION")
FORWARD_METHODS = ("features",)
"""Methods besides `forward` that the algorithm calls on a root network (the ResNet's `features`, for CUT's
PatchNCE): FSDP2 gathers a root's weights only around the methods it was told of."""


def shard_roots(unit: nn.Module) -> list[nn.Module]:
    """The unit's networks, each sharded as its own root: the algorithm calls them one by one (the frozen
    discriminators in the generator step, each generator in evaluation), and FSDP2 needs every forward to enter
    through a root. A network holding a module shared with another (the article's H trunk, under both
    discriminator heads) is split into its children, so the shared module is a root once."""
    parents = Counter(id(m) for _, m in unit.named_modules(remove_duplicate=False))

    def split(module: nn.Module) -> list[nn.Module]:
        if parents[id(module)] > 1 or all(parents[id(m)] == 1 for m in module.modules()):
            return [module]
        return [root for child in module.children() for root in split(child)]

    roots: list[nn.Module] = []
    for network in unit.children():
        for root in split(network):
            if all(root is not r for r in roots) and next(root.parameters(), None) is not None:
                roots.append(root)
    return roots


def shard_blocks(root: nn.Module, min_params: int) -> list[nn.Module]:
    """The submodules of `root` to shard as their own groups, innermost first: each module with a forward of its own
    holding at least `min_params` parameters outside the groups below it."""
    blocks: list[nn.Module] = []

    def visit(node: nn.Module) -> int:
        """Parameters under `node` not yet in a group."""
        free = sum(visit(child) for child in node.children())
        free += sum(p.numel() for p in node.parameters(recurse=False))
        # FSDP2 gathers a group in its module's forward: containers that only hold modules (ModuleList) have none
        runs_forward = type(node).forward is not nn.Module.forward
        if free >= min_params and node is not root and runs_forward:
            blocks.append(node)
            return 0
        return free

    visit(root)
    return blocks


class FSDP2Backend:
    """Both units sharded with `fully_shard` over all ranks; plain torch optimizers on the shards."""

    name = "fsdp2"
    replicas_comparable = False  # ranks hold different slices
    always_distributed = True
    double_backward = False  # the reshard after the inner backward frees what the outer one needs
    offloads = False
    batch_norm_synced = False  # each rank's statistics stay its own: no SyncBatchNorm under fully_shard

    def __init__(self, cfg: DistributedConfig, train: TrainConfig, clips: dict[str, float], on_cuda: bool):
        if train.precision == "fp16":
            raise ConfigError("train.precision=fp16 with distributed.backend=fsdp2 is not supported; use bf16")
        if train.channels_last:
            raise ConfigError(
                "train.channels_last=true with distributed.backend=fsdp2: fully_shard needs contiguous weights"
            )
        if train.compile and train.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"train.compile_mode={train.compile_mode} (CUDA graphs) with distributed.backend=fsdp2 would capture "
                "its collectives; use default or max-autotune-no-cudagraphs"
            )
        # resolve_backend read the launcher's FSDP fields; the sharding is ours, not accelerate's FSDP plugin.
        for key in LAUNCHER_FSDP_VARIABLES:
            os.environ.pop(key, None)
        single_process_rendezvous()  # fully_shard needs a process group even for one process without a launcher
        self.cfg, self.clips, self.on_cuda = cfg, clips, on_cuda
        self.accum_steps = train.grad_accum_steps
        self.mixed_precision = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if train.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        self.units: dict[str, nn.Module] = {}
        self.roots: dict[str, list[nn.Module]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def accelerator_kwargs(self) -> dict:
        return {"cpu": not self.on_cuda, "mixed_precision": "no"}

    def prepare(
        self, accelerator: Accelerator, units: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, nn.Module]:
        options = {
            "mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,)),
            "mp_policy": self.mixed_precision,
            "reshard_after_forward": self.cfg.reshard_after_forward,
        }
        for name in UNITS:
            unit = units[name].to(accelerator.device)
            before = dict(unit.named_parameters())
            self.roots[name] = shard_roots(unit)
            for root in self.roots[name]:
                for block in shard_blocks(root, self.cfg.fsdp_min_block_params):
                    fully_shard(block, **options)
                fully_shard(root, **options)
                for method in FORWARD_METHODS:
                    if hasattr(root, method):
                        register_fsdp_forward_method(root, method)
                _settle_root(root)
            self.units[name] = unit
            self.optimizers[name] = _swap_parameters(optimizers[name], before, dict(unit.named_parameters()))
        return self.units

    def unwrap(self, which: Unit) -> nn.Module:
        return self.units[which]  # fully_shard works in place: the unit holds its sharded networks

    def no_sync(self, which: Unit, is_last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(self.roots[which], is_last)

    def backward(self, which: Unit, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self, which: Unit) -> torch.Tensor:
        """Clip (the norm is all-reduced over the shards), step unless the norm is not finite, zero grads."""
        optimizer = self.optimizers[which]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clips[which] or math.inf)
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()
        step_unless_nonfinite(optimizer, norm)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def loss_scale(self, which: Unit) -> float:
        return 1.0

    def parameter_shards(self, which: Unit) -> list[torch.Tensor]:
        """Resharded first: with reshard_after_forward=false a no-grad forward leaves the unit unsharded."""
        self._reshard(which)
        return [param.data.to_local() for param in self.unwrap(which).parameters()]

    def _reshard(self, which: Unit) -> None:
        for root in self.roots[which]:
            root.reshard()

    def write_parameter_shards(self, which: Unit, shards: list[torch.Tensor]) -> None:
        """Into the local shards, which the next forward all-gathers."""
        with torch.no_grad():
            for target, shard in zip(self.parameter_shards(which), shards, strict=True):
                target.copy_(shard)

    def full_from_shards(self, which: Unit, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collective (each tensor is all-gathered)."""
        self._reshard(which)
        full = {}
        for (name, param), shard in zip(self.units[which].named_parameters(), shards, strict=True):
            spread = DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape,
                                        stride=param.stride())  # fmt: skip
            full[name] = host_copy(spread.full_tensor().float())
        return full

    def shards_from_full(self, which: Unit, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        self._reshard(which)
        return [
            _slice_like(param, full[name]).to_local().float() for name, param in self.units[which].named_parameters()
        ]

    def full_state_dict(self, which: Unit) -> dict[str, torch.Tensor]:
        """A collective (each parameter is all-gathered)."""
        module = self.units[which]
        state = buffers_on_cpu(module)
        for name, param in module.named_parameters():
            state[name] = host_copy(_full(param).float())
        return state

    def full_shapes(self, which: Unit) -> dict[str, tuple[int, ...]]:
        module = self.units[which]
        return {name: tuple(t.shape) for name, t in [*module.named_buffers(), *module.named_parameters()]}

    def universal_state(self, which: Unit) -> dict[str, torch.Tensor]:
        """A collective (every rank must call it)."""
        optimizer = self.optimizers[which]
        return with_adam_moments(
            self.full_state_dict(which), self.units[which], optimizer, lambda p, key: _full(optimizer.state[p][key])
        )

    def load_universal_state(self, which: Unit, state: dict[str, torch.Tensor]) -> None:
        """Each rank keeps its slice of the full tensors (no communication: every rank read the same file)."""
        load_with_adam_moments(self.units[which], self.optimizers[which], state, _slice_like)

    def scaler_state(self) -> dict[str, dict]:
        return {u: {} for u in UNITS}

    def load_scaler_state(self, state: dict[str, dict]) -> None:
        pass  # no loss scaler: fp16 is refused

    def state_bytes(self, which: Unit) -> dict[str, int]:
        return {
            "params": local_bytes(self.units[which].parameters()),
            "optimizer": local_bytes(optimizer_tensors(self.optimizers[which])),
        }


@contextlib.contextmanager
def _gradient_sync(roots: list[FSDPModule], is_last: bool) -> Iterator[None]:
    """Gradients stay unsharded and local on non-final micro-batches, reduce-scattered on the last one."""
    for root in roots:
        root.set_requires_gradient_sync(is_last)
    try:
        yield
    finally:
        for root in roots:
            root.set_requires_gradient_sync(True)


def _settle_root(root: FSDPModule) -> None:
    """Run FSDP2's lazy initialization of `root` now, while every parameter requires grad. FSDP2 otherwise runs it
    at the root's first forward and fixes each group's gradient-reduction dtype from the parameters that require
    grad at that moment: the discriminators' first forward is the generator step, where they are frozen, and their
    bf16 gradients would then never be cast back to fp32. (No public API does this; `_lazy_init` is idempotent.)"""
    root._get_fsdp_state()._lazy_init()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _slice_like(param: DTensor, full: torch.Tensor) -> DTensor:
    """`full` laid out like `param` (this rank's slice; every rank holds `full`, so nothing is sent)."""
    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def _swap_parameters(
    optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], after: dict[str, nn.Parameter]
) -> torch.optim.Optimizer:
    """Point an optimizer built on the unsharded parameters at their sharded replacements (fully_shard registers
    new DTensor parameters under the same names)."""
    replacement = {id(before[name]): after[name] for name in before}
    for group in optimizer.param_groups:
        group["params"] = [replacement[id(p)] for p in group["params"]]
    return optimizer
