"""launch/slurm/ scripts on a real (local) Slurm: a job trains to the end; a preempted job checkpoints, requeues
itself, resumes from that step and finishes without training any step twice; a hung job is requeued likewise."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import read_metrics, run_bounded, train_command

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
CPU = {"NPROC_PER_NODE": "2", "WANDB_SILENT": "true"}


def submit(script: str, env: dict, out: Path, run_dir: Path, data: Path, *overrides: str, sbatch=()) -> str:
    """sbatch launch/slurm/<script> with the demo config's arguments; returns the job id."""
    args = train_command(data, run_dir, *overrides)[2:]  # drop `python trainer/main.py`
    cmd = ["sbatch", "--parsable", f"--output={out}/slurm-%j.out", *sbatch, f"launch/slurm/{script}", *args]
    result = run_bounded(cmd, timeout_s=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job(job_id: str, env: dict) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait_until(job_id: str, env: dict, done, timeout_s: int, what: str) -> dict[str, str]:
    """Poll the job until done(info) holds; fail after timeout_s naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job(job_id, env)
        if done(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id}: not {what} after {timeout_s} s (state {info['JobState']})")


def start_requeued_now(job_id: str, env: dict) -> None:
    """Let a job that a requeue has just made PENDING start now instead of in the ~2 minutes Slurm makes it wait.

    That wait is Slurm's guard, not a courtesy: killing the last attempt revoked the job's credential on the node,
    timestamped in whole seconds, and slurmd refuses a launch credential from that same second ("Job N already
    killed, do not launch batch job"; slurmctld: "Killing non-startable batch JobId=N: Job credential revoked"). The
    job then ends FAILED 1:0, Restarts 1, without running its next attempt. The revocation happened before the job
    showed PENDING, so a start more than a second after that is safe."""
    time.sleep(1.5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)


def finished(info: dict) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def trained_steps(run_dir: Path) -> list[int]:
    return (
        [r["step"] for r in read_metrics(run_dir) if "loss/g_total" in r]
        if (run_dir / "metrics.jsonl").exists()
        else []
    )


def test_one_node_job_trains_to_the_end(slurm_env, colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm_env, **CPU, "ACCELERATE_CONFIG": "launch/cpu-ddp-2.yaml"}
    job_id = submit("train-1node.sbatch", env, tmp_path, run_dir, colour_shards, "train.steps=6",
                    "logging.every_steps=3", "eval.images=8")  # fmt: skip
    info = wait_until(job_id, env, finished, 300, "finished")
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), output[-3000:]
    assert "training with ddp on 2 process(es)" in output
    assert trained_steps(run_dir) == [3, 6]
    assert (run_dir / "export" / "g_xy.safetensors").is_file()
    assert (run_dir / "logs" / f"slurm-{job_id}-restart0.log").is_file()


# One node with 2 DDP processes through the 1-node script; the multi-node script (srun + node-launch.sh, here on
# the one local node) with ZeRO-2, so the signal also travels through srun.
CASES = {"1node-ddp": ("train-1node.sbatch", "cpu-ddp-2"), "multinode-zero2": ("train-multinode.sbatch", "zero2")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_preempted_job_requeues_resumes_and_finishes(case, slurm_env, colour_shards, tmp_path):
    script, launch_config = CASES[case]
    run_dir, steps = tmp_path / "run", 60
    env = {**slurm_env, **CPU, "ACCELERATE_CONFIG": f"launch/{launch_config}.yaml"}
    job_id = submit(script, env, tmp_path, run_dir, colour_shards, f"train.steps={steps}", "logging.every_steps=1",
                    "checkpoint.every_steps=1000", "eval.images=8", sbatch=["--nodes=1"])  # fmt: skip

    wait_until(job_id, env, lambda info: len(trained_steps(run_dir)) >= 10 or finished(info), 300, "training")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    info = wait_until(job_id, env, lambda info: info["JobState"] == "PENDING" or finished(info), 300, "requeued")
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info
    start_requeued_now(job_id, env)
    info = wait_until(job_id, env, finished, 400, "finished")
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, output[-3000:])

    first = (run_dir / "logs" / f"slurm-{job_id}-restart0.log").read_text()
    second = (run_dir / "logs" / f"slurm-{job_id}-restart1.log").read_text()
    saved = int(re.search(r"preempted: saved \S+step_(\d+)", first).group(1))
    assert 10 <= saved < steps
    assert f"preempted at step {saved}; requeueing job {job_id}" in first
    assert "exit code 138" not in first  # the launcher survived the SIGUSR1 that srun delivers to the whole step
    assert re.search(rf"resuming from \S+step_{saved:08d} at step {saved}\b", second), second[-3000:]
    # Attempt 0 stopped right after saving `saved`; attempt 1 started after it: every step exactly once.
    assert trained_steps(run_dir) == list(range(1, steps + 1))
    assert not (run_dir / "PREEMPTED").exists()
    assert (run_dir / "export" / "g_xy.safetensors").is_file()


def test_a_hung_job_is_requeued_resumes_and_finishes(slurm_env, colour_shards, tmp_path):
    """Rank 1 of a 2-rank job frozen (SIGSTOP) after a checkpoint: rank 0's watchdog ends the attempt (RUN/HUNG,
    its stacks under RUN/diagnostics/), the job requeues itself like a preempted one, and the next attempt resumes
    from that checkpoint and finishes."""
    run_dir, steps = tmp_path / "run", 40
    env = {**slurm_env, **CPU, "ACCELERATE_CONFIG": "launch/cpu-ddp-2.yaml"}
    job_id = submit("train-1node.sbatch", env, tmp_path, run_dir, colour_shards, f"train.steps={steps}",
                    "logging.every_steps=1", "checkpoint.every_steps=10", "eval.images=0", "train.hang_timeout_s=20",
                    sbatch=["--nodes=1"])  # fmt: skip
    wait_until(job_id, env, lambda info: len(trained_steps(run_dir)) >= 12 or finished(info), 300, "training")
    rank_process(run_dir, 1).send_signal(signal.SIGSTOP)
    info = wait_until(job_id, env, lambda info: info["JobState"] == "PENDING" or finished(info), 180, "requeued")
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info
    start_requeued_now(job_id, env)
    info = wait_until(job_id, env, finished, 400, "finished")
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output[-3000:])
    first = (run_dir / "logs" / f"slurm-{job_id}-restart0.log").read_text()
    second = (run_dir / "logs" / f"slurm-{job_id}-restart1.log").read_text()
    hung = re.search(r"preemptible: the training hung \((\d+) rank 0: ([^)]+)\)", first)
    assert hung, first[-3000:]
    assert list((run_dir / "diagnostics").glob(f"hang-step{int(hung.group(1)):08d}-rank00000.txt"))
    assert re.search(r"resuming from \S+step_000000[1-3]0 at step [1-3]0\b", second), second[-3000:]
    assert max(trained_steps(run_dir)) == steps and not (run_dir / "HUNG").exists()


def rank_process(run_dir: Path, rank: int) -> psutil.Process:
    """The training process of `rank` writing into `run_dir` (Slurm starts it outside this process's tree)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if f"train.run_dir={run_dir}" in (proc.info["cmdline"] or []) and proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} training into {run_dir}")
