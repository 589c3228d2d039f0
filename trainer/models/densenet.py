"""DenseNet-style generator: the ResNet generator's encoder and decoder around dense blocks (Huang et al.) in the
bottleneck. Each dense block stacks layers whose inputs are all earlier outputs, then a 1x1 transition restores
the width."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import conv_bias, decoder_back, encoder_front, norm_layer

LAYERS_PER_BLOCK = 4


class DenseBlock(nn.Module):
    """LAYERS_PER_BLOCK x (norm -> ReLU -> conv3x3 adding `growth` channels), then a 1x1 transition back to
    `channels`, added to the block input."""

    def __init__(self, channels: int, growth: int, norm: str):
        super().__init__()
        bias = conv_bias(norm)
        self.layers = nn.ModuleList(
            nn.Sequential(
                norm_layer(norm, channels + i * growth),
                nn.ReLU(True),
                nn.ReflectionPad2d(1),
                nn.Conv2d(channels + i * growth, growth, 3, bias=bias),
            )
            for i in range(LAYERS_PER_BLOCK)
        )
        width = channels + LAYERS_PER_BLOCK * growth
        self.transition = nn.Sequential(norm_layer(norm, width), nn.ReLU(True), nn.Conv2d(width, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return x + self.transition(torch.cat(features, dim=1))


class DenseNetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 downsamplings, n_blocks dense blocks (growth ngf), two upsamplings, c7s1 + tanh."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int, norm: str, n_blocks: int):
        super().__init__()
        blocks = [DenseBlock(ngf * 4, ngf, norm) for _ in range(n_blocks)]
        self.net = nn.Sequential(*encoder_front(input_nc, ngf, norm), *blocks, *decoder_back(ngf, output_nc, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        return self.net(x)
