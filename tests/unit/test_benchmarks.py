"""The benchmark scripts run on a tiny configuration and write valid JSON (the figures are not tested)."""

import json
import os
import sys

import pytest

from tests.conftest import run_bounded


def test_data_throughput_writes_json(tmp_path):
    out = tmp_path / "data.json"
    result = run_bounded(
        [sys.executable, "benchmarks/data_throughput.py", "--size", "32", "--images", "64", "--out", str(out)],
        timeout_s=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "data_throughput" and figures["crop_size"] == 32 and figures["load_size"] == 35
    assert figures["images_per_s_one_core"] > 0 and figures["images_per_s_two_workers"] > 0
    rows = ("http", "http_cache_cold", "http_cache_warm")
    assert all(figures[f"images_per_s_{row}_one_core"] > 0 and figures[f"{row}_vs_local"] > 0 for row in rows)


def test_quality_budget_writes_json(tmp_path):
    """A budget in updates (a test must not depend on how many fit in some seconds on this machine)."""
    out = tmp_path / "quality.json"
    cmd = [sys.executable, "benchmarks/quality_budget.py", "--steps", "3", "--models", "resnet6", "cut", "--train",
           "16", "--test", "4", "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "quality_budget" and figures["task"] == "stripes"
    cyclegan, cut = figures["results"]
    assert cyclegan["model"] == "resnet6" and cyclegan["steps"] == 3 and "eval/psnr_gain_yx" in cyclegan
    assert cut["config"] == "cut-demo" and "eval/psnr_gain_xy" in cut and "eval/psnr_gain_yx" not in cut
    assert all(run["step_time_s"] > 0 and run["host_rss_gb_max"] > 0 for run in (cyclegan, cut))


def test_contention_writes_json(tmp_path):
    """One row per condition and the explicit thread count of "before" (all rows: `python benchmarks/contention.py`)."""
    out = tmp_path / "contention.json"
    cmd = [sys.executable, "benchmarks/contention.py", "--seconds", "0.5", "--busy", "1", "--out", str(out),
           "--rows", "alone/before,busy/after,one_cpu_cgroup/after,alone/bf16_forced"]  # fmt: skip
    result = run_bounded(cmd, timeout_s=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(rows) == ["alone/before", "alone/bf16_forced", "busy/after", "one_cpu_cgroup/after"]
    assert rows["alone/before"]["threads"] == len(os.sched_getaffinity(0))
    assert rows["alone/bf16_forced"]["precision"] == "bf16"
    assert all(row["images_per_s"] > 0 for key, row in rows.items() if "cgroup" not in key)
    cgroup = rows["one_cpu_cgroup/after"]
    assert cgroup.get("threads") == 1 or cgroup["error"].startswith("no one-CPU cgroup here")  # root or not
    assert "busy/after:" in result.stdout


def test_a_budget_that_allows_no_update_says_so(tmp_path):
    out = tmp_path / "quality.json"
    cmd = [sys.executable, "benchmarks/quality_budget.py", "--seconds", "0", "--models", "resnet6", "--train", "8",
           "--test", "2", "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = json.loads(out.read_text())["results"]
    assert run["steps"] == 0 and run["error"] == "no update finished within the 0 s budget; raise --seconds"
    assert result.stdout.strip() == "resnet6: no update finished within the 0 s budget; raise --seconds"


def test_train_throughput_records_failed_rows_with_keep_going(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--config", "configs/demo-cpu.yaml", "--size", "32",
           "--batches", "", "--keep-going", "--row-timeout", "0.01", "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(row["error"] == "timed out after 0.01 s" for row in rows)
    assert "+ fused generator passes" in result.stdout and "failed: timed out" in result.stdout


@pytest.mark.distributed
def test_scaling_writes_json(tmp_path):
    """A weak-scaling row on one and on two ranks, and the state of the two backends that partition the parameters
    (every row: `python benchmarks/scaling.py`; the other rows run the same code with other launch files, and
    tests/distributed/test_two_process.py checks that ZeRO-1/2 shard the optimizer state and static_graph trains)."""
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "benchmarks/scaling.py", "--steps", "8", "--weak", "1,ddp2", "--sharded", "zero3,fsdp2",
           "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=900)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [(r["ranks"], r["launch"]) for r in figures["weak_scaling"]] == [(1, "none"), (2, "cpu-ddp-2")]
    assert all(r["images_per_s"] > 0 for r in figures["weak_scaling"])
    assert figures["weak_scaling"][0]["weak_scaling_speedup"] == 1.0
    sharded = figures["sharded_state_per_rank"]
    assert sorted(sharded) == ["fsdp2", "zero3"]
    for ranks in sharded.values():
        assert [r["rank"] for r in ranks] == [0, 1] and all(0 < r["fraction_of_total"] < 1 for r in ranks)
    full = figures["param_bytes_one_rank"]
    for name in ("zero3", "fsdp2"):  # both partition the parameters (with some padding)
        for rank in sharded[name]:
            assert abs(2 * rank["param_bytes"] - full) <= 0.02 * full, (name, rank)
    assert all(abs(r["fraction_of_total"] - 0.5) <= 0.025 for r in sharded["fsdp2"])  # and the Adam state


def test_activation_memory_dry_writes_json(tmp_path):
    out = tmp_path / "activation.json"
    cmd = [sys.executable, "benchmarks/activation_memory.py", "--dry", "--device", "cpu", "--out", str(out)]
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "activation_memory" and figures["overrides"] == ["model.ngf=8", "model.ndf=8"]
    off, on = figures["rows"]
    assert (off["size"], off["checkpointing"], on["size"], on["checkpointing"]) == (32, "off", 32, "on")
    assert all(r["peak_bytes"] > 0 and r["step_s"] > 0 and len(r["step_s_all"]) == 1 for r in (off, on))
    assert 0 < on["saved_g_step_bytes"] < off["saved_g_step_bytes"]
    (ratios,) = figures["ratios"]
    assert ratios["size"] == 32 and ratios["saved_g_step_on_over_off"] < 1


def test_checkpoint_stall_writes_json(tmp_path):
    out = tmp_path / "stall.json"
    cmd = [sys.executable, "benchmarks/checkpoint_stall.py", "--config", "configs/demo-cpu.yaml", "--size", "32",
           "--steps", "6", "--every", "2", "--remote", "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for mode, asynchronous in (("sync", False), ("async", True)):
        run = figures[mode]
        assert run["async_save"] is asynchronous and len(run["stall_s"]) == 2 and run["checkpoint_bytes"] > 0
    assert figures["async_stall_fraction"] == figures["async"]["mean_stall_s"] / figures["sync"]["mean_stall_s"]
    remote = figures["remote"]
    assert remote["remote"] and len(remote["stall_s"]) == 2 and remote["upload_lag_steps"][0] == 2
    assert figures["remote_stall_fraction"] == remote["mean_stall_s"] / figures["sync"]["mean_stall_s"]
    assert figures["remote_wall_fraction"] == remote["wall_s"] / figures["sync"]["wall_s"]


@pytest.mark.distributed
def test_time_to_quality_writes_json_and_a_plot(tmp_path):
    out = tmp_path / "ttq.json"
    cmd = [sys.executable, "benchmarks/time_to_quality.py", "--images", "16", "--eval-every", "8", "--batches", "4",
           "--rules", "linear", "--train", "16", "--test", "4", "--warmup-images", "8",
           "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    figures = json.loads(out.read_text())
    names = [r["name"] for r in figures["results"]]
    assert names == ["reference: fp32, batch 1, no EMA", "batch 4, linear"]
    reference, linear = figures["results"]
    assert reference["ema"] is False and reference["curve"]["images"] == [8, 16]
    assert reference["curve"]["steps"] == [8, 16]
    assert linear["curve"]["images"] == [8, 16] and linear["curve"]["steps"] == [2, 4]
    assert linear["overrides"] == ["optimizer.lr_scaling=linear", "schedule.warmup_steps=2"]
    assert all(s > 0 for r in figures["results"] for s in r["curve"]["seconds"])
    assert figures["target_gain_db"] == reference["curve"]["gain"][-1] and reference["to_target"]["images"] <= 16
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiled_translate_writes_json(tmp_path):
    out = tmp_path / "tiled.json"
    cmd = [sys.executable, "benchmarks/tiled_translate.py", "--sizes", "300", "--whole", "300", "--tile", "128",
           "--halo", "16", "--compare", "256", "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    tiled, whole = figures["rows"]
    assert (tiled["tile"], whole["tile"]) == (128, 0) and tiled["side"] == whole["side"] == 300
    assert all(row["peak_rss_mib"] > 100 and row["wall_s"] > 0 for row in (tiled, whole))
    seams = figures["seams"]
    assert seams["pixels"] == 256 * 256 and seams["max_abs_diff_16bit"] >= seams["max_abs_diff_away_from_seams"]


def test_format_quality_writes_json(tmp_path):
    out = tmp_path / "formats.json"
    cmd = [sys.executable, "benchmarks/format_quality.py", "--tasks", "colour2grey", "--steps", "4", "--out", str(out)]
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["task"] == "colour2grey" and row["images"] == 64 and row["format_y"] == "8-bit with 1 channel"
    assert row["gain_db"] == pytest.approx(row["psnr_written"] - row["psnr_identity"], abs=0.02)
