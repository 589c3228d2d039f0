"""Two "nodes" (network namespaces joined by a veth pair) x 1 process train the demo config through
launch/slurm/node-launch.sh, the command each srun task of launch/slurm/train-multinode.sbatch runs, with the
variables Slurm and that script give it. Misconfigured launches fail within a bounded time with a one-line reason."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.cluster.conftest import NODE0_IP
from tests.conftest import REPO, kill_tree, read_metrics, train_command

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]


def node_env(rank: int, nnodes: int, main_ip: str, port: int, launch_config: str) -> dict[str, str]:
    """What srun and train-multinode.sbatch hand node-launch.sh on node `rank`."""
    return {
        "SLURM_NNODES": str(nnodes),
        "SLURM_NODEID": str(rank),
        "SLURM_JOB_ID": "4242",
        "MAIN_PROCESS_IP": main_ip,
        "MAIN_PROCESS_PORT": str(port),
        "ACCELERATE_CONFIG": f"launch/{launch_config}.yaml",
        "NPROC_PER_NODE": "1",
        "NETWORK_INTERFACE": "cgd0",
        "RDZV_TIMEOUT": "15",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def run_nodes(
    nodes, envs: list[dict], args: list[str] | list[list[str]], timeout_s: int
) -> list[subprocess.CompletedProcess]:
    """Start node-launch.sh in each namespace at once (with the same arguments, or a list per node); wait for all
    (killing everything after timeout_s)."""
    procs = []
    per_node = args if args and isinstance(args[0], list) else [args] * len(nodes)
    for node, env, node_args in zip(nodes, envs, per_node):
        cmd = ["ip", "netns", "exec", node, "env", *[f"{k}={v}" for k, v in env.items()],
               "launch/slurm/node-launch.sh", *node_args]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))  # fmt: skip
    deadline, results = time.monotonic() + timeout_s, []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                kill_tree(other.pid)
            pytest.fail(f"the nodes did not finish within {timeout_s} s")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("launch_config,backend", [("multinode-ddp", "ddp"), ("zero2", "zero2")])
def test_two_nodes_train_with_equal_weights(launch_config, backend, netns_nodes, colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_command(colour_shards, run_dir, "train.steps=6", "logging.every_steps=3",
                         "checkpoint.every_steps=3", "eval.images=8")[2:]  # fmt: skip
    envs = [node_env(rank, 2, NODE0_IP, 29511, launch_config) for rank in (0, 1)]
    results = run_nodes(netns_nodes, envs, args, timeout_s=400)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"node {rank}:\n{result.stderr[-3000:]}"
        assert f"--num_machines 2 --machine_rank {rank} --num_processes 2 --main_process_ip {NODE0_IP}" in result.stdout
    assert f"training with {backend} on 2 process(es)" in results[0].stdout
    records = read_metrics(run_dir)
    assert records[0]["run/world_size"] == 2
    # At each checkpoint both nodes' weights were fingerprinted and compared: identical on both nodes.
    assert [(r["step"], r["run/replica_spread"]) for r in records if "run/replica_spread" in r] == [(3, 0.0), (6, 0.0)]
    assert [r["data/samples_read"] for r in records if "loss/g_total" in r][-1] == 6 * 2 * 4 * 2
    assert (run_dir / "export" / "g_xy.safetensors").is_file()


def test_wrong_main_process_address_fails_fast_with_a_reason(netns_nodes, colour_shards, tmp_path):
    args = train_command(colour_shards, tmp_path / "run", "train.steps=2")[2:]
    envs = [node_env(0, 2, NODE0_IP, 29512, "multinode-ddp"), node_env(1, 2, "10.200.0.99", 29512, "multinode-ddp")]
    start = time.monotonic()
    results = run_nodes(netns_nodes, envs, args, timeout_s=180)
    assert time.monotonic() - start < 120
    assert [r.returncode != 0 for r in results] == [True, True]
    assert "node-launch: node 0: only 1/2 nodes reached the rendezvous at 10.200.0.1:29512" in results[0].stderr
    assert "node-launch: node 1: cannot reach the main process at 10.200.0.99:29512" in results[1].stderr


def test_nodes_disagreeing_on_the_world_size_fail_with_a_reason(netns_nodes, colour_shards, tmp_path):
    # Node 1 believes the job has 3 nodes: torch's rendezvous lets it in (and would hang at exit); the engine refuses.
    args = train_command(colour_shards, tmp_path / "run", "train.steps=2")[2:]
    envs = [node_env(0, 2, NODE0_IP, 29513, "multinode-ddp"), node_env(1, 3, NODE0_IP, 29513, "multinode-ddp")]
    results = run_nodes(netns_nodes, envs, args, timeout_s=180)
    for result in results:
        assert result.returncode != 0
        assert "disagree on its shape: ranks were told num_machines=[2, 3]" in result.stderr
