"""Where the time and the memory go: the profiler window's traces (one per rank, the loop's phases labelled), the
FLOP/s and MFU in the metrics, a slow rank named (a delay injected through CYCLEGAN_TEST_FAULT), and
out-of-memory errors in one line (injected likewise)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import accelerate_launch, read_metrics, run_bounded, train_command
from trainer.config.load import load_config
from trainer.observe.flops import flops_per_pair
from trainer.runtime.faults import ENV

pytestmark = pytest.mark.distributed
DELAY_S = 0.8  # rank 1's delay entering each generator step


def test_two_ranks_write_a_trace_each_log_flops_and_name_the_slow_rank(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    window = ["profile.start_step=2", "profile.steps=2", "logging.every_steps=2", "logging.straggler_windows=2"]
    cmd = train_command(colour_shards, run_dir, "train.steps=7", *window, "eval.images=0",
                        launcher=accelerate_launch("cpu-ddp-2", 2))  # fmt: skip
    result = run_bounded(cmd, timeout_s=300, env={ENV: f"delay:generator step:1:{DELAY_S}"})
    assert result.returncode == 0, result.stderr[-3000:]
    traces = sorted(p.name for p in (run_dir / "traces").iterdir())
    assert traces == ["rank00000.steps2-3.pt.trace.json", "rank00001.steps2-3.pt.trace.json"]
    for name in traces:
        events = json.loads((run_dir / "traces" / name).read_text())["traceEvents"]
        names = [event.get("name") for event in events]
        for phase in ("data", "generator step", "discriminator step", "stop check"):
            assert names.count(phase) == 2, (name, phase)  # the two traced updates
        assert names.count("metric window") == 1 and "collective gather scalars" in names  # step 2 logs
    assert "profiler: updates 2-3 traced into" in result.stdout

    count, _ = flops_per_pair(load_config(run_dir / "config.yaml"))
    windows = [r for r in read_metrics(run_dir) if "perf/images_per_s" in r]
    assert windows and count > 0
    for record in windows:
        assert record["perf/flops_per_s"] == pytest.approx(count * record["perf/images_per_s"], rel=1e-9)
        assert 0 < record["perf/mfu"] < 1
    assert f"{count / 1e9:.3g} GFLOP per image pair per update; MFU against this CPU's" in result.stdout

    assert [record["step"] for record in windows] == [2, 4, 6, 7]
    for record in windows:  # rank 0 waits for rank 1 in each backward: equal steps, but rank 1's own time is longer
        assert record["perf/slowest_rank"] == 1
        assert record["mem/host_rss_gb/min"] <= record["mem/host_rss_gb/median"] <= record["mem/host_rss_gb/max"]
    for record in windows[1:]:  # the first window also holds one-time waits (DDP's bucket rebuild) on rank 0
        assert record["perf/own_time_s/max"] - record["perf/own_time_s/min"] > 0.8 * DELAY_S
    (warning,) = [line for line in result.stdout.splitlines() if "the slow rank" in line]
    assert warning.startswith("warning: rank 1 has been the slow rank for 2 logging windows in a row (to update 6)")


@pytest.mark.parametrize("kind", ["oom", "host_oom"])
def test_running_out_of_memory_is_one_line_naming_the_phase_and_what_to_change(kind, colour_shards, tmp_path):
    cmd = train_command(colour_shards, tmp_path / "run", "train.steps=6", "train.batch_size=2", "eval.images=0",
                        "train.precision=fp32")  # fmt: skip
    result = run_bounded(cmd, timeout_s=300, env={ENV: f"{kind}:discriminator step:0:3"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    where = "in phase 'discriminator step' during update 3 (batch 2 per rank x 1 micro-batch(es) of 32 px, fp32, ddp)"
    if kind == "oom":
        assert line == (
            f"error: rank 0: out of GPU memory {where}; to use less: train.batch_size=1 with "
            "train.grad_accum_steps=2 (the same global batch); train.activation_checkpointing=true; "
            "train.precision=bf16; sharded weights and optimizer state (launch/zero3.yaml or launch/fsdp2.yaml)"
        )
    else:
        assert line.startswith("error: rank 0: out of host memory (") and f" GiB resident) {where}; " in line
        assert line.endswith("to use less: a smaller train.batch_size; fewer data.num_workers (each holds decoded "
                             "batches); fewer eval.images (the test split is kept in memory)")  # fmt: skip
