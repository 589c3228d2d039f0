"""U-Net generators: the source article's shallow U-Net (n_skip levels) and the reference's deep unet_128/unet_256."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import conv_bias, norm_layer, run_block


class _SameTransposedConv4(nn.Module):
    """Stride-1 4x4 transposed conv that keeps the spatial size (Keras padding='same' with an even kernel)."""

    def __init__(self, in_ch: int, out_ch: int, bias: bool):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_ch, out_ch, 4, stride=1, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[..., :-1, :-1]  # padding=1 gives H+1; drop the extra row and column


class ArticleUnetGenerator(nn.Module):
    """The article's U-Net: encoders Conv4x4 s2 -> norm -> LeakyReLU(0.2) with ngf*2^i filters (i < n_skip);
    decoders ConvTranspose4x4 (the first with stride 1) -> norm -> [Dropout] -> ReLU -> concat the matching
    encoder output; a stride-2 ConvTranspose4x4 to output_nc with tanh."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool, n_skip: int):
        super().__init__()
        bias = conv_bias(norm)
        self.encoders = nn.ModuleList()
        channels = input_nc
        for i in range(n_skip):
            out = ngf * 2**i
            self.encoders.append(
                nn.Sequential(
                    nn.Conv2d(channels, out, 4, stride=2, padding=1, bias=bias),
                    norm_layer(norm, out),
                    nn.LeakyReLU(0.2, True),
                )
            )
            channels = out
        self.decoders = nn.ModuleList()
        for i in range(n_skip):
            out = ngf * 2 ** (n_skip - i - 1)
            upsample = (
                _SameTransposedConv4(channels, out, bias)
                if i == 0
                else nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1, bias=bias)
            )
            layers = [upsample, norm_layer(norm, out)] + ([nn.Dropout(0.5)] if use_dropout else []) + [nn.ReLU(True)]
            self.decoders.append(nn.Sequential(*layers))
            channels = 2 * out  # concatenated with encoder n_skip-1-i, which also has `out` channels
        self.head = nn.Sequential(nn.ConvTranspose2d(channels, output_nc, 4, stride=2, padding=1), nn.Tanh())
        self.checkpointed = False  # recompute each encoder and decoder in the backward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        skips = []
        for encoder in self.encoders:
            x = run_block(encoder, x, self.checkpointed)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = torch.cat([run_block(decoder, x, self.checkpointed), skip], dim=1)
        return self.head(x)

    def set_activation_checkpointing(self, enabled: bool) -> int:
        """Recompute each encoder and decoder stage in the backward pass (or stop); returns the number of stages.
        Only the stages' inputs (the skips and the concatenations) are kept; the output head is not recomputed."""
        self.checkpointed = enabled
        return len(self.encoders) + len(self.decoders)


class _UnetLevel(nn.Module):
    """One level of the deep U-Net: down -> inner levels -> up, concatenated with the level's input."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        norm: str,
        inner: nn.Module | None,
        use_dropout: bool,
        input_nc: int | None = None,
        outermost: bool = False,
    ):
        super().__init__()
        bias = conv_bias(norm)
        self.outermost = outermost
        down_conv = nn.Conv2d(input_nc or outer_nc, inner_nc, 4, stride=2, padding=1, bias=bias)
        up_in = inner_nc if inner is None else inner_nc * 2
        if outermost:
            down = [down_conv]
            up = [nn.ReLU(True), nn.ConvTranspose2d(up_in, outer_nc, 4, stride=2, padding=1), nn.Tanh()]
        elif inner is None:
            down = [nn.LeakyReLU(0.2, True), down_conv]
            up = [
                nn.ReLU(True),
                nn.ConvTranspose2d(up_in, outer_nc, 4, stride=2, padding=1, bias=bias),
                norm_layer(norm, outer_nc),
            ]
        else:
            down = [nn.LeakyReLU(0.2, True), down_conv, norm_layer(norm, inner_nc)]
            up = [
                nn.ReLU(True),
                nn.ConvTranspose2d(up_in, outer_nc, 4, stride=2, padding=1, bias=bias),
                norm_layer(norm, outer_nc),
            ] + ([nn.Dropout(0.5)] if use_dropout else [])
        self.model = nn.Sequential(*down, *([inner] if inner is not None else []), *up)
        self.checkpointed = False  # recompute this level (and those inside it) in the backward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # model[0] is an in-place LeakyReLU: it also rewrites x, so the skip half of the output carries the
        # activation (as in the reference). It runs outside the checkpoint, whose input must stay unchanged.
        x = self.model[0](x)
        return run_block(self, x, self.checkpointed, self._activated_forward)

    def _activated_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in list(self.model)[1:]:
            h = layer(h)
        return torch.cat([x, h], dim=1)


class DeepUnetGenerator(nn.Module):
    """The reference's U-Net with `num_downs` halvings down to 1x1 at the bottleneck (7 for 128 px, 8 for 256 px)."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool, num_downs: int):
        super().__init__()
        level = _UnetLevel(ngf * 8, ngf * 8, norm, None, use_dropout)
        for _ in range(num_downs - 5):
            level = _UnetLevel(ngf * 8, ngf * 8, norm, level, use_dropout)
        for mult in (4, 2, 1):
            level = _UnetLevel(ngf * mult, ngf * mult * 2, norm, level, False)
        self.net = _UnetLevel(output_nc, ngf, norm, level, False, input_nc=input_nc, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_nc, H, W]
        return self.net(x)

    def set_activation_checkpointing(self, enabled: bool) -> int:
        """Recompute the level directly below the outermost in the backward pass (or stop); returns 1.

        The levels nest, so checkpointing each of them would recompute a level once per enclosing checkpoint, and
        the upper levels cost the same FLOPs each (half the resolution, twice the channels): about three forwards
        more instead of one. One checkpoint below the outermost level keeps only its input and the outermost
        layers' activations, and the net is recomputed once. Measured for two calls at 256 px, ngf 64: 37% of the
        saved bytes (26 of 71 MiB); checkpointing the next level down instead keeps 71%, adding it to this one
        saves nothing more.
        """
        levels = [m for m in self.modules() if isinstance(m, _UnetLevel)]  # outermost first
        levels[1].checkpointed = enabled
        return 1
