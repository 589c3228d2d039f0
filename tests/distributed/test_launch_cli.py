"""The README's demo command, unchanged, under `accelerate launch` with each launch/ config on CPU."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import accelerate_launch, read_metrics, run_bounded, train_command
from trainer.checkpoint.export import load_generators
from trainer.config.load import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

CASES = {
    # launcher, processes, expected backend
    "python": (None, 1, "ddp"),
    "cpu-ddp-2": ("cpu-ddp-2", 2, "ddp"),
    "zero2": ("zero2", 2, "deepspeed"),
    "zero3": ("zero3", 2, "deepspeed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_demo_command_runs_under_each_launcher(case, tmp_path, colour_shards):
    launch_config, nproc, backend = CASES[case]
    prefix = [sys.executable] if launch_config is None else accelerate_launch(launch_config, nproc)
    run_dir = tmp_path / "run"
    small = ["train.steps=4", "logging.every_steps=2", "eval.images=7"]  # 7: uneven shares over 2 ranks
    result = run_bounded(train_command(colour_shards, run_dir, *small, launcher=prefix), timeout_s=400)
    assert result.returncode == 0, result.stderr[-4000:]
    global_batch = 4 * nproc
    assert f"global batch {global_batch} = 4 per rank x {nproc} ranks" in result.stdout
    records = read_metrics(run_dir)
    scale = min(global_batch, 8.0)  # lr_scaling=auto
    threads = records[0]["run/cpu_threads"]  # torch's own count, after the CPU policy
    assert records[0] == {
        "step": 0, "run/global_batch": global_batch, "run/world_size": nproc, "run/lr_scale": scale, "run/restarts": 0,
        "run/cpu_threads": threads,
    }  # fmt: skip
    # the ranks share the CPUs this process may use (shards.cpu_budget); each has one loader worker on a CPU
    assert 1 <= threads <= max(1, len(os.sched_getaffinity(0)) // nproc)
    assert f"{threads} CPU thread(s) and 1 loader worker(s) per rank (auto: " in result.stdout
    assert f"{nproc} local rank(s)" in result.stdout
    assert f"lr scaling auto x{scale:.4g} -> lr {2e-4 * scale:.4g}" in result.stdout
    assert [r["step"] for r in records if "loss/g_total" in r] == [2, 4]
    final = [r for r in records if "loss/g_total" in r][-1]
    assert final["data/samples_read"] == 4 * 2 * 4 * nproc  # steps x domains x batch, summed over the ranks
    assert load_config(run_dir / "config.yaml").distributed.backend == backend
    exported = load_generators(run_dir / "export")
    assert sum(p.numel() for p in exported.g_xy.parameters()) > 0
