"""Bounds on the architecture read from files that are not the user's own (an export's model.json, a checkpoint's
train_state.json): a model is refused, in one line, before anything is built from it when a field is over its cap
or when the units training would build hold more than MAX_PARAMETERS parameters (counted on the meta device, so
nothing is allocated)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.algorithms.cut import PatchHead
from trainer.config.checks import ConfigError
from trainer.config.load import from_dict
from trainer.config.model import CONTRASTIVE_FAMILIES, ModelConfig
from trainer.models import GENERATORS
from trainer.models.patchgan import PatchDiscriminator, PixelDiscriminator, patchgan_stages

MAX_PARAMETERS = 2**30
"""Parameters and buffers of all training units together (4 GiB in fp32; the default CycleGAN has 28 M)."""
MAX_IMAGE_SIZE = 8192
"""Side of the images a model translates (the training resolution)."""
FIELD_LIMITS = {"ngf": 4096, "ndf": 4096, "n_layers_d": 16, "n_blocks": 100, "input_nc": 1024, "x_channels": 64,
                "y_channels": 64,
                "nce_patches": 1 << 16, "nce_mlp_channels": 4096}  # fmt: skip
"""Caps of the numeric model fields whose other bounds ModelConfig does not set; they keep the count cheap."""


def check_model_bounds(model: ModelConfig | dict[str, Any], source: str, image_size: int | None = None) -> ModelConfig:
    """The model (a dict is read as ModelConfig) when every field is within its cap, `image_size` (if given) is
    an integer in [1, MAX_IMAGE_SIZE] that the generator accepts, and its units hold at most MAX_PARAMETERS.

    Raises:
        ConfigError: one line naming `source` (the file the model was read from) and the field.
    """
    try:
        model = from_dict(ModelConfig, model, "model.") if isinstance(model, dict) else model
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    for name, cap in FIELD_LIMITS.items():
        value = getattr(model, name)
        if value is not None and not 1 <= value <= cap:
            raise ConfigError(f"{source}: model.{name}={value} is out of bounds; expected an integer in [1, {cap}]")
    if image_size is not None:
        multiple = model.min_image_multiple()
        if not (1 <= image_size <= MAX_IMAGE_SIZE and image_size % multiple == 0):
            raise ConfigError(
                f"{source}: image_size={image_size} is out of bounds; expected a multiple of {multiple} in "
                f"[1, {MAX_IMAGE_SIZE}] for generator={model.generator}"
            )
    count = unit_parameters(model)
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"{source}: the model (generator={model.generator}, ngf={model.ngf}, ndf={model.ndf}) has {count:,} "
            f"parameters, over the limit of {MAX_PARAMETERS:,}"
        )
    return model


def unit_parameters(model: ModelConfig) -> int:
    """Parameters and buffers of the units training builds for `model` (its family's build_units), built on the
    meta device, so nothing is allocated, and not initialized (initializing meta
    tensors imports torch._dynamo, seconds of start-up)."""
    copies = 1 if model.family in CONTRASTIVE_FAMILIES else 2  # CUT: one generator (with a head), one discriminator
    directions = [("x", "y"), ("y", "x")][:copies]
    with torch.device("meta"):
        nets = [GENERATORS[model.generator](model, *model.generator_channels(*d)) for d in directions]
        if copies == 1:
            nets.append(PatchHead(nets[0].feature_widths(model.nce_layers), model.nce_mlp_channels))
        domains = [model.channels(target) for _, target in directions]
        if model.discriminator == "hnet":  # a shared trunk and a head per domain
            stages = patchgan_stages(domains[0], model.ndf, model.n_layers_d, model.norm_d)
            nets += stages + stages[model.hnet_trunk_layers :]
        elif model.discriminator == "pixel":
            nets += [PixelDiscriminator(c, model.ndf, model.norm_d) for c in domains]
        else:
            nets += [PatchDiscriminator(c, model.ndf, model.n_layers_d, model.norm_d) for c in domains]
    return sum(t.numel() for net in nets for t in (*net.parameters(), *net.buffers()))
