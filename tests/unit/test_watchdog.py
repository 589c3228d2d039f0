"""The hang watchdog in one process (trainer.runtime.watchdog): a phase that never ends is reported - the phase
path, every thread's stack, RUN/HUNG - and the process is ended with the requeue code; progress keeps it quiet."""

from __future__ import annotations

import json
import threading
import time

from trainer.runtime.watchdog import DIAGNOSTICS, HANG_EXIT_CODE, HANG_MARKER, Watchdog


def test_a_stuck_phase_is_reported_with_every_threads_stack_and_ends_the_process(tmp_path, capfd):
    ended = threading.Event()
    codes = []
    watchdog = Watchdog(tmp_path, rank=3, timeout_s=0.5, exit_fn=lambda code: (codes.append(code), ended.set()))
    watchdog.at_step(41)
    release = threading.Event()
    with watchdog.phase("checkpoint"), watchdog.phase("collective barrier"):
        assert ended.wait(10), "the watchdog did not fire"
        release.set()
    watchdog.close()
    assert codes == [HANG_EXIT_CODE]
    report = tmp_path / DIAGNOSTICS / "hang-step00000041-rank00003.txt"
    assert watchdog.report == report
    collectives = json.loads(report.with_suffix(".collectives.json").read_text())  # no process group: none
    assert collectives.get("entries", []) == []
    text = report.read_text()
    assert "in phase: checkpoint > collective barrier" in text.splitlines()[0]
    assert "test_a_stuck_phase_is_reported" in text  # the main thread's Python stack, where it waits
    assert (tmp_path / HANG_MARKER).read_text() == "41 rank 3: checkpoint > collective barrier\n"
    line = capfd.readouterr().err.strip()
    assert line.startswith("rank 3: no progress for ") and f"stack in {report}" in line
    assert line.endswith(f"exiting with code {HANG_EXIT_CODE} to be requeued")


def test_phases_that_keep_changing_never_fire(tmp_path):
    codes = []
    watchdog = Watchdog(tmp_path, rank=0, timeout_s=0.4, exit_fn=codes.append)
    deadline = time.monotonic() + 1.5
    step = 0
    while time.monotonic() < deadline:
        with watchdog.phase("generator step"):
            time.sleep(0.05)
        step += 1
        watchdog.at_step(step)
    watchdog.close()
    assert codes == [] and not (tmp_path / DIAGNOSTICS).exists()
    assert watchdog.where == "between phases"


def test_an_unwatched_wait_does_not_fire_and_the_timer_restarts_after_it(tmp_path):
    codes = []
    watchdog = Watchdog(tmp_path, rank=0, timeout_s=0.3, exit_fn=codes.append)
    with watchdog.phase("final uploads"), watchdog.unwatched():
        time.sleep(1.0)  # a wait bounded by its own timeout (checkpoint.remote_final_wait_s)
    time.sleep(0.1)
    assert codes == []
    time.sleep(1.0)  # no phase after it: the timer runs again
    watchdog.close()
    assert codes == [HANG_EXIT_CODE]


def test_an_unwritable_run_directory_still_reports_on_stderr(tmp_path, capfd):
    blocked = tmp_path / "file"
    blocked.write_text("")
    ended = threading.Event()
    watchdog = Watchdog(blocked / "run", rank=0, timeout_s=0.3, exit_fn=lambda code: ended.set())
    assert ended.wait(10)
    watchdog.close()
    err = capfd.readouterr().err
    assert f"could not write {blocked / 'run' / DIAGNOSTICS}" in err.splitlines()[0]
    assert "Thread" in err  # faulthandler's dump on stderr instead


def test_a_stalled_filesystem_does_not_stop_the_report(tmp_path, capfd, monkeypatch):
    """Writing the report blocks (the run directory is the stalled filesystem): the watchdog waits
    WRITE_TIMEOUT_S for it, then reports on stderr and ends the process all the same."""
    from trainer.runtime import watchdog as module

    never = threading.Event()
    monkeypatch.setattr(module, "WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(module, "_write_stacks", lambda path, header: never.wait())
    monkeypatch.setattr(module, "write_atomic", lambda path, text: never.wait())
    ended = threading.Event()
    watchdog = Watchdog(tmp_path, rank=1, timeout_s=0.3, exit_fn=lambda code: ended.set())
    with watchdog.phase("data"):
        assert ended.wait(10)
    watchdog.close()
    never.set()
    err = capfd.readouterr().err
    assert "rank 1: no progress for" in err and "could not write" in err and "Thread" in err


def test_a_test_fault_is_injected_at_its_phase_rank_and_update(monkeypatch, tmp_path):
    """CYCLEGAN_TEST_FAULT (trainer.runtime.faults): a delay on one rank's phase every time, an error in one
    update; the phase it was raised in is remembered for the error's message."""
    import pytest
    import torch

    from trainer.runtime.faults import ENV

    monkeypatch.setenv(ENV, "delay:data:1:0.2")
    slow, other = Watchdog(tmp_path, rank=1, timeout_s=0), Watchdog(tmp_path, rank=0, timeout_s=0)
    for watchdog, least, most in ((slow, 0.2, 5.0), (other, 0.0, 0.1)):
        start = time.monotonic()
        with watchdog.phase("data"):
            pass
        assert least <= time.monotonic() - start < most
    monkeypatch.setenv(ENV, "oom:discriminator step:0:3")
    watchdog = Watchdog(tmp_path, rank=0, timeout_s=0)
    watchdog.at_step(1)
    with watchdog.phase("discriminator step"):  # update 2: not yet
        pass
    watchdog.at_step(2)
    with pytest.raises(torch.OutOfMemoryError) as raised, watchdog.phase("train"), watchdog.phase("discriminator step"):
        pass
    assert watchdog.where_raised(raised.value) == "train > discriminator step"
    assert watchdog.where == "between phases"
    monkeypatch.setenv(ENV, "crash:data:0:1")
    with pytest.raises(ValueError, match="the kind must be one of delay, oom, host_oom"):
        Watchdog(tmp_path, rank=0, timeout_s=0)
