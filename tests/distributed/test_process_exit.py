"""trainer.runtime.process_exit against the way a gloo worker thread can abort a finished process, and the one
line a rank prints when its peer dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, accelerate_launch, free_port, kill_tree, read_metrics, run_bounded, train_command

pytestmark = pytest.mark.distributed
HARNESS = "tests/distributed/gloo_exit.py"


def rank0_exit(mode: str) -> subprocess.CompletedProcess:
    """Run the two-rank harness in `mode`; rank 0's completed process (rank 1 is killed afterwards)."""
    port = str(free_port())
    peer = subprocess.Popen(
        [sys.executable, HARNESS, "1", port, mode], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return run_bounded([sys.executable, HARNESS, "0", port, mode], timeout_s=120)
    finally:
        kill_tree(peer.pid)


def test_plain_exit_is_aborted_by_a_gloo_thread_during_finalization():
    """The hazard itself: if this starts passing after a torch upgrade, exit_process may no longer be needed."""
    result = rank0_exit("sys-exit")
    assert "collective pending" in result.stdout, result.stderr[-2000:]
    assert result.returncode == -signal.SIGABRT, result.stderr[-2000:]
    assert "terminate called" in result.stderr  # libstdc++'s words for std::terminate


def test_exit_process_leaves_with_its_status():
    result = rank0_exit("exit-process")
    assert "collective pending" in result.stdout, result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_rank_whose_peer_is_killed_says_so_in_one_line(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "data.num_workers=1",
            "eval.images=4", "logging.image_every_steps=0", "logging.every_steps=2", "train.steps=5000"]  # fmt: skip
    cmd = train_command(colour_shards, run_dir, *tiny, launcher=accelerate_launch("cpu-ddp-2", 2))
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").is_file() or len(read_metrics(run_dir)) < 2:  # training steps
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.2)
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "trainer/main.py" in p.cmdline()]
        pids = {p.pid for p in trainers}
        (rank1,) = [p for p in trainers if p.ppid() not in pids and p.environ().get("RANK") == "1"]
        rank1.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("rank 0: ")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("rank 0: a peer process ended or stopped responding (") and lines[0].endswith(
        "); stopping"
    )
    assert f'File "{REPO / "trainer"}' not in err  # no rank's traceback: the only one is the launcher's own
    tracebacks = err.split("Traceback (most recent call last):")[1:]
    assert len(tracebacks) <= 1 and all("accelerate" in tb.splitlines()[1] for tb in tracebacks), err[-3000:]
