"""The README's demo, end to end: the colour task's G(x) must beat the identity baseline by >= 6 dB PSNR."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_bounded, train_command

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
