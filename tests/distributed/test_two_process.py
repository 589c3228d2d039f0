"""Real multi-process runs on CPU (gloo): DDP equivalence and gradient synchronization, ZeRO-1/2/3, fp16 loss
scaling per unit and gradient accumulation, all through tests/distributed/worker.py and the launch/ configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import accelerate_launch, run_bounded

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
WORKER = "tests/distributed/worker.py"


def launch(out: Path, nproc: int, *overrides: str, launch_config: str = "cpu-ddp-2", flags: tuple = ()) -> list[dict]:
    out.mkdir(parents=True)
    prefix = (
        [sys.executable] if nproc == 1 and launch_config == "cpu-ddp-2" else accelerate_launch(launch_config, nproc)
    )
    result = run_bounded(prefix + [WORKER, "--out", str(out), *flags, *overrides], timeout_s=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def assert_weights(a: dict, b: dict, atol: float) -> None:
    """Equal final weights, except conv biases right before an affine-free InstanceNorm (see the worker)."""
    for unit in ("g", "d"):
        assert a["final"][unit].keys() == b["final"][unit].keys()
        skip = set(a["noise_driven"][unit])
        assert skip and skip < a["final"][unit].keys()
        for key in a["final"][unit].keys() - skip:
            difference = (a["final"][unit][key] - b["final"][unit][key]).abs().max().item()
            assert difference <= atol, f"{unit}.{key} differs by {difference}"


def max_rank_difference(ranks: list[dict]) -> float:
    return max(
        (ranks[0]["final"][u][k] - ranks[1]["final"][u][k]).abs().max().item()
        for u in ("g", "d")
        for k in ranks[0]["final"][u]
    )


@pytest.fixture(scope="module")
def one_rank_batch4(tmp_path_factory) -> list[dict]:
    """The reference: one process, batch 4, 2 steps."""
    return launch(tmp_path_factory.mktemp("ref") / "out", 1, "train.batch_size=4", "train.steps=2")


@pytest.fixture(scope="module")
def ddp_two_ranks_batch2(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("ddp") / "out", 2, "train.batch_size=2", "train.steps=2")


def test_ddp_two_ranks_equal_one_rank_with_double_batch(one_rank_batch4, ddp_two_ranks_batch2):
    ranks = ddp_two_ranks_batch2
    assert [r["backend"] for r in ranks] == ["ddp", "ddp"] and ranks[0]["world"] == 2
    assert max_rank_difference(ranks) == 0.0  # different data per rank, identical weights after the update
    assert [r["replica_spread"] for r in ranks] == [0.0, 0.0]  # what training logs as run/replica_spread
    assert_weights(ranks[0], one_rank_batch4[0], atol=1e-5)
    # and training moved both units
    assert any(not torch.equal(ranks[0]["final"]["d"][k], ranks[0]["init"]["d"][k]) for k in ranks[0]["init"]["d"])


def test_without_gradient_sync_the_ranks_drift_apart(tmp_path):
    ranks = launch(tmp_path / "out", 2, "train.batch_size=2", "train.steps=1", "distributed.debug_skip_grad_sync=true")
    assert max_rank_difference(ranks) > 1e-4
    assert ranks[0]["replica_spread"] == ranks[1]["replica_spread"] > 1e-7
    for unit in ("g", "d"):
        assert any(
            not torch.equal(ranks[0]["final"][unit][k], ranks[1]["final"][unit][k]) for k in ranks[0]["final"][unit]
        )


def test_ddp_static_graph_and_small_buckets_train_the_same(ddp_two_ranks_batch2, tmp_path):
    levers = ["distributed.static_graph=true", "distributed.bucket_cap_mb=1"]
    ranks = launch(tmp_path / "out", 2, "train.batch_size=2", "train.steps=2", *levers)
    assert max_rank_difference(ranks) == 0.0
    assert_weights(ranks[0], ddp_two_ranks_batch2[0], atol=1e-6)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # DDP: batch 2 x 2 micro-batches (all-reduce only on the second) = batch 4 in one micro-batch, on 2 ranks.
    # (Micro-batches of 1 are avoided: float32 CPU conv backward at batch 1 differs from batch >= 2 by up to a few
    # percent in this tiny model's weight gradients; in float64 the two agree to 1e-13.)
    accumulated = launch(tmp_path / "accumulated", 2, "train.batch_size=2", "train.grad_accum_steps=2", "train.steps=2")
    direct = launch(tmp_path / "direct", 2, "train.batch_size=4", "train.steps=2")
    assert max_rank_difference(accumulated) == 0.0
    assert_weights(accumulated[0], direct[0], atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_agree_and_shard_the_optimizer_state(stage, ddp_two_ranks_batch2, tmp_path):
    ranks = launch(tmp_path / "out", 2, "train.batch_size=2", "train.steps=2", launch_config=f"zero{stage}")
    assert [r["backend"] for r in ranks] == [f"zero{stage}"] * 2
    assert max_rank_difference(ranks) == 0.0
    assert [r["replica_spread"] for r in ranks] == ([None, None] if stage == 3 else [0.0, 0.0])  # ZeRO-3: slices
    # Same math as DDP (fp32 AdamW on the flattened partitions).
    assert_weights(ranks[0], ddp_two_ranks_batch2[0], atol=1e-5)
    for unit in ("g", "d"):
        full = ddp_two_ranks_batch2[0]["state_bytes"][unit]["optimizer"]
        for rank in ranks:
            held = rank["state_bytes"][unit]["optimizer"]
            assert 0.45 <= held / full <= 0.55, (unit, held, full)


FSDP2_BLOCKS = "distributed.fsdp_min_block_params=100"  # the tiny networks still get blocks inside each root


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fsdp2_trains_exactly_like_ddp(accumulation, ddp_two_ranks_batch2, tmp_path):
    """Same data, pool off: FSDP2's reduce-scattered gradients and sharded AdamW give DDP's weights, also with
    gradient accumulation (gradients kept unsharded and local until the last micro-batch)."""
    split = ["train.batch_size=2", f"train.grad_accum_steps={accumulation}", "train.steps=2"]
    ranks = launch(tmp_path / "out", 2, *split, FSDP2_BLOCKS, launch_config="fsdp2")
    assert [r["backend"] for r in ranks] == ["fsdp2", "fsdp2"] and ranks[0]["world"] == 2
    assert [r["replica_spread"] for r in ranks] == [None, None]  # ranks hold different slices
    assert max_rank_difference(ranks) == 0.0  # every rank consolidates the same full weights
    ddp = ddp_two_ranks_batch2 if accumulation == 1 else launch(tmp_path / "ddp", 2, *split)
    assert_weights(ranks[0], ddp[0], atol=1e-5)
    assert any(not torch.equal(ranks[0]["final"]["d"][k], ranks[0]["init"]["d"][k]) for k in ranks[0]["init"]["d"])


def test_fsdp2_ranks_each_hold_half_of_the_parameters_and_optimizer_state(tmp_path):
    """At the demo's network sizes, each of 2 ranks holds (params + Adam state) within 5% of one rank's total / 2."""
    demo = ["model.ngf=16", "model.ndf=16", "model.n_blocks=3", "train.batch_size=2", "train.steps=1"]
    (whole,) = launch(tmp_path / "ddp", 1, *demo)
    ranks = launch(tmp_path / "fsdp2", 2, *demo, launch_config="fsdp2")
    total = sum(sum(whole["state_bytes"][unit].values()) for unit in ("g", "d"))
    for rank in ranks:
        held = sum(sum(rank["state_bytes"][unit].values()) for unit in ("g", "d"))
        assert abs(held / (total / 2) - 1) <= 0.05, (held, total)


def test_fp16_overflow_in_one_unit_skips_only_that_unit(tmp_path):
    (result,) = launch(
        tmp_path / "out", 1, "train.batch_size=4", "train.steps=6", "train.precision=fp16", flags=("--overflow-d",)
    )
    unchanged = lambda unit: all(
        torch.equal(result["init"][unit][k], result["final"][unit][k]) for k in result["init"][unit]
    )  # noqa: E731
    assert unchanged("d")  # every discriminator step overflowed and was skipped
    assert not unchanged("g")  # the generator kept stepping with its own scaler
    assert result["loss_scale"]["d"] == 2.0**16 * 0.5**6  # halved on each of the 6 overflows
    assert result["loss_scale"]["g"] > result["loss_scale"]["d"]


@pytest.mark.parametrize("case", ["foreach", "fused", "fsdp2", "zero2"])
def test_a_nonfinite_loss_skips_only_that_units_update(case, tmp_path):
    """fp32, every discriminator loss infinite: D's updates are skipped (by our check, by the fused kernel's
    found_inf on the device, on FSDP2's shards, or by DeepSpeed), and its Adam state never sees a NaN; G trains on."""
    flags = ("--overflow-d",)
    if case in ("fsdp2", "zero2"):
        ranks = launch(tmp_path / "out", 2, "train.batch_size=2", "train.steps=3", launch_config=case, flags=flags)
    else:
        ranks = launch(tmp_path / "out", 1, "train.batch_size=4", "train.steps=3", f"optimizer.implementation={case}",
                       flags=flags)  # fmt: skip
    for result in ranks:
        init, final = result["init"], result["final"]
        assert all(torch.equal(init["d"][k], final["d"][k]) for k in init["d"])
        assert not all(torch.equal(init["g"][k], final["g"][k]) for k in init["g"])
        assert all(torch.isfinite(v).all() for unit in final.values() for v in unit.values())
