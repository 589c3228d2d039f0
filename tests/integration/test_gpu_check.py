"""benchmarks/gpu_check.py in its dry mode: every section runs at tiny sizes without CUDA, so the script that a
lent GPU machine runs cannot rot between GPU sessions. The throughput ladder's rows are checked here too."""

import json
import sys

import pytest

from tests.conftest import run_bounded


@pytest.mark.slow
def test_gpu_check_dry_runs_every_section(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", str(out), "--dry"]
    result = run_bounded(cmd, timeout_s=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(
        ["ladder", "demo_ddp", "demo_zero2", "tests", "activation_mem"], "ok"
    ), (out / "gpu_check.log").read_text()[-3000:]
    assert report["dry"] and report["environment"]["version/torch"] and not report["environment"]["cuda_available"]
    assert sorted(p.name for p in out.iterdir()) == [
        "activation_memory.json", "gpu_check.json", "gpu_check.log", "gpu_tests.xml", "train_throughput.json",
    ]  # fmt: skip

    rows = report["ladder"]["rows"]
    assert [r["row"] for r in rows] == [
        "reference", "ours: fp32, batch 1, for-loop Adam", "+ foreach/fused Adam", "+ bf16 autocast",
        "+ channels_last", "+ fused generator passes", "+ batch 2 (linear LR scaling)",
        "+ activation checkpointing (side row)",
    ]  # fmt: skip
    assert rows[0]["speedup_vs_reference"] == 1.0 and report["ladder"]["flops_per_image_pair"] > 0
    ours = rows[1:]
    assert all(r["images_per_s"] > 0 and r["achieved_tflops"] > 0 and r["generator_s"] > 0 for r in ours)
    assert all(0 <= r["data_wait_fraction"] < 1 and r["mem/host_rss_gb"] > 0 for r in ours)
    assert rows[-1]["overrides"][-3:] == [
        "train.batch_size=2", "optimizer.lr_scaling=linear", "train.activation_checkpointing=true",
    ]  # fmt: skip

    for name in ("demo_ddp", "demo_zero2"):
        figures = sections[name]["figures"]
        assert figures["perf/images_per_s"] > 0 and figures["eval/psnr_g_xy"] > 0, name
    tests = sections["tests"]["summary"]
    assert tests["tests"] >= 4 and tests["skipped"] == tests["tests"] and tests["failed"] == []
    assert report["activation_memory"]["rows"]
    assert "[gpu_check] wrote" in result.stdout and "demo_zero2: {" in result.stdout


def test_gpu_check_refuses_a_machine_without_cuda_unless_dry(tmp_path):
    result = run_bounded([sys.executable, "benchmarks/gpu_check.py", str(tmp_path), "--budget-s", "5"], timeout_s=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "gpu_check: CUDA is not available here; use --dry to check the script without a GPU"
    )
