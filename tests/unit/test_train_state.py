"""TrainState: what a checkpoint records about progress, and a resume reads back."""

from __future__ import annotations

import dataclasses
import json

import torch

from trainer.algorithms.pool import ImagePool
from trainer.checkpoint.train_state import TrainState, comparable_best
from trainer.config.model import ModelConfig


class FakeLoader:
    def __init__(self, position: int = 0) -> None:
        self.position = position
        self.loaded: list[dict] = []

    def state_dict(self) -> dict:
        return {"consumed": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(state)
        self.position = state["consumed"]


def filled_pools(seed: int) -> tuple[ImagePool, ImagePool]:
    pools = (ImagePool(3, seed=seed), ImagePool(3, seed=seed + 1))
    for pool in pools:
        for _ in range(3):
            pool.query(torch.rand(2, 3, 4, 4))
    return pools


def test_meta_and_rank_state_round_trip_into_a_resumed_state():
    saved_state = TrainState(loader=FakeLoader(17), pools=filled_pools(0), global_batch=4, wandb_run_id="abc")
    saved_state.step = 5
    meta = saved_state.meta(ModelConfig(), "hash0")
    assert list(meta) == ["model", "wandb_run_id", "images_seen", "config_hash"]  # train_state.json's order
    assert meta == {"model": dataclasses.asdict(ModelConfig()), "wandb_run_id": "abc", "images_seen": 20,
                    "config_hash": "hash0"}  # fmt: skip
    json.dumps(meta)  # train_state.json is JSON
    rank_state = saved_state.rank_state()
    assert list(rank_state) == ["pool_x", "pool_y", "data"]

    resumed = TrainState(loader=FakeLoader(), pools=(ImagePool(3, seed=9), ImagePool(3, seed=9)), global_batch=4)
    resumed.load({"format": 1, "step": 5, **meta}, rank_state, "cpu")
    assert (resumed.step, resumed.start_step, resumed.images_seen, resumed.wandb_run_id) == (5, 5, 20, "abc")
    assert resumed.loader.loaded == [{"consumed": 17}]
    for before, after in zip(saved_state.pools, resumed.pools):
        a, b = before.state_dict(), after.state_dict()
        assert len(a["images"]) == len(b["images"]) == 3
        assert all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))
        probe = torch.rand(2, 3, 4, 4)
        assert torch.equal(before.query(probe), after.query(probe))  # the same random stream continues


def test_images_seen_counts_earlier_runs_at_their_batch_and_this_run_at_its_own():
    state = TrainState(loader=FakeLoader(), pools=filled_pools(0), global_batch=1)
    state.load({"step": 4, "images_seen": 8}, {"data": {"consumed": 0}}, "cpu")  # 4 steps at global batch 2
    state.step = 6  # two more at global batch 1
    assert state.images_seen == 8 + 2 * 1
    assert state.meta(ModelConfig(), "h")["images_seen"] == 10


def test_a_checkpoint_without_an_image_count_counts_its_steps_at_this_batch():
    state = TrainState(loader=FakeLoader(), pools=filled_pools(0), global_batch=3)
    state.load({"step": 4, "wandb_run_id": None}, {"data": {"consumed": 0}}, "cpu")
    assert state.images_before == 12 and state.images_seen == 12 and state.wandb_run_id is None


def test_a_fresh_state_starts_at_zero():
    state = TrainState(loader=FakeLoader(), pools=filled_pools(0), global_batch=8)
    assert (state.step, state.images_seen, state.best, state.wandb_run_id) == (0, 0, None, None)
    state.step = 3
    assert state.images_seen == 24


def test_after_a_topology_change_the_pools_start_empty():
    state = TrainState(loader=FakeLoader(), pools=(ImagePool(3, seed=0), ImagePool(3, seed=1)), global_batch=2)
    state.load({"step": 2}, {"data": {"consumed": 5}}, "cpu")  # load_checkpoint gives only the data position
    assert [len(pool.images) for pool in state.pools] == [0, 0] and state.loader.position == 5


def test_a_best_of_another_selection_metric_does_not_compare():
    record = {"step": 4, "select": "psnr", "score": 11.0, "metrics": {}}
    assert comparable_best(record, "psnr") is record
    assert comparable_best(record, "cycle") is None
    assert comparable_best(record, "none") is None
    assert comparable_best(None, "psnr") is None
