"""Sample images tiled into one picture: the sample grids and the loss-spike captures."""

from __future__ import annotations

import numpy as np
import torch


def image_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """Tile images [3, H, W] in [-1, 1] into one uint8 array [rows*H, cols*W, 3]."""
    tiles = [torch.cat([img.detach().float().cpu() for img in row], dim=2) for row in rows]
    grid = torch.cat(tiles, dim=1).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return grid.permute(1, 2, 0).numpy()
