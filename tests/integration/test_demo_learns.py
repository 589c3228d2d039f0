"""The README's demo, end to end: the colour task's G(x) must beat the identity baseline by >= 6 dB PSNR, while
the untrained generators do not; `trainer.evaluate` on the export agrees."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.synthetic import write_synthetic
from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command, untrained_export
from trainer.config.load import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_config_learns_the_colour_task(tmp_path):
    data, run_dir = tmp_path / "colour", tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "shards.synthetic", "--task", "colour", "--out", str(data)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    start = time.monotonic()
    result = run_bounded(train_command(data, run_dir), timeout_s=600)
    minutes = (time.monotonic() - start) / 60
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    final = [r for r in records if "eval/psnr_gain_xy" in r][-1]
    print(
        f"demo: {minutes:.1f} min, PSNR identity {final['eval/psnr_identity']:.2f} dB -> "
        f"G(x) {final['eval/psnr_g_xy']:.2f} dB, F(y) {final['eval/psnr_g_yx']:.2f} dB"
    )
    assert final["step"] == 600
    assert final["eval/psnr_gain_xy"] >= 6.0
    assert final["eval/psnr_gain_yx"] >= 6.0
    assert minutes < 5

    result, trained = evaluate_cli(run_dir / "export", data, 64)
    assert result.returncode == 0, result.stderr[-3000:]
    # Training evaluated under its bf16 autocast, the CLI in fp32.
    assert trained["eval/psnr_g_xy"] == pytest.approx(final["eval/psnr_g_xy"], abs=0.02)
    assert trained["eval/ssim_g_xy"] >= trained["eval/ssim_identity"] + 0.3
    assert trained["eval/ssim_g_yx"] >= trained["eval/ssim_identity"] + 0.3
    untrained_dir = untrained_export(load_config(run_dir / "config.yaml"), tmp_path / "untrained")
    result, untrained = evaluate_cli(untrained_dir, data, 64)
    assert result.returncode == 0, result.stderr[-3000:]
    assert untrained["eval/psnr_identity"] == trained["eval/psnr_identity"]
    # An untrained generator's grey-ish output is a few dB from the (poor) identity baseline, far below training.
    for direction in ("xy", "yx"):
        assert abs(untrained[f"eval/psnr_gain_{direction}"]) < 4.0
        assert trained[f"eval/psnr_gain_{direction}"] >= untrained[f"eval/psnr_gain_{direction}"] + 6.0


@pytest.mark.slow
def test_the_articles_unet_learns_the_photos_task(tmp_path):
    """Real image statistics: the U-Net's skips keep the photographs' content, so G(x) beats not translating
    (22 dB) clearly within minutes; the demo's small ResNet does not at this length (README, Data)."""
    data, run_dir = tmp_path / "photos", tmp_path / "run"
    write_synthetic(data, "photos", size=32, train=1024, test=32, seed=0)
    unet = ["model.generator=unet_article", "model.n_skip=2", "model.norm_g=batch", "model.norm_d=batch"]
    short = ["train.steps=400", "eval.images=32", "eval.every_steps=0", "logging.image_every_steps=0",
             "checkpoint.every_steps=0"]  # fmt: skip
    result = run_bounded(train_command(data, run_dir, *unet, *short), timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_metrics(run_dir) if "eval/psnr_gain_xy" in r][-1]
    assert final["eval/psnr_identity"] < 23 and final["eval/psnr_gain_xy"] >= 2.0, final


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cut-demo", "fastcut-demo"])
def test_the_cut_demo_configs_learn_the_colour_task(config, tmp_path):
    """CUT and FastCUT (one generator, X -> Y) with the demo's networks: G(x) beats the identity by >= 6 dB within
    the config's steps (600 and 1800), and `trainer.evaluate` on the export agrees."""
    data, run_dir = tmp_path / "colour", tmp_path / "run"
    write_synthetic(data, "colour", size=32, train=2048, test=64)  # the built-in set (shards.synthetic's defaults)
    result = run_bounded(train_command(data, run_dir, "logging.image_every_steps=0", config=config), timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_metrics(run_dir) if "eval/psnr_gain_xy" in r][-1]
    print(f"{config}: G(x) {final['eval/psnr_g_xy']:.2f} dB, identity {final['eval/psnr_identity']:.2f} dB")
    assert final["step"] == load_config(REPO / f"configs/{config}.yaml").train.steps
    assert final["eval/psnr_gain_xy"] >= 6.0
    result, trained = evaluate_cli(run_dir / "export", data, 64)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained["eval/psnr_g_xy"] == pytest.approx(final["eval/psnr_g_xy"], abs=0.02)
    assert trained["eval/ssim_g_xy"] >= trained["eval/ssim_identity"] + 0.3
