"""The README's demo, end to end: the colour task's G(x) must beat the identity baseline by >= 6 dB PSNR, while
the untrained generators do not; `trainer.evaluate` on the export agrees."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command, untrained_export
from trainer.config import load_config

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
