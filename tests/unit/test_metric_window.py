"""MetricWindow: per-step stats summed on the device, one reduction per logging interval, timing and reset."""

from __future__ import annotations

import math

import pytest
import torch

import trainer.periodic as metric_window
from trainer.observe.nonfinite import NonfiniteGuard
from trainer.periodic import MetricWindow


class FakeEngine:
    """Engine.reduce on one rank, recording each call (a call is one collective)."""

    def __init__(self) -> None:
        self.reduce_calls: list[tuple[dict, dict]] = []

    def reduce(self, means: dict[str, torch.Tensor], sums: dict[str, torch.Tensor] | None = None) -> dict:
        self.reduce_calls.append((dict(means), dict(sums or {})))
        values = {**means, **(sums or {})}
        return {name: float(values[name]) for name in sorted(means) + sorted(sums or {})}

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


def window(engine=None, sinks=(), fp16=False, every_steps=4, total_steps=10) -> MetricWindow:
    return MetricWindow(
        engine or FakeEngine(), FakeLoader(), NonfiniteGuard(max_consecutive=5, fp16=fp16), every_steps=every_steps,
        total_steps=total_steps, rank_images_per_step=4, global_batch=8, fp16=fp16, sinks=sinks,
    )  # fmt: skip


def test_one_reduce_per_flush_averages_stats_over_steps_and_sums_counters(clock):
    engine = FakeEngine()
    win = window(engine)
    for g in (1.0, 2.0, 3.0, 6.0):
        win.add(stats(g))
        assert isinstance(win.sums["loss/g_total"], torch.Tensor)  # accumulated on the device, not as floats
    assert engine.reduce_calls == []  # nothing crosses ranks (or syncs) before the window closes
    clock.now += 2.0
    logged = win.flush(4)
    assert len(engine.reduce_calls) == 1
    means, sums = engine.reduce_calls[0]
    assert means["loss/g_total"].item() == 3.0 and means["loss/d_total"].item() == 0.5
    assert set(sums) == {"data/samples_read", "data/bad_corrupt"}  # counters are totals over ranks
    assert {"data/epoch_x", "data/epoch_y", "mem/host_rss_gb", "loss/nonfinite_g", "loss/nonfinite_d"} <= set(means)
    assert logged["loss/g_total"] == 3.0 and logged["data/samples_read"] == 40.0 and logged["data/epoch_y"] == 2.0


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
