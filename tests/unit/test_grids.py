"""Sample grids of any image format: grey as grey, RGBA without alpha, other band counts as grey from the first,
every depth from the same [-1, 1] range; FID/KID's Inception input takes grey as RGB."""

from __future__ import annotations

import torch

from tests.conftest import write_tiny_inception
from trainer.eval.evaluator import load_inception
from trainer.observe.grids import image_grid


def test_a_grid_mixes_channel_counts_as_rgb_to_look_at():
    grey = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    rgba = torch.stack([torch.full((4, 4), v) for v in (-1.0, 0.0, 1.0, 0.5)])
    bands = torch.cat([grey, torch.ones(4, 4, 4)])  # 5 bands: the first shown as grey
    grid = image_grid([[grey, rgba, bands]])
    assert grid.shape == (4, 12, 3) and grid.dtype.name == "uint8"
    expected_grey = grey[0].add(1).mul(127.5).round().to(torch.uint8).numpy()
    for channel in range(3):
        assert (grid[:, :4, channel] == expected_grey).all() and (grid[:, 8:, channel] == expected_grey).all()
    assert (grid[:, 4:8] == [0, 128, 255]).all()  # alpha left out


def test_inception_features_take_grey_as_rgb(tmp_path):
    inception = load_inception(str(write_tiny_inception(tmp_path / "inception.pt")))
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
