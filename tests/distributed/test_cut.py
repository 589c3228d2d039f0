"""CUT on real 2-rank runs: the PatchNCE head is part of the generator unit from the start, so every backend
synchronizes or shards it with the generator (the reference builds it in the first forward, which DDP never sees);
and loss.gan_mode=wgangp's double backward under DDP and ZeRO-2."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_two_process import FSDP2_BLOCKS, assert_weights, launch, max_rank_difference

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

CUT = ("model.family=cut", "model.nce_mlp_channels=8", "model.nce_patches=8", "train.steps=2")


@pytest.fixture(scope="module")
def cut_ddp(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("cut-ddp") / "out", 2, "train.batch_size=2", *CUT)


def head_keys(rank: dict, when: str) -> list[str]:
    return [key for key in rank[when]["g"] if key.startswith("head.")]


def test_cut_on_two_ddp_ranks_equals_one_rank_with_double_batch(cut_ddp, tmp_path):
    """Both ranks sample the same patch locations (same seed), and PatchNCE's negatives come from each image alone:
    two ranks of 2 images compute the gradients of one rank of 4, head included."""
    one = launch(tmp_path / "one", 1, "train.batch_size=4", *CUT)
    assert head_keys(cut_ddp[0], "init") == head_keys(cut_ddp[0], "final") != []  # there before prepare
    assert [r["replica_spread"] for r in cut_ddp] == [0.0, 0.0]
    assert_weights(cut_ddp[0], one[0], atol=1e-5)
    for key in head_keys(cut_ddp[0], "init"):
        assert not torch.equal(cut_ddp[0]["final"]["g"][key], cut_ddp[0]["init"]["g"][key]), key
        assert torch.equal(cut_ddp[0]["final"]["g"][key], cut_ddp[1]["final"]["g"][key]), key


@pytest.mark.parametrize("launch_config", ["zero2", "zero3", "fsdp2"])
def test_cut_trains_like_ddp_under(launch_config, cut_ddp, tmp_path):
    blocks = (FSDP2_BLOCKS,) if launch_config == "fsdp2" else ()
    ranks = launch(tmp_path / "out", 2, "train.batch_size=2", *CUT, *blocks, launch_config=launch_config)
    assert max_rank_difference(ranks) == 0.0  # every rank consolidates the same full weights
    assert head_keys(ranks[0], "final") == head_keys(cut_ddp[0], "final")
    assert_weights(ranks[0], cut_ddp[0], atol=1e-5)


def test_the_gradient_penalty_is_synchronized_under_ddp_and_zero2(tmp_path):
    """Each rank penalizes its own interpolates; the second-order gradients are averaged like the others (the
    ranks stay equal), ZeRO-2 computes what DDP does, the penalty changes what the discriminators learn, and CUT's
    one discriminator is penalized the same way."""
    gp = ("loss.gan_mode=wgangp", "train.batch_size=2", "train.steps=2")
    ddp = launch(tmp_path / "ddp", 2, *gp)
    zero2 = launch(tmp_path / "zero2", 2, *gp, launch_config="zero2")
    without = launch(tmp_path / "without", 2, *gp, "loss.lambda_gp=0")
    cut = launch(tmp_path / "cut", 2, *gp, *CUT[:3])
    assert [r["replica_spread"] for r in ddp + zero2 + cut] == [0.0] * 6
    assert_weights(zero2[0], ddp[0], atol=1e-5)
    moved = [
        k for k in ddp[0]["final"]["d"] if not torch.allclose(ddp[0]["final"]["d"][k], without[0]["final"]["d"][k])
    ]
    assert moved
