"""Per-sample extras (label maps, colour histograms) from the shards reach the generators as input channels."""

import pytest
import torch

from shards.synthetic import write_synthetic
from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command
from trainer.checkpoint.export import load_generators
from trainer.config.load import load_config
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader


@pytest.fixture(scope="module")
def extra_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra")
    write_synthetic(root, "stripes", size=32, train=24, test=8, maxcount=12, extras=True)
    return root


@pytest.mark.parametrize("kind,channels", [("label", 1), ("hist", 24)])
def test_extras_arrive_as_generator_channels(extra_shards, kind, channels):
    cfg = DataConfig(root=str(extra_shards), load_size=32, crop_size=32, extra=kind, num_workers=0, flip=False)
    batch = next(UnpairedLoader(cfg, 4, seed=0, rank=0, world_size=1, device=torch.device("cpu")))
    assert batch["extra_x"].shape == (4, channels, 32, 32)
    if kind == "label":
        # the label map marks the reddish objects of the X scenes
        red = batch["x"][:, 0] > batch["x"][:, 2]
        assert ((batch["extra_x"][:, 0] > 0) == red).float().mean() > 0.9
    else:
        sums = batch["extra_x"][:, :, 0, 0].view(4, 3, 8).sum(-1)
        torch.testing.assert_close(sums, torch.ones(4, 3))  # one normalized histogram per colour channel


def test_extra_config_trains_and_exports_a_four_channel_generator(extra_shards, tmp_path):
    run_dir = tmp_path / "run"
    small = ["train.steps=3", "logging.every_steps=1", "model.ngf=4", "model.ndf=4"]
    result = run_bounded(train_command(extra_shards, run_dir, *small, config="cyclegan-extra"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_config(run_dir / "config.yaml").model.input_nc == 4
    exported = load_generators(run_dir / "export")
    assert exported.extra == "label"
    first = next(m for m in exported.g_xy.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4
    evals = read_metrics(run_dir)
    assert any("eval/psnr_g_xy" in r for r in evals)
    result, metrics = evaluate_cli(run_dir / "export", extra_shards, 8)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval/psnr_g_xy" in metrics
