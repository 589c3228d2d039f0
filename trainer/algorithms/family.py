"""The model-family interface (`Family`) and its lookup by model.family: what the training step and evaluation
need from a family. A family is a module of three functions; cyclegan and cut (CUT and FastCUT) are the two."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from trainer.algorithms import cut, cyclegan
from trainer.algorithms.shared import Tensors
from trainer.config.model import CONTRASTIVE_FAMILIES, LossConfig, ModelConfig


class Family(Protocol):
    """The step functions return losses and detached stats and never call backward() or step(): the engine does.
    Each unit's forward does all of that unit's work for its step, so a distributed wrapper sees one forward per
    backward."""

    def build_units(
        self, model_cfg: ModelConfig, loss_cfg: LossConfig, fuse_passes: bool = False
    ) -> tuple[nn.Module, nn.Module]:
        """The generator unit and the discriminator unit, initialised from the global torch RNG."""
        ...

    def generator_step(
        self,
        gens: nn.Module,
        discs: nn.Module,
        real_x: torch.Tensor,
        real_y: torch.Tensor,
        cfg: LossConfig,
        extra_x: torch.Tensor | None = None,
        extra_y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Tensors, dict]:
        """(loss, stats, outputs) of the generator unit against the plain, frozen discriminator unit `discs`;
        outputs holds fake_y (and fake_x, rec_x, rec_y where the family has them)."""
        ...

    def discriminator_step(
        self,
        discs: nn.Module,
        real_x: torch.Tensor,
        real_y: torch.Tensor,
        fake_x: torch.Tensor | None,
        fake_y: torch.Tensor,
        cfg: LossConfig,
    ) -> tuple[torch.Tensor, Tensors]:
        """(loss, stats) of the discriminator unit on real images vs the pooled, detached fakes."""
        ...


def family(name: str) -> Family:
    """The family of model.family: cut for CUT and FastCUT, cyclegan otherwise."""
    return cut if name in CONTRASTIVE_FAMILIES else cyclegan
