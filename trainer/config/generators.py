"""Each generator's facts, which the config checks at load time (before torch is imported): the multiple its
input side must be, its residual-block count (fixed by the name, or the default), whether
train.activation_checkpointing can recompute its blocks, and how many layers PatchNCE can read. models/ builds
each generator from its entry in `trainer.models.GENERATORS`; a test checks that the two tables name the same
generators and agree on what can be checkpointed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from trainer.config.model import ModelConfig

RESNET_STEM_LAYERS = 10
"""Layers of the ResNet generator before its first residual block (stem conv and two downsamplings)."""


@dataclass(frozen=True)
class GeneratorFacts:
    multiple: Callable[[ModelConfig], int]
    """The spatial size of its input must be a multiple of this."""
    checkpointable: bool = False
    """train.activation_checkpointing can recompute its blocks."""
    fixed_blocks: int | None = None
    """model.n_blocks this name fixes (resnet_6blocks, resnet_9blocks)."""
    default_blocks: int = 9
    """model.n_blocks when unset (residual blocks of a ResNet, dense blocks of the DenseNet)."""
    feature_layers: Callable[[ModelConfig], int] | None = None
    """Layers of the flat stack PatchNCE reads (CUT/FastCUT); None: no such stack."""


def _resnet(fixed_blocks: int | None = None) -> GeneratorFacts:
    return GeneratorFacts(
        multiple=lambda m: 4,
        checkpointable=True,
        fixed_blocks=fixed_blocks,
        default_blocks=fixed_blocks or 9,
        feature_layers=lambda m: RESNET_STEM_LAYERS + m.n_blocks,
    )


GENERATOR_FACTS: dict[str, GeneratorFacts] = {
    "resnet_9blocks": _resnet(9),
    "resnet_6blocks": _resnet(6),
    "resnet": _resnet(),
    "unet_article": GeneratorFacts(multiple=lambda m: 2**m.n_skip, checkpointable=True),
    "unet_128": GeneratorFacts(multiple=lambda m: 2**7, checkpointable=True),
    "unet_256": GeneratorFacts(multiple=lambda m: 2**8, checkpointable=True),
    "encoder_decoder": GeneratorFacts(multiple=lambda m: 16),
    "densenet": GeneratorFacts(multiple=lambda m: 4, default_blocks=3),
}


def generators_where(fact: Callable[[GeneratorFacts], object]) -> tuple[str, ...]:
    """The names of the generators for which `fact` holds, in table order (for messages)."""
    return tuple(name for name, facts in GENERATOR_FACTS.items() if fact(facts))
