"""A frozen rank in a 2-rank DDP run (SIGSTOP: a bad node, a stalled driver): its peer's watchdog names the phase it
waited in, writes its stacks, and the job ends by itself within train.hang_timeout_s plus a bounded margin with the
requeue code; the same command then resumes from the last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO, accelerate_launch, kill_tree, read_metrics, run_bounded, train_command
from trainer.runtime.watchdog import DIAGNOSTICS, HANG_EXIT_CODE, HANG_MARKER

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]
HANG_S = 20  # the resumed run's start-up (loading, building, a resume) takes seconds on a busy machine
MARGIN_S = 60  # the watchdog's poll, torchrun stopping the frozen rank (SIGTERM, then SIGKILL after 30 s)


def rank_process(launcher: int, rank: int) -> psutil.Process:
    """The training process of `rank` among the launcher's descendants."""
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "trainer/main.py" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} under process {launcher}")


def test_a_frozen_rank_is_reported_by_its_peer_and_the_same_command_resumes(colour_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    cmd = train_command(colour_shards, run_dir, "train.steps=40", "checkpoint.every_steps=10", "eval.images=0",
                        "logging.every_steps=5", f"train.hang_timeout_s={HANG_S}",
                        launcher=accelerate_launch("cpu-ddp-2", 2))  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    frozen = None
    try:
        deadline = time.monotonic() + 240
        while not any("checkpoint/saved_step" in r for r in _records(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        frozen = rank_process(proc.pid, 1)
        frozen.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=HANG_S + MARGIN_S)
        took = time.monotonic() - stopped
    finally:
        kill_tree(proc.pid)
        if frozen is not None and frozen.is_running():  # torchrun kills it; if not, it must not outlive the test
            frozen.kill()
    output = log.read_text()
    assert took < HANG_S + MARGIN_S
    line = next(line for line in output.splitlines() if "rank 0: no progress for" in line)
    phase = re.search(r"in phase '([^']+)'", line).group(1)
    loop_phases = ("data", "generator step", "discriminator step", "metric window", "stop check", "checkpoint")
    assert phase.split(" > ")[0] in loop_phases, line
    assert line.endswith(f"exiting with code {HANG_EXIT_CODE} to be requeued"), line
    assert re.search(rf"exitcode\s*:\s*{HANG_EXIT_CODE}", output), output[-3000:]  # torchrun's summary of rank 0
    (report,) = (run_dir / DIAGNOSTICS).glob("hang-step*-rank00000.txt")
    text = report.read_text()
    assert f"in phase: {phase}" in text.splitlines()[0] and "trainer/train.py" in text
    assert (run_dir / HANG_MARKER).is_file()
    recorded = json.loads(report.with_suffix(".collectives.json").read_text())  # the flight recorder
    assert recorded["entries"] and all(c["profiling_name"].startswith("gloo:") for c in recorded["entries"])
    status = recorded["pg_status"]["0"]  # rank 0 waits in a collective that rank 1 never joined
    assert int(status["last_enqueued_collective"]) > int(status["last_completed_collective"]), status

    result = run_bounded(cmd, timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resuming from \S+step_000000[1-4]0 at step [1-4]0", result.stdout + result.stderr)
    assert max(r["step"] for r in read_metrics(run_dir) if "loss/g_total" in r) == 40
    assert not (run_dir / HANG_MARKER).exists() and (run_dir / "export" / "g_xy.safetensors").is_file()


def _records(run_dir) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []
