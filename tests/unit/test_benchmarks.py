"""The benchmark scripts run on a tiny configuration and write valid JSON (the figures are not tested)."""

import json
import subprocess
import sys

import pytest

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


def test_train_throughput_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--config", "configs/demo-cpu.yaml", "--size", "32",
           "--steps", "2", "--warmup", "1", "--out", str(out), "model.ngf=8", "model.ndf=8"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert figures["benchmark"] == "train_throughput" and [r["row"] for r in rows][:2] == [
        "reference", "ours: fp32, batch 1, for-loop Adam",
    ]  # fmt: skip
    assert len(rows) == 6 and rows[0]["speedup_vs_reference"] == 1.0
    assert figures["flops_per_image_pair"] > 0 and all(r["achieved_tflops"] > 0 for r in rows)
    ours = rows[1:]
    assert all(0 <= r["data_wait_fraction"] < 1 and r["generator_s"] > 0 and r["discriminator_s"] > 0 for r in ours)
    assert rows[4]["overrides"][-2:] == ["train.batch_size=4", "optimizer.lr_scaling=linear"]
    assert rows[-1]["row"] == "+ channels_last" and rows[-1]["overrides"][-1] == "train.channels_last=true"


@pytest.mark.distributed
def test_scaling_writes_json(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "benchmarks/scaling.py", "--steps", "8", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [r["ranks"] for r in figures["weak_scaling"]] == [1, 2, 2]
    assert all(r["images_per_s"] > 0 for r in figures["weak_scaling"])
    assert sorted(figures["zero_state_per_rank"]) == ["zero1", "zero2", "zero3"]
    for ranks in figures["zero_state_per_rank"].values():
        assert [r["rank"] for r in ranks] == [0, 1] and all(0 < r["fraction_of_total"] < 1 for r in ranks)
    full = figures["zero_state_per_rank"]["zero1"][0]["param_bytes"]
    for rank in figures["zero_state_per_rank"]["zero3"]:  # ZeRO-3 partitions the parameters (with some padding)
        assert abs(2 * rank["param_bytes"] - full) <= 0.01 * full
