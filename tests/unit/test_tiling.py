"""Tiled translation (trainer.models.tiling, translate --tile): the whole image's instance-norm statistics, windows
no larger than the tile, the untiled result wherever the halo covers the receptive field (differences near core
boundaries where it does not), and the translate path padding by index as the untiled path pads by copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shards.pixels import PixelFormat
from trainer.checkpoint.export import ExportedGenerators
from trainer.config.checks import ConfigError
from trainer.config.model import ModelConfig
from trainer.models import GENERATORS, build_generator
from trainer.models.tiling import gather_statistics, tile_rows, translate_tiled
from trainer.translate import reflected, tile_and_halo, translate_batches

SIZE = (200, 180)


def generator(name: str = "resnet") -> nn.Module:
    torch.manual_seed(0)
    return build_generator(ModelConfig(generator=name, n_blocks=1, ngf=4)).eval()


def smooth_image() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE[0]), torch.linspace(0, 1, SIZE[1]), indexing="ij")
    return torch.stack([torch.sin(6 * yy + 3 * xx), torch.cos(5 * xx), yy * 2 - 1])[None]


def tiled(net: nn.Module, image: torch.Tensor, tile: int, halo: int, seen: list | None = None) -> torch.Tensor:
    def window(top: int, left: int, height: int, width: int) -> torch.Tensor:
        if seen is not None:
            seen.append((height, width))
        return image[:, :, top : top + height, left : left + width]

    out = np.zeros((*image.shape[-2:], 3), np.float32)
    translate_tiled(net, window, image.shape[-2:], out, lambda band: band, tile, halo)
    return torch.from_numpy(out).permute(2, 0, 1)


@pytest.mark.parametrize("name", ["resnet", "densenet", "unet_article"])
def test_a_halo_covering_the_receptive_field_gives_the_untiled_result(name):
    net, image = generator(name), torch.rand(1, 3, *SIZE) * 2 - 1
    with torch.no_grad():
        whole = net(image)[0]
    seen: list[tuple[int, int]] = []
    assert (tiled(net, image, 144, 48, seen) - whole).abs().max() < 1e-5
    assert max(max(shape) for shape in seen) <= 144 and len(set(seen)) > 1  # clipped windows at the border too
    assert not any("forward" in vars(m) for m in net.modules())  # the norm layers are theirs again


def test_the_statistics_are_the_whole_images():
    net, image = generator(), torch.rand(1, 3, *SIZE) * 2 - 1
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0])) for m in net.modules()
             if isinstance(m, nn.InstanceNorm2d)]  # fmt: skip
    with torch.no_grad():
        net(image)
    for hook in hooks:
        hook.remove()
    windows = lambda top, left, height, width: image[:, :, top : top + height, left : left + width]  # noqa: E731
    stats = gather_statistics(net, windows, tile_rows(*SIZE, 144, 48))
    assert len(stats.mean) == len(inputs) == 7  # stem, two downsamplings, a block's two, two upsamplings
    for layer, x in inputs.items():
        torch.testing.assert_close(stats.mean[layer], x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats.var[layer], x.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)


def test_a_halo_short_of_the_receptive_field_differs_most_near_core_boundaries():
    net, image = generator(), smooth_image()
    with torch.no_grad():
        whole = net(image)[0]
    halo = 8
    difference = (tiled(net, image, 64, halo) - whole).abs().amax(dim=0)
    near = torch.zeros(SIZE, dtype=torch.bool)
    for row in tile_rows(*SIZE, 64, halo):
        for tile in row:
            top, left, bottom, right = tile.core
            for edge in (top, bottom):
                if 0 < edge < SIZE[0]:
                    near[max(edge - halo, 0) : edge + halo, :] = True
            for edge in (left, right):
                if 0 < edge < SIZE[1]:
                    near[:, max(edge - halo, 0) : edge + halo] = True
    assert difference[~near].max() < 0.1 < difference[near].max() < 0.5  # the statistics differ a little too


def test_reflected_indices_are_reflection_padding():
    image = torch.arange(7.0)[None, None]
    padded = F.pad(image, (3, 4), mode="reflect")[0, 0]
    assert torch.equal(image[0, 0][reflected(-3, 14, 7)], padded)
    assert torch.equal(reflected(0, 3, 1), torch.zeros(3, dtype=torch.long))


def test_translate_tiles_large_images_as_it_translates_them_whole():
    model = ModelConfig(generator="resnet", n_blocks=1, ngf=4, x_channels=1, y_channels=1, input_nc=1)
    torch.manual_seed(0)
    net = build_generator(model).eval()
    gens = ExportedGenerators(net, net, model, 32, "none", {"x": 16, "y": 16})
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 65536, (1, 150, 130)).astype(np.int32))  # no multiple of 4: padded
    whole = list(translate_batches(gens, "x2y", [("a.png", image, None)]))[0][2]
    tiles = list(translate_batches(gens, "x2y", [("a.png", image, None)], tiling=(96, 32)))[0][2]
    assert whole.shape == tiles.shape == (1, 150, 130) and gens.pixel_format("y") == PixelFormat(1, 16)
    assert (whole.long() - tiles.long()).abs().max() <= 1


def test_tile_and_halo_round_up_and_refuse_a_tile_without_a_core():
    assert tile_and_halo(0, 112, 4) is None
    assert tile_and_halo(510, 30, 4) == (512, 32)
    with pytest.raises(ConfigError, match="--tile 256 --halo 256 .* the tile must be over twice the halo"):
        tile_and_halo(200, 200, 256)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_registers_its_norm_layers_in_the_order_its_forward_runs_them(name):
    """The statistics passes measure the layers in registration order, each normalizing with those before it."""
    torch.manual_seed(0)
    net = build_generator(ModelConfig(generator=name, ngf=4)).eval()
    layers = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    calls: list[nn.Module] = []
    hooks = [layer.register_forward_pre_hook(lambda layer, args: calls.append(layer)) for layer in layers]
    with torch.no_grad():
        net(torch.rand(1, 3, 256, 256))
    for hook in hooks:
        hook.remove()
    assert calls == layers
