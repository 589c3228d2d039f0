"""ResNet generator of the CycleGAN paper (Johnson et al. style): c7s1-ngf, two stride-2 downsamplings,
residual blocks, two transposed-conv upsamplings, c7s1-3 with tanh. 9 blocks for 256 px, 6 for 128 px."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import conv_bias, decoder_back, encoder_front, norm_layer, run_block


class ResnetBlock(nn.Module):
    """x + conv3x3(norm, relu, [dropout], conv3x3, norm)(x) with reflection padding."""

    def __init__(self, channels: int, norm: str, use_dropout: bool):
        super().__init__()
        bias = conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            norm_layer(norm, channels),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), norm_layer(norm, channels)]
        self.block = nn.Sequential(*layers)
        self.checkpointed = False  # recompute self.block in the backward pass (train.activation_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + run_block(self.block, x, self.checkpointed)


class ResnetGenerator(nn.Module):
    """Image-to-image ResNet; the output is in [-1, 1]."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool, n_blocks: int):
        super().__init__()
        blocks = [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
        self.net = nn.Sequential(*encoder_front(input_nc, ngf, norm), *blocks, *decoder_back(ngf, output_nc, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        return self.net(x)

    def features(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """The outputs of the stack's layers `layers` (indices into self.net) for input x, in that order; runs the
        stack only as far as the deepest of them (CUT's PatchNCE reads the encoder this way)."""
        wanted, found = set(layers), {}
        for index, layer in enumerate(self.net[: max(layers) + 1]):
            x = layer(x)
            if index in wanted:  # a copy where the next layer works in place (ReLU(inplace) after a norm)
                following = self.net[index + 1] if index + 1 < len(self.net) else None
                found[index] = x.clone() if getattr(following, "inplace", False) else x
        return [found[index] for index in layers]

    def feature_widths(self, layers: list[int]) -> list[int]:
        """The channels of each layer's output in `features`, read from the layers' shapes (no forward)."""
        widths, channels = [], self.net[1].in_channels
        for layer in self.net:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                channels = layer.out_channels
            widths.append(channels)
        return [widths[index] for index in layers]

    def set_activation_checkpointing(self, enabled: bool) -> int:
        """Recompute each residual block in the backward pass (or stop); returns the number of blocks. The blocks
        (1/4 resolution, ngf*4 channels) hold about half of the activations; the full-resolution stem and head keep
        theirs."""
        blocks = [m for m in self.net if isinstance(m, ResnetBlock)]
        for block in blocks:
            block.checkpointed = enabled
        return len(blocks)
