"""trainer.process_exit.exit_process against the way a gloo worker thread can abort a finished process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, kill_tree, run_bounded

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
