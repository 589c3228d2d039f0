"""Discriminators: the PatchGAN (70x70 for n_layers=3, as in the paper and the article) and the 1x1 pixel GAN.
The PatchGAN is built as a list of stages so the H/H' variant can split it into a shared trunk and heads."""

from __future__ import annotations

import torch.nn as nn

from trainer.models.layers import conv_bias, norm_layer


def patchgan_stages(input_nc: int, ndf: int, n_layers: int, norm: str) -> list[nn.Module]:
    """The PatchGAN as n_layers + 2 stages: Conv4x4 s2 -> LeakyReLU; (n_layers - 1) x Conv4x4 s2 -> norm ->
    LeakyReLU; Conv4x4 s1 -> norm -> LeakyReLU; Conv4x4 s1 to one channel of real/fake scores per patch."""
    bias = conv_bias(norm)
    stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True))]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        stages.append(
            nn.Sequential(
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                norm_layer(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            )
        )
    stages.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
    return stages


class PatchDiscriminator(nn.Sequential):
    """PatchGAN: maps [N, C, H, W] images to [N, 1, h, w] patch scores (logits)."""

    def __init__(self, input_nc: int, ndf: int, n_layers: int, norm: str):
        super().__init__(*patchgan_stages(input_nc, ndf, n_layers, norm))


class PixelDiscriminator(nn.Sequential):
    """1x1 PatchGAN: a score per pixel from 1x1 convolutions."""

    def __init__(self, input_nc: int, ndf: int, norm: str):
        bias = conv_bias(norm)
        super().__init__(
            nn.Conv2d(input_nc, ndf, 1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=bias),
            norm_layer(norm, ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 1, bias=bias),
        )
