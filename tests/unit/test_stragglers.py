"""StragglerWatch: the same rank slow in N windows in a row is named once per episode; the spread of ranks' values."""

from __future__ import annotations

import pytest

from trainer.observe.stragglers import StragglerWatch, slowest, spread


def watch(factor: float = 1.5, windows: int = 3) -> tuple[StragglerWatch, list[str]]:
    """A watch past its first window (which it skips: one-time work)."""
    warnings: list[str] = []
    straggler_watch = StragglerWatch(factor, windows, warnings.append)
    straggler_watch.update(0, [1.0, 100.0], [0.0, 0.0])
    return straggler_watch, warnings


def feed(straggler_watch: StragglerWatch, owns: list[list[float]]) -> None:
    for step, own in enumerate(owns, start=1):
        straggler_watch.update(step * 10, own, [0.0] * len(own))


def test_the_same_rank_slow_in_n_windows_in_a_row_is_named_once_per_episode():
    sw, warnings = watch(windows=3)
    feed(sw, [[1.0, 1.0, 2.0, 1.0]] * 5)
    assert len(warnings) == 1 and warnings[0].startswith("warning: rank 2 has been the slow rank for 3 logging ")
    assert "(to update 30)" in warnings[0]
    feed(sw, [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 1.0], [1.0, 1.0, 2.0, 1.0], [1.0, 1.0, 2.0, 1.0]])
    assert len(warnings) == 2  # a new episode after a window without a slow rank


def test_a_slow_rank_that_changes_or_pauses_restarts_the_count():
    sw, warnings = watch(windows=2)
    feed(sw, [[2.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    assert warnings == []


def test_slow_means_above_factor_times_the_lower_median():
    sw, warnings = watch(factor=1.5, windows=1)
    feed(sw, [[1.0, 1.4]])  # with two ranks the median rank is the faster one: 1.4 < 1.5 x 1.0
    assert warnings == []
    feed(sw, [[1.0, 1.6]])
    assert [w.split(" has")[0] for w in warnings] == ["warning: rank 1"]
    sw, warnings = watch(factor=1.5, windows=1)
    feed(sw, [[1e-4, 5e-4, 1e-4]])  # five times slower, but by less than a millisecond: timer noise
    assert warnings == []


def test_the_first_window_does_not_count():
    warnings: list[str] = []
    sw = StragglerWatch(1.5, 1, warnings.append)
    feed(sw, [[1.0, 2.0]])
    assert warnings == []
    feed(sw, [[1.0, 2.0]])
    assert len(warnings) == 1


def test_factor_zero_never_warns():
    sw, warnings = watch(factor=0, windows=1)
    feed(sw, [[1.0, 100.0]] * 3)
    assert warnings == []


def test_spread_and_slowest():
    assert spread("perf/own_time_s", [3.0, 1.0, 2.0, 10.0]) == {
        "perf/own_time_s/min": 1.0, "perf/own_time_s/median": pytest.approx(2.5), "perf/own_time_s/max": 10.0,
    }  # fmt: skip
    assert slowest([1.0, 3.0, 3.0]) == 1
