"""Sample images tiled into one picture: the sample grids and the loss-spike captures."""

from __future__ import annotations

import numpy as np
import torch


def display_channels(image: torch.Tensor) -> torch.Tensor:
    """An image [C, H, W] as three channels to look at: RGB as it is, RGBA without alpha, anything else as grey
    from its first channel."""
    if image.shape[0] in (3, 4):
        return image[:3]
    return image[:1].expand(3, -1, -1)


def image_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """Tile images [C, H, W] in [-1, 1] (any channel count and bit depth: see `display_channels`; the range is
    the same for every depth) into one uint8 RGB array [rows*H, cols*W, 3]."""
    tiles = [torch.cat([display_channels(img.detach().float().cpu()) for img in row], dim=2) for row in rows]
    grid = torch.cat(tiles, dim=1).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return grid.permute(1, 2, 0).numpy()
