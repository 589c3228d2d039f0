"""The benchmark scripts run on a tiny configuration and write valid JSON (the figures are not tested)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_data_throughput_writes_json(tmp_path):
    out = tmp_path / "data.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/data_throughput.py", "--size", "32", "--images", "64", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "data_throughput" and figures["crop_size"] == 32 and figures["load_size"] == 35
    assert figures["images_per_s_one_core"] > 0 and figures["images_per_s_two_workers"] > 0


def test_quality_budget_writes_json(tmp_path):
    out = tmp_path / "quality.json"
    cmd = [sys.executable, "benchmarks/quality_budget.py", "--seconds", "6", "--models", "resnet6", "--train", "16",
           "--test", "4", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "quality_budget" and figures["task"] == "stripes"
    (run,) = figures["results"]
    assert run["model"] == "resnet6" and run["steps"] >= 1 and "eval/psnr_gain_xy" in run
