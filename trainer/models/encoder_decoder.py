"""Encoder-decoder generator without skip connections: four stride-2 conv levels down, four transposed-conv
levels up (the U-Net's shape with the skips removed, the baseline of the pix2pix paper)."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import conv_bias, norm_layer

DEPTH = 4


class EncoderDecoderGenerator(nn.Module):
    """Conv4x4 s2 down to H/16 with ngf..8*ngf filters, then ConvTranspose4x4 s2 back up; output in [-1, 1]."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool):
        super().__init__()
        bias = conv_bias(norm)
        widths = [ngf * 2**i for i in range(DEPTH)]
        layers: list[nn.Module] = [nn.Conv2d(input_nc, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [
                nn.Conv2d(w_in, w_out, 4, stride=2, padding=1, bias=bias),
                norm_layer(norm, w_out),
                nn.LeakyReLU(0.2, True),
            ]
        for w_in, w_out in zip(widths[::-1], widths[::-1][1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1, bias=bias), norm_layer(norm, w_out)]
            layers += ([nn.Dropout(0.5)] if use_dropout else []) + [nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[0], output_nc, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        return self.net(x)
