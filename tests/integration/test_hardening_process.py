"""The training CLI where issue 27 saw tracebacks or a wrong exit: W&B without an API key or a server, a stop signal
during start-up, and a run directory that cannot be created. No test contacts anything but 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port, kill_tree, read_metrics, run_bounded, train_command
from trainer.runtime.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "data.num_workers=1",
        "train.pool_size=4", "eval.images=4", "logging.image_every_steps=0", "logging.every_steps=2"]  # fmt: skip
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real one


def wandb_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any WANDB_* variable, with a fresh HOME (no ~/.netrc key) and a W&B server address
    on which nothing listens, so that W&B fails at once instead of reaching anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), WANDB_DIR=str(home), WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", **env, **extra}


def train(data: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_bounded(train_command(data, run_dir, *TINY, *extra), timeout_s=300, env=env, inherit_env=env is None)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_online_without_an_api_key_goes_on_offline_and_says_how_to_sync(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train(colour_shards, run_dir, "train.steps=2", "logging.wandb=online", env=wandb_env(tmp_path / "home"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "W&B did not start online" in line]
    assert line.startswith("warning: W&B did not start online (No API key configured.")
    assert f"`wandb sync {run_dir}/wandb/offline-run-*`" in line
    assert len(offline_runs(run_dir)) == 1 and (run_dir / "export").is_dir()


def test_wandb_online_without_an_api_key_and_fallback_stop_is_one_line(colour_shards, tmp_path):
    args = ["train.steps=2", "logging.wandb=online", "logging.wandb_fallback=stop"]
    result = train(colour_shards, tmp_path / "run", *args, env=wandb_env(tmp_path / "home"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logging.wandb=online: W&B did not start (No API key configured. Use `wandb login` to log in.); set "
        "logging.wandb_fallback=offline to go on offline, or logging.wandb=disabled to train without it"
    )


def test_a_refused_wandb_server_falls_back_offline_within_the_init_timeout(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = wandb_env(tmp_path / "home", WANDB_API_KEY=FAKE_KEY)
    args = ["train.steps=2", "logging.wandb=online", "logging.wandb_init_timeout_s=2"]
    started = time.monotonic()
    result = train(colour_shards, run_dir, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 100  # W&B's own default waits 90 s, then the run failed
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "W&B did not start online" in line]
    assert "connection refused" in line
    assert len(offline_runs(run_dir)) == 1


def test_losing_the_wandb_service_during_the_run_goes_on_without_wandb(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_command(colour_shards, run_dir, *TINY, "train.steps=6", "logging.wandb=offline")
    env = wandb_env(tmp_path / "home")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):  # W&B has started
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.05)
        services = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "wandb-core"]
        assert services, "no wandb-core process"
        for service in services:
            service.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert out.count("; going on without W&B (") == 1
    assert max(record["step"] for record in read_metrics(run_dir)) == 6


def signal_caught(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_preemption_signal_during_start_up_ends_with_the_requeue_code(colour_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = train_command(colour_shards, run_dir, *TINY, "train.steps=50", "checkpoint.preempt_check_steps=1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not signal_caught(proc.pid, sig):  # main.py's first action; before it the signal would kill
            assert time.monotonic() < deadline and proc.poll() is None, "no handler was installed"
            time.sleep(0.001)
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text(), "the handler came after torch"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in out.splitlines() if line.startswith("preempted:")]
    assert line == f"preempted: saved {run_dir}/checkpoints/step_00000001; exiting with code 75 to be requeued"
    assert (run_dir / PREEMPTED_MARKER).read_text() == "1\n"


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_a_run_dir_that_cannot_be_created_is_one_line_naming_the_key(colour_shards, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    run_dir = afile if where == "file" else afile / "run"
    result = train(colour_shards, run_dir, "train.steps=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: train.run_dir={run_dir} cannot be created ({afile} is not a directory); choose another train.run_dir"
    )
