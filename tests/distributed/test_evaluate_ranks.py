"""Evaluation split over 2 ranks (uneven shares; PSNR, SSIM and L1 reduced in one all_reduce, FID/KID by
torchmetrics) gives the numbers of 1 rank."""

from __future__ import annotations

import pytest

from tests.conftest import accelerate_launch, evaluate_cli, untrained_export, write_tiny_inception
from trainer.config.load import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_two_ranks_give_the_numbers_of_one(colour_shards, tmp_path):
    cfg = load_config(
        None, ["data.load_size=32", "data.crop_size=32", "model.generator=resnet", "model.ngf=8", "model.n_blocks=2"]
    )
    export = untrained_export(cfg, tmp_path / "export")
    flags = ["--inception-weights", str(write_tiny_inception(tmp_path / "inception.pt")), "--batch-size", "3"]
    one_result, one = evaluate_cli(export, colour_shards, 15, *flags)  # 15 images: shares of 8 and 7
    two_result, two = evaluate_cli(export, colour_shards, 15, *flags, launcher=accelerate_launch("cpu-ddp-2", 2))
    assert one_result.returncode == 0, one_result.stderr[-3000:]
    assert two_result.returncode == 0, two_result.stderr[-3000:]
    assert one.keys() == two.keys() and {"eval/fid_x", "eval/kid_y", "eval/ssim_g_xy", "eval/psnr_g_yx"} <= one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key
    assert two["eval/images_x"] == 15
