"""In-process parts of the issue-27 process hardening: telling a dead peer's collective error from a bug, the
early stop signal handed to the PreemptionFlag, and the W&B fallback around accelerate's tracker."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from trainer.config.sections import LoggingConfig
from trainer.observe.tracking import Tracker, TrackingError
from trainer.runtime.preemption import SIGNALS, PreemptionFlag
from trainer.runtime.process_exit import early_signal, peer_failure, record_early_signals

GLOO_CLOSED = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:39607. This "
    "is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
)


def test_a_collective_whose_peer_died_is_one_line_naming_the_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    expected = "rank 3: a peer process ended or stopped responding (Connection closed by peer [127.0.0.1]:39607); "
    assert peer_failure(RuntimeError(GLOO_CLOSED)) == expected + "stopping"
    try:  # as DDP's backward re-raises it, chained
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as err:
            raise RuntimeError("autograd: an error in a hook") from err
    except RuntimeError as err:
        assert peer_failure(err) == expected + "stopping"
    assert peer_failure(dist.DistBackendError("NCCL communicator was aborted on rank 3.")) == (
        "rank 3: a peer process ended or stopped responding (NCCL communicator was aborted on rank 3); stopping"
    )


@pytest.mark.parametrize(
    "err", [RuntimeError("shape mismatch"), ValueError("Connection reset by peer"), KeyError("x")], ids=repr
)
def test_any_other_error_is_not_taken_for_a_dead_peer(err):
    assert peer_failure(err) is None


@pytest.fixture()
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    early_signal()  # forget what a failed test left


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_before_the_flag_exists_is_taken_over_by_it(restore_signals, sig):
    record_early_signals()
    os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill returns
    flag = PreemptionFlag()
    assert flag.raised and flag.signal == sig and not flag.interrupted
    assert not PreemptionFlag().raised  # taken over once


class FakeAccelerator:
    """accelerate's tracker API as Tracker uses it, with a W&B tracker whose log fails like a lost service."""

    is_main_process = True

    def __init__(self, fail_init: bool = False):
        self.trackers: list = []
        self.init_kwargs: list[dict] = []
        self.fail_init = fail_init

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.init_kwargs.append(init_kwargs["wandb"])
        self.trackers.append(SimpleNamespace(name="wandb", run=SimpleNamespace(id="abc123")))
        if self.fail_init and init_kwargs["wandb"]["mode"] == "online":
            raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    def get_tracker(self, name, unwrap=False):
        (tracker,) = [t for t in self.trackers if t.name == name]
        return tracker.run if unwrap else tracker

    def log(self, values, step=None):
        raise ConnectionResetError("Connection lost")


def test_the_init_timeout_is_passed_and_a_failed_online_start_goes_offline(tmp_path, capsys):
    accelerator = FakeAccelerator(fail_init=True)
    cfg = LoggingConfig(wandb="online", wandb_init_timeout_s=7, spike_factor=0)
    tracker = Tracker(accelerator, tmp_path, cfg, {})
    assert [kw["mode"] for kw in accelerator.init_kwargs] == ["online", "offline"]
    assert accelerator.init_kwargs[0]["settings"].init_timeout == 7
    assert len(accelerator.trackers) == 1  # the failed one was dropped
    assert tracker.wandb_run_id == "abc123"
    assert "warning: W&B did not start online (No API key configured." in capsys.readouterr().out


@pytest.mark.parametrize("fallback", ["offline", "stop"])
def test_a_wandb_failure_during_the_run_follows_the_fallback(tmp_path, capsys, fallback):
    accelerator = FakeAccelerator()
    tracker = Tracker(accelerator, tmp_path, LoggingConfig(wandb="offline", wandb_fallback=fallback), {})
    if fallback == "stop":
        with pytest.raises(TrackingError) as err:
            tracker.log(2, {"loss/g_total": 1.0})
        assert str(err.value) == (
            "logging.wandb=offline: W&B failed at step 2 (Connection lost); logging.wandb_fallback=stop"
        )
        return
    tracker.log(2, {"loss/g_total": 1.0})
    tracker.log(4, {"loss/g_total": 0.5})  # no second warning: W&B is left alone
    tracker.close()  # nor finished
    out = capsys.readouterr().out
    assert out.count("warning: W&B failed at step 2 (Connection lost); going on without W&B") == 1
    assert accelerator.trackers == []
    assert (tmp_path / "metrics.jsonl").read_text().count("loss/g_total") == 2
