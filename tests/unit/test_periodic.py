"""When the loop's interval parts are due, and what the evaluation and checkpoint parts decide and record."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

import trainer.periodic as periodic
from trainer.algorithms.pool import ImagePool
from trainer.checkpoint.train_state import TrainState
from trainer.config.model import ModelConfig
from trainer.config.sections import CheckpointConfig
from trainer.observe.console import Console
from trainer.periodic import Checkpointer, PeriodicEval, SampleGrids, is_due


def due_steps(due, total: int = 10) -> list[int]:
    return [step for step in range(1, total + 1) if due(step)]


@pytest.mark.parametrize(
    "every,total,expected",
    [(3, 10, [3, 6, 9, 10]), (5, 10, [5, 10]), (0, 10, [10]), (1, 3, [1, 2, 3]), (20, 10, [10])],
)
def test_due_at_multiples_of_every_and_at_the_last_step(every, total, expected):
    assert due_steps(lambda step: is_due(step, every, total), total) == expected


class FakeEngine:
    """any_rank on one rank, counting its calls (each is a collective every rank must make)."""

    def __init__(self, spread: float | None = None) -> None:
        self.any_rank_calls: list[bool] = []
        self.spread = spread

    def any_rank(self, flag: bool) -> bool:
        self.any_rank_calls.append(flag)
        return flag

    def autocast(self):
        return contextlib.nullcontext()

    def replica_spread(self) -> float | None:
        return self.spread


class FakeGens(torch.nn.Module):
    g_xy = g_yx = None


def test_sample_grids_and_evaluation_are_never_due_without_their_data():
    assert due_steps(SampleGrids(FakeEngine(), None, 2, 10).due) == []
    assert due_steps(PeriodicEval(FakeEngine(), None, 2, 10, "none").due) == []
    assert due_steps(PeriodicEval(FakeEngine(), lambda *a: {}, 4, 10, "none").due) == [4, 8, 10]


def evaluator(psnr: float):
    return lambda g_xy, g_yx, autocast: {"eval/psnr_g_xy": psnr, "eval/psnr_g_yx": psnr}


def test_evaluation_without_selection_names_no_best():
    engine = FakeEngine()
    metrics, best = PeriodicEval(engine, evaluator(12.0), 5, 10, "none")(FakeGens(), None)
    assert best is None and "eval/select_score" not in metrics and engine.any_rank_calls == []


def test_evaluation_names_a_new_best_only_when_it_beats_the_last():
    engine = FakeEngine()
    evaluate = PeriodicEval(engine, evaluator(12.0), 5, 10, "psnr")
    metrics, best = evaluate(FakeGens(), None)
    assert metrics["eval/select_score"] == 12.0
    assert best == {"select": "psnr", "score": 12.0, "metrics": metrics}
    assert evaluate(FakeGens(), {"select": "psnr", "score": 11.0})[1]["score"] == 12.0
    assert evaluate(FakeGens(), {"select": "psnr", "score": 12.5})[1] is None
    assert evaluate(FakeGens(), {"select": "psnr", "score": 12.0})[1] is None  # a tie is not a new best
    assert len(engine.any_rank_calls) == 4  # every rank decides together


class FakeTracker:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, step: int, metrics: dict) -> None:
        self.logged.append((step, metrics))


class Flag:
    def __init__(self, raised: bool = False) -> None:
        self.raised, self.saved_step = raised, 0


class Loader:
    def state_dict(self) -> dict:
        return {"consumed": 3}


def checkpointer(engine, tracker=None, flag=None, console=None, every=4, check=5) -> Checkpointer:
    cfg = CheckpointConfig(every_steps=every, preempt_check_steps=check, keep=2)
    return Checkpointer(engine, Path("run"), cfg, 10, ModelConfig(), "hash", tracker or FakeTracker(),
                        console or Console(True, io.StringIO()), flag or Flag())  # fmt: skip


def test_checkpoints_are_due_on_the_interval_the_last_step_a_new_best_and_a_stop():
    saver = checkpointer(FakeEngine(), every=4)
    assert due_steps(lambda step: saver.due(step, False, False)) == [4, 8, 10]
    assert saver.due(3, new_best=True, stopping=False) and saver.due(3, new_best=False, stopping=True)
    saver = checkpointer(FakeEngine(), every=0)
    assert due_steps(lambda step: saver.due(step, False, False)) == [10]


def test_a_stop_is_checked_only_on_the_check_steps():
    engine = FakeEngine()
    saver = checkpointer(engine, flag=Flag(raised=True), check=5)
    assert due_steps(saver.stop_requested) == [5, 10]
    assert engine.any_rank_calls == [True, True]  # the collective runs on the check steps only


def test_save_records_the_state_the_best_and_the_step(monkeypatch):
    calls = []
    monkeypatch.setattr(periodic, "save_checkpoint", lambda *args: calls.append(args) or Path("run/ckpt"))
    tracker, flag, out = FakeTracker(), Flag(), io.StringIO()
    saver = checkpointer(FakeEngine(spread=0.25), tracker=tracker, flag=flag, console=Console(True, out))
    state = TrainState(loader=Loader(), pools=(ImagePool(0, seed=0), ImagePool(0, seed=1)), global_batch=2, step=6)
    best = {"select": "psnr", "score": 12.0, "metrics": {"eval/psnr_g_xy": 12.0}}
    assert saver.save(state, best) == Path("run/ckpt") == saver.last_saved
    _, request = calls[0]
    assert (request.run_dir, request.step, request.keep, request.keep_every_steps) == (Path("run"), 6, 2, 0)
    assert request.best is best
    rank_state, meta = request.rank_state, request.meta
    assert rank_state["data"] == {"consumed": 3} and meta["images_seen"] == 12 and meta["config_hash"] == "hash"
    assert state.best is best and flag.saved_step == 6
    assert tracker.logged[0][1].pop("checkpoint/stall_s") >= 0  # how long the loop waited for the save
    assert tracker.logged == [(6, {"checkpoint/saved_step": 6, "run/replica_spread": 0.25, "eval/best_step": 6})]
    assert "ranks hold different weights at step 6" in out.getvalue()

    saver.engine.spread = None
    state.step = 8
    saver.save(state)
    assert calls[1][1].best is None and state.best is best  # not a new best: best.json stays
    assert tracker.logged[-1][1].pop("checkpoint/stall_s") >= 0
    assert tracker.logged[-1] == (8, {"checkpoint/saved_step": 8})
