"""A generator run over an image in overlapping tiles, so that its activations are bounded by the tile's size and
not the image's (a satellite scene or a slide scan of 8000 x 8000 pixels).

The image is cut into cores that partition it; each tile is its core with `halo` pixels of context on every side
(clipped at the image's border). Instance norm normalizes with statistics of the whole image, as the untiled
generator does: each norm layer's mean and variance are gathered over every tile's core (each pixel counted once),
one pass per norm layer from the first to the last, later passes normalizing with the statistics found before.
The last pass translates every tile; outputs are blended across a band an eighth of the halo deep on each side of
a core boundary (raised cosine) and written out in bands of rows, so the only image-sized arrays are the input and
output pixels. Where 7/8 of the halo covers the generator's receptive field, the result is the untiled one up to
float rounding; with a smaller halo it differs most near core boundaries, and a little everywhere (the statistics
are gathered from activations that lacked context). Receptive-field radii: resnet 10 + 8 x blocks (82 px for
resnet_9blocks), densenet 58, unet_article 15, encoder_decoder 31; the deep U-Nets see the whole image.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TileInput = Callable[[int, int, int, int], torch.Tensor]
"""(top, left, height, width) -> the generator's input [1, C, height, width] for that window of the image."""


@dataclass(frozen=True)
class Tile:
    """One tile: its core (the pixels it is responsible for) and its window (the core with its context)."""

    core: tuple[int, int, int, int]  # top, left, bottom, right
    window: tuple[int, int, int, int]


def tile_rows(height: int, width: int, tile: int, halo: int) -> list[list[Tile]]:
    """The tiles of an image, row by row: cores of side tile - 2 * halo from the top left, windows clipped at the
    border."""
    core = tile - 2 * halo
    rows = []
    for top in range(0, height, core):
        row = []
        for left in range(0, width, core):
            bottom, right = min(top + core, height), min(left + core, width)
            window = (max(top - halo, 0), max(left - halo, 0), min(bottom + halo, height), min(right + halo, width))
            row.append(Tile((top, left, bottom, right), window))
        rows.append(row)
    return rows


class _Stop(Exception):
    """Ends a statistics pass's forward at the layer being measured."""


class NormStatistics:
    """Whole-image statistics of a generator's instance-norm layers, replacing their per-tile ones."""

    def __init__(self, net: nn.Module) -> None:
        # registration order is the forward's order in every generator here (tests/unit/test_tiling.py)
        self.layers = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
        self.mean: dict[nn.Module, torch.Tensor] = {}
        self.var: dict[nn.Module, torch.Tensor] = {}
        self.measuring: nn.Module | None = None
        self.sums: list[torch.Tensor] = []
        self.count = 0
        self.core: tuple[int, int, int, int] = (0, 0, 0, 0)  # of the tile running, relative to its window
        self.window_width = 1  # of the tile running, in input pixels

    def forward(self, layer: nn.InstanceNorm2d, x: torch.Tensor) -> torch.Tensor:
        """What `layer` computes while tiling: with known statistics the whole image's normalization; the layer
        being measured adds its input's core to the sums and stops the pass; the others as they are."""
        if layer is self.measuring:
            scale = x.shape[-1] / self.window_width
            top, left, bottom, right = (round(v * scale) for v in self.core)
            core = x[:, :, top:bottom, left:right].double()
            sums = [core.sum(dim=(0, 2, 3)), core.square().sum(dim=(0, 2, 3))]
            self.sums = [a + b for a, b in zip(self.sums, sums)] if self.sums else sums
            self.count += core.shape[0] * core.shape[2] * core.shape[3]
            raise _Stop
        if layer not in self.mean:
            return F.instance_norm(x, None, None, layer.weight, layer.bias, eps=layer.eps)
        mean, var = self.mean[layer].to(x.dtype), self.var[layer].to(x.dtype)
        out = (x - mean[None, :, None, None]) * torch.rsqrt(var + layer.eps)[None, :, None, None]
        if layer.affine:
            out = out * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
        return out

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The norm layers compute `forward` for the block, then what they computed before."""
        for layer in self.layers:
            layer.forward = lambda x, layer=layer: self.forward(layer, x)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward  # the class's own again

    def finish(self, layer: nn.Module) -> None:
        """Turn the sums gathered for `layer` into its mean and (biased, as instance norm's) variance."""
        mean = self.sums[0] / self.count
        self.mean[layer] = mean.float()
        self.var[layer] = (self.sums[1] / self.count - mean.square()).clamp(min=0).float()
        self.measuring, self.sums, self.count = None, [], 0


def ramp(start: int, core_start: int, core_end: int, end: int) -> torch.Tensor:
    """One axis of a tile's blending weight over its window [start, end) with its core [core_start, core_end): 1
    on the core, 0 on the context, crossing over (raised cosine) in a band a quarter of the context wide centred on
    each core edge that has context beyond it, where the neighbour's weight is the complement."""
    position = torch.arange(start, end) + 0.5
    weight = torch.ones(end - start)
    for context, outside in ((core_start - start, core_start - position), (end - core_end, position - core_end)):
        if context:
            half = max(context / 8, 0.5)
            weight *= torch.cos(((outside + half) / (2 * half)).clamp(0, 1) * math.pi / 2) ** 2
    return weight.clamp(min=1e-12)  # every pixel is some tile's core: the floor only keeps the division defined


def translate_tiled(
    net: nn.Module,
    tile_input: TileInput,
    size: tuple[int, int],
    out: np.ndarray,
    to_pixels: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    halo: int,
) -> None:
    """Translate an image of `size` (height, width) tile by tile into `out` [H, W, C] (integer pixels, from
    `to_pixels` of each finished band of the output in [-1, 1]). `tile` and `halo` must be multiples of the
    generator's input multiple, with tile > 2 * halo."""
    rows = tile_rows(*size, tile, halo)
    stats = gather_statistics(net, tile_input, rows)
    with torch.no_grad(), stats.installed():
        _blend_rows(net, stats, tile_input, rows, size, out, to_pixels)


def gather_statistics(net: nn.Module, tile_input: TileInput, rows: list[list[Tile]]) -> NormStatistics:
    """The whole image's statistics of every instance-norm layer of `net`, one pass over the tiles per layer."""
    stats = NormStatistics(net)
    with torch.no_grad(), stats.installed():
        for layer in stats.layers:  # in the order of the forward: each pass normalizes with the ones found before
            stats.measuring = layer
            for tile in (t for row in rows for t in row):
                _run(net, stats, tile_input, tile)
            stats.finish(layer)
    return stats


def _run(net: nn.Module, stats: NormStatistics, tile_input: TileInput, tile: Tile) -> torch.Tensor | None:
    """The generator's output on one tile's window (None when a statistics pass stopped it)."""
    top, left, bottom, right = tile.window
    stats.window_width = right - left
    core = tile.core
    stats.core = (core[0] - top, core[1] - left, core[2] - top, core[3] - left)
    try:
        return net(tile_input(top, left, bottom - top, right - left))[0].float()
    except _Stop:
        return None


def _blend_rows(
    net: nn.Module,
    stats: NormStatistics,
    tile_input: TileInput,
    rows: list[list[Tile]],
    size: tuple[int, int],
    out: np.ndarray,
    to_pixels: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """The last pass: each row of tiles blended into a band of rows, written out once no later tile reaches it."""
    height, width = size
    band_top, band, weights = 0, None, None
    for index, row in enumerate(rows):
        row_bottom = row[0].window[2]
        for tile in row:
            output = _run(net, stats, tile_input, tile)
            top, left, bottom, right = tile.window
            if band is None:
                band, weights = torch.zeros(output.shape[0], 0, width), torch.zeros(0, width)
            grow = row_bottom - band_top - band.shape[1]
            if grow > 0:
                band = torch.cat([band, torch.zeros(band.shape[0], grow, width)], dim=1)
                weights = torch.cat([weights, torch.zeros(grow, width)])
            weight = ramp(top, tile.core[0], tile.core[2], bottom)[:, None]
            weight = weight * ramp(left, tile.core[1], tile.core[3], right)
            band[:, top - band_top : bottom - band_top, left:right] += output * weight
            weights[top - band_top : bottom - band_top, left:right] += weight
        done = rows[index + 1][0].window[0] if index + 1 < len(rows) else height
        finished = done - band_top
        out[band_top:done] = to_pixels(band[:, :finished] / weights[:finished]).permute(1, 2, 0).numpy()
        band, weights, band_top = band[:, finished:], weights[finished:], done
