"""Generator EMA: an exponential moving average of the generators' weights (StyleGAN2-ADA's rule), used instead of
the raw weights for evaluation, sample grids and the export when ema.enabled.

Each rank averages the part of the generator parameters it holds (`Backend.parameter_shards`): whole parameters
under DDP and ZeRO-1/2, equal on every rank, so the averages are equal too without any communication; this
rank's shards under ZeRO-3 and FSDP2, so the average is sharded like the generators. The average takes the place
of the live weights only inside `swapped_in` (evaluation, sample grids), written through the backend because
ZeRO-3's forward reads gathered copies that small parameters keep between forwards. A checkpoint or an export
gathers it into full tensors with the backend's `full_from_shards`, and loading takes this rank's part with
`shards_from_full` (the engine does both). Under DeepSpeed with bf16 the forward's weights are bf16 copies of
fp32 masters: the average is kept in fp32 but follows those copies.

The rule: after each generator update of B images (the global batch) with I images seen so far,
h = min(half_life_images, rampup x I) (just half_life_images when rampup is 0), beta = 0.5 ** (B / h), and
average = beta x average + (1 - beta) x weights.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator

import torch

from trainer.config.sections import EMAConfig


def ema_beta(cfg: EMAConfig, images_seen: int, batch_images: int) -> float:
    """The weight of the old average after an update of `batch_images` that brought the images seen to
    `images_seen`."""
    half_life = float(cfg.half_life_images)
    if cfg.rampup > 0:
        half_life = min(half_life, images_seen * cfg.rampup)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


class GeneratorEMA:
    """The moving average of `tensors` (this rank's part of the generator parameters), kept in fp32."""

    def __init__(self, cfg: EMAConfig, tensors: list[torch.Tensor]) -> None:
        self.cfg = cfg
        self.average = [tensor.detach().float().clone() for tensor in tensors]

    def update(self, tensors: list[torch.Tensor], images_seen: int, batch_images: int) -> None:
        """Move the average towards `tensors` after a generator update (see the module docstring)."""
        weight = 1.0 - ema_beta(self.cfg, images_seen, batch_images)
        with torch.no_grad():
            for average, tensor in zip(self.average, tensors, strict=True):
                average.lerp_(tensor.detach().float(), weight)

    def take(self, tensors: list[torch.Tensor]) -> None:
        """Set the average to `tensors` (after loading a saved average through the backend)."""
        with torch.no_grad():
            for average, tensor in zip(self.average, tensors, strict=True):
                average.copy_(tensor.detach().float())

    @contextlib.contextmanager
    def swapped_in(
        self, tensors: list[torch.Tensor], write: Callable[[list[torch.Tensor]], None] | None = None
    ) -> Iterator[None]:
        """The average as the weights for the block, the weights `tensors` restored after it. `write` makes the
        model use tensors laid out like `tensors` (Backend.write_parameter_shards); by default they are copied
        into `tensors`."""
        write = write or partial(_copy_into, tensors)
        raw = [tensor.detach().clone() for tensor in tensors]
        write(self.average)
        try:
            yield
        finally:
            write(raw)


def _copy_into(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for target, value in zip(targets, values, strict=True):
            target.copy_(value)
