"""Generators and discriminators, built from `ModelConfig` through one registry.

Every network here is plain PyTorch: no accelerate, deepspeed or wandb.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from trainer.config.model import ModelConfig
from trainer.models.densenet import DenseNetGenerator
from trainer.models.encoder_decoder import EncoderDecoderGenerator
from trainer.models.layers import init_weights
from trainer.models.patchgan import PatchDiscriminator, PixelDiscriminator, patchgan_stages
from trainer.models.resnet import ResnetGenerator
from trainer.models.unet import ArticleUnetGenerator, DeepUnetGenerator

GeneratorBuilder = Callable[[ModelConfig, int, int], nn.Module]

GENERATORS: dict[str, GeneratorBuilder] = {
    "resnet_9blocks": lambda c, i, o: ResnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, c.n_blocks),
    "resnet_6blocks": lambda c, i, o: ResnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, c.n_blocks),
    "resnet": lambda c, i, o: ResnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, c.n_blocks),
    "unet_article": lambda c, i, o: ArticleUnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, c.n_skip),
    "unet_128": lambda c, i, o: DeepUnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, num_downs=7),
    "unet_256": lambda c, i, o: DeepUnetGenerator(i, o, c.ngf, c.norm_g, c.use_dropout, num_downs=8),
    "encoder_decoder": lambda c, i, o: EncoderDecoderGenerator(i, o, c.ngf, c.norm_g, c.use_dropout),
    "densenet": lambda c, i, o: DenseNetGenerator(i, o, c.ngf, c.norm_g, c.n_blocks),
}

CHECKPOINTABLE = (ResnetGenerator, ArticleUnetGenerator, DeepUnetGenerator)


def build_generator(cfg: ModelConfig, source: str = "x", target: str = "y") -> nn.Module:
    """One initialized generator from domain `source` to `target`: the source's image channels plus the extras in,
    the target's image channels out, in [-1, 1]."""
    net = GENERATORS[cfg.generator](cfg, *cfg.generator_channels(source, target))
    init_weights(net, cfg.init, cfg.init_gain)
    return net


def set_activation_checkpointing(net: nn.Module, enabled: bool) -> int:
    """Make a generator recompute its blocks' activations in the backward pass instead of keeping them (or stop).
    Only a flag read in `forward` changes: parameter and buffer names stay as they are, and forwards without
    autograd (no_grad, evaluation) run as before. Set it before torch.compile, which guards on it.

    Returns:
        The number of blocks switched (ResNet: residual blocks; article U-Net: encoder and decoder stages; deep
        U-Net: the one level below the outermost, see `DeepUnetGenerator.set_activation_checkpointing`).

    Raises:
        ValueError: `net` is not a generator with blocks to recompute.
    """
    if not isinstance(net, CHECKPOINTABLE):
        names = ", ".join(c.__name__ for c in CHECKPOINTABLE)
        raise ValueError(f"activation checkpointing is not available for {type(net).__name__}; expected one of {names}")
    return net.set_activation_checkpointing(enabled)


def build_discriminator(cfg: ModelConfig, domain: str = "y") -> nn.Module:
    """One initialized PatchGAN or pixel discriminator of `domain`'s images (for hnet see `build_hnet`)."""
    channels = cfg.channels(domain)
    if cfg.discriminator == "patchgan":
        net: nn.Module = PatchDiscriminator(channels, cfg.ndf, cfg.n_layers_d, cfg.norm_d)
    elif cfg.discriminator == "pixel":
        net = PixelDiscriminator(channels, cfg.ndf, cfg.norm_d)
    else:
        raise ValueError(f"model.discriminator={cfg.discriminator!r} is built by build_hnet")
    init_weights(net, cfg.init, cfg.init_gain)
    return net


def build_hnet(cfg: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The article's improved variant: a shared PatchGAN trunk H and two heads, so D_X = H'_X(H(.)) and
    D_Y = H'_Y(H(.)), for domains of one channel count (the Config refuses others). Returns (trunk, head_x,
    head_y), each initialized."""
    split, channels = cfg.hnet_trunk_layers, cfg.channels("x")
    trunk = nn.Sequential(*patchgan_stages(channels, cfg.ndf, cfg.n_layers_d, cfg.norm_d)[:split])
    head_x = nn.Sequential(*patchgan_stages(channels, cfg.ndf, cfg.n_layers_d, cfg.norm_d)[split:])
    head_y = nn.Sequential(*patchgan_stages(channels, cfg.ndf, cfg.n_layers_d, cfg.norm_d)[split:])
    for net in (trunk, head_x, head_y):
        init_weights(net, cfg.init, cfg.init_gain)
    return trunk, head_x, head_y
