"""The launch scripts refuse bad settings with a one-line reason before starting anything."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_bounded

NODE_LAUNCH = ["bash", "launch/slurm/node-launch.sh", "--config", "configs/demo-cpu.yaml"]
GOOD = {"ACCELERATE_CONFIG": "launch/cpu-ddp-2.yaml", "NPROC_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}

BAD_NODE_SETTINGS = {
    "ACCELERATE_CONFIG": ("launch/nope.yaml", "ACCELERATE_CONFIG=launch/nope.yaml does not exist"),
    "NPROC_PER_NODE": ("two", "NPROC_PER_NODE=two must be a non-negative integer"),
    "MACHINE_RANK": ("1", "MACHINE_RANK=1 must be below NUM_MACHINES=1"),
    "MAIN_PROCESS_IP": ("no-such-host.invalid", "MAIN_PROCESS_IP=no-such-host.invalid does not resolve"),
    "NETWORK_INTERFACE": ("nope0", "NETWORK_INTERFACE=nope0 is not an interface"),
    "MIN_NODES": ("2", "MIN_NODES=2 must be between 1 and NUM_MACHINES=1"),
}


def test_elastic_mode_refuses_a_deepspeed_or_fsdp_launch_config():
    env = {**GOOD, "SLURM_NNODES": "2", "MIN_NODES": "1", "ACCELERATE_CONFIG": "launch/zero2.yaml"}
    result = run_bounded(NODE_LAUNCH, timeout_s=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "node-launch: elastic mode (MIN_NODES=1) launches with torchrun, which does not read "
        "ACCELERATE_CONFIG=launch/zero2.yaml; use a DDP config and choose the backend with "
        "distributed.backend=deepspeed or fsdp2 in the training config"
    )


@pytest.mark.parametrize("key", sorted(BAD_NODE_SETTINGS))
def test_node_launch_rejects_bad_settings(key):
    value, message = BAD_NODE_SETTINGS[key]
    result = run_bounded(NODE_LAUNCH, timeout_s=60, env={**GOOD, key: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"node-launch: {message}"), result.stderr


def test_preemptible_needs_a_launcher_and_trainer_arguments():
    result = run_bounded(["bash", "launch/slurm/preemptible.sh", "echo"], timeout_s=30)
    assert result.returncode == 2 and "usage: launch/slurm/preemptible.sh LAUNCHER... -- TRAINER_ARGS" in result.stderr


def test_preemptible_reports_an_unreadable_config():
    result = run_bounded(["bash", "launch/slurm/preemptible.sh", "echo", "--", "--config", "configs/nope.yaml"], 30)
    assert result.returncode == 2
    assert "config error: config file configs/nope.yaml does not exist" in result.stderr
    assert "preemptible: cannot read train.run_dir" in result.stderr


@pytest.mark.parametrize("script", ["train-1node.sbatch", "train-multinode.sbatch"])
def test_batch_scripts_refuse_to_run_outside_the_repository(script, tmp_path):
    result = run_bounded(["bash", str(REPO / "launch/slurm" / script), "--config", "x.yaml"], 30,
                         env={"REPO_DIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"{script.split('.')[0]}: submit from the repository root or set REPO_DIR"
