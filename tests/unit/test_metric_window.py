"""MetricWindow: per-step stats summed on the device, one collective per logging interval, timing and reset, and
the per-rank timing of several ranks."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch

import trainer.periodic as metric_window
from trainer.observe.nonfinite import NonfiniteGuard
from trainer.observe.stragglers import StragglerWatch
from trainer.periodic import MetricWindow


class FakeEngine:
    """Engine.gather_scalars on this rank and, for `others`, further ranks that hold this rank's values except
    where they say otherwise; records each call (a call is one collective)."""

    def __init__(self, others: Sequence[dict[str, float]] = ()) -> None:
        self.others = others
        self.gather_calls: list[dict] = []
        self.waited_s = 0.0
        self.world_size = 1 + len(others)

    def gather_scalars(self, values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        self.gather_calls.append(dict(values))
        return {name: [float(value)] + [other.get(name, float(value)) for other in self.others]
                for name, value in values.items()}  # fmt: skip

    def lr(self, which: str) -> float:
        return {"g": 2e-4, "d": 1e-4}[which]

    def loss_scale(self, which: str) -> float:
        return {"g": 1024.0, "d": 512.0}[which]

    def memory_metrics(self) -> dict[str, float]:
        return {"mem/host_rss_gb": 1.5}


class FakeLoader:
    def progress(self) -> dict[str, float]:
        return {"data/epoch_x": 1.0, "data/epoch_y": 2.0}

    def counters(self) -> dict[str, float]:
        return {"data/samples_read": 40.0, "data/bad_corrupt": 1.0}


class Clock:
    """time.perf_counter, advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(metric_window.time, "perf_counter", clock)
    return clock


def stats(g: float, d: float = 0.5, norm: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "loss/g_total": torch.tensor(g),
        "loss/d_total": torch.tensor(d),
        "grad_norm/g": torch.tensor(norm),
        "grad_norm/d": torch.tensor(norm),
    }


def window(engine=None, sinks=(), fp16=False, every_steps=4, total_steps=10, stragglers=None) -> MetricWindow:
    return MetricWindow(
        engine or FakeEngine(), FakeLoader(), NonfiniteGuard(max_consecutive=5, fp16=fp16), every_steps=every_steps,
        total_steps=total_steps, rank_images_per_step=4, global_batch=8, fp16=fp16, sinks=sinks,
        stragglers=stragglers,
    )  # fmt: skip


def test_one_collective_per_flush_averages_stats_over_steps_and_sums_counters(clock):
    engine = FakeEngine()
    win = window(engine)
    for g in (1.0, 2.0, 3.0, 6.0):
        win.add(stats(g))
        assert isinstance(win.sums["loss/g_total"], torch.Tensor)  # accumulated on the device, not as floats
    assert engine.gather_calls == []  # nothing crosses ranks (or syncs) before the window closes
    clock.now += 2.0
    logged = win.flush(4)
    assert len(engine.gather_calls) == 1
    (sent,) = engine.gather_calls
    assert sent["loss/g_total"].item() == 3.0 and sent["loss/d_total"].item() == 0.5
    assert {"data/epoch_x", "data/epoch_y", "mem/host_rss_gb", "loss/nonfinite_g", "loss/nonfinite_d"} <= set(sent)
    assert {"data/samples_read", "data/bad_corrupt", "perf/own_time_s", "perf/data_wait_s"} <= set(sent)
    assert logged["loss/g_total"] == 3.0 and logged["data/samples_read"] == 40.0 and logged["data/epoch_y"] == 2.0
    assert "perf/slowest_rank" not in logged and "perf/own_time_s/max" not in logged  # one rank: no spread


def test_several_ranks_average_stats_sum_counters_and_log_the_spread_of_timing_and_memory(clock):
    rank1 = {"loss/g_total": 5.0, "data/samples_read": 60.0, "mem/host_rss_gb": 2.5, "perf/own_time_s": 0.9}
    rank2 = {"loss/g_total": 4.0, "data/samples_read": 20.0, "mem/host_rss_gb": 3.5, "perf/data_wait_s": 0.6}
    engine = FakeEngine(others=[rank1, rank2])
    win = window(engine)
    for _ in range(2):
        with win.timing_update():
            with win.waiting_for_data():
                clock.now += 0.1
            clock.now += 0.4  # the rank's own work
            engine.waited_s += 0.5  # a backward waiting for the others
            clock.now += 0.5
        win.add(stats(3.0))
    logged = win.flush(2)
    assert logged["loss/g_total"] == pytest.approx(4.0)  # (3 + 5 + 4) / 3
    assert logged["data/samples_read"] == 120.0  # 40 + 60 + 20: totals over ranks
    assert logged["perf/own_time_s/min"] == pytest.approx(0.5) and logged["perf/own_time_s/max"] == 0.9
    assert logged["perf/own_time_s/median"] == pytest.approx(0.5)  # this rank and rank 2: 0.5 s, rank 1: 0.9
    assert logged["perf/slowest_rank"] == 1
    assert (logged["perf/data_wait_s/min"], logged["perf/data_wait_s/max"]) == pytest.approx((0.1, 0.6))
    assert (logged["mem/host_rss_gb/min"], logged["mem/host_rss_gb/median"], logged["mem/host_rss_gb/max"]) == (
        1.5, 2.5, 3.5,
    )  # fmt: skip
    assert logged["perf/data_wait_fraction"] == pytest.approx((0.1 + 0.1 + 0.6) / 3 * 2 / 2.0)  # mean over ranks


def test_a_rank_slow_in_consecutive_windows_is_named_on_the_console(clock):
    warnings: list[str] = []
    engine = FakeEngine(others=[{"perf/own_time_s": 2.0, "perf/data_wait_s": 1.5}])
    win = window(engine, stragglers=StragglerWatch(factor=1.5, windows=2, warn=warnings.append))
    for step in (1, 2, 3, 4):  # the first window is not counted (one-time work)
        with win.timing_update():
            clock.now += 1.0
        win.add(stats(1.0))
        win.flush(step)
        assert len(warnings) == (1 if step >= 3 else 0)  # once the second counted window in a row finds it slow
    assert warnings[0].startswith("warning: rank 1 has been the slow rank for 2 logging windows in a row (to update 3)")
    assert "2 s of its own time per update against the median rank's 1 s" in warnings[0]
    assert "1.5 s of it waiting for data" in warnings[0]


def test_flush_adds_lrs_timing_and_data_wait(clock):
    win = window()
    for _ in range(4):
        with win.waiting_for_data():
            clock.now += 0.25
        clock.now += 0.75  # the update itself
        win.add(stats(1.0))
    logged = win.flush(4)
    assert logged["lr/g"] == 2e-4 and logged["lr/d"] == 1e-4
    assert logged["perf/images_per_s"] == pytest.approx(4 * 8 / 4.0)  # steps x global batch / elapsed
    assert logged["perf/images_per_s_per_rank"] == pytest.approx(4 * 4 / 4.0)
    assert logged["perf/step_time_s"] == pytest.approx(1.0)
    assert logged["perf/data_wait_fraction"] == pytest.approx(0.25)
    assert "loss_scale/g" not in logged


def test_fp16_windows_log_the_loss_scales(clock):
    win = window(fp16=True)
    win.add(stats(1.0))
    clock.now += 1.0
    logged = win.flush(1)
    assert logged["loss_scale/g"] == 1024.0 and logged["loss_scale/d"] == 512.0


def test_flush_hands_the_record_to_the_sinks_and_starts_a_new_window(clock):
    received = []
    win = window(sinks=(lambda step, rec: received.append(("tracker", step, rec)),
                        lambda step, rec: received.append(("console", step, rec))))  # fmt: skip
    win.add(stats(float("nan")))
    with win.waiting_for_data():
        clock.now += 1.0
    clock.now += 1.0
    first = win.flush(4)
    assert [(name, step) for name, step, _ in received] == [("tracker", 4), ("console", 4)]
    assert received[0][2] is first and math.isnan(first["loss/g_total"]) and first["loss/nonfinite_g"] == 1.0
    assert win.steps == 0 and win.sums == {} and win.data_wait_s == 0.0

    win.add(stats(10.0))
    clock.now += 4.0
    second = win.flush(8)
    assert second["loss/g_total"] == 10.0  # the first window's steps are gone
    assert second["loss/nonfinite_g"] == 0.0  # counted since the last flush only
    assert second["perf/step_time_s"] == pytest.approx(4.0) and second["perf/data_wait_fraction"] == 0.0


def test_the_window_is_due_every_interval_and_at_the_last_step():
    win = window(every_steps=4, total_steps=10)
    assert [step for step in range(1, 11) if win.due(step)] == [4, 8, 10]
