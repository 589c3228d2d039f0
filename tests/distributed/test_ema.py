"""The generators' moving average is what evaluation sees under the sharded backends (2 CPU ranks): inside
Engine.ema_weights() G computes exactly what a plain generator built from the gathered average computes, and the
raw weights come back after it. ZeRO-3's forward reads gathered copies that small parameters keep between forwards,
so writing only the partitions would evaluate the raw weights (it did, until the swap went through the backend)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import accelerate_launch, run_bounded

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


@pytest.mark.parametrize("launch_config", ["zero3", "fsdp2"])
def test_evaluation_sees_the_moving_average(launch_config, tmp_path):
    cmd = accelerate_launch(launch_config, 2) + ["tests/distributed/ema_worker.py", str(tmp_path)]
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts["backend"] == launch_config and facts["restored"], facts
        assert facts["seen_vs_average"] <= 1e-6 < facts["raw_vs_average"], facts


@pytest.mark.parametrize(
    "overrides",
    [[], ["distributed.backend=fsdp2", "distributed.reshard_after_forward=false"]],
    ids=["ddp", "fsdp2-unsharded-after-forward"],
)
def test_one_process_sees_the_moving_average(overrides, tmp_path):
    """FSDP2 without resharding after forward leaves the generators unsharded after a no-grad forward: the average
    must still go into (and come out of) the shards."""
    cmd = [sys.executable, "tests/distributed/ema_worker.py", str(tmp_path), *overrides]
    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads((tmp_path / "rank0.json").read_text())
    assert facts["restored"] and facts["seen_vs_average"] <= 1e-6 < facts["raw_vs_average"], facts
