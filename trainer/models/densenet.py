"""DenseNet-style generator: the ResNet generator's encoder and decoder around dense blocks (Huang et al.) in the
bottleneck. Each dense block stacks layers whose inputs are all earlier outputs, then a 1x1 transition restores
the width."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import conv_bias, norm_layer

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
        bias = conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                norm_layer(norm, ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [DenseBlock(ngf * 4, ngf, norm) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                norm_layer(norm, ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        return self.net(x)
