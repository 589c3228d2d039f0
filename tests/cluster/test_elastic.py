"""Elastic training on the two network-namespace nodes: launch/slurm/node-launch.sh with MIN_NODES=1 of 2 runs
torchrun with a c10d rendezvous. Killing every process of node 1 leaves node 0 training alone from the last
checkpoint, without a requeue; node 1 started again makes the job grow back to 2. A rendezvous that cannot reach
MIN_NODES fails within its timeout with one line, and a preempted elastic node checkpoints and stops."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import NODE0_IP
from tests.cluster.test_multinode import node_env
from tests.conftest import REPO, kill_tree, read_metrics, train_command
from trainer.runtime.preemption import PREEMPTED_MARKER

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]
# Node 1 rejoins within seconds of the shrink (at about step 20 here): the other steps leave node 0 alone a margin of
# over 100 updates to train before it, and the grown job trains the rest.
STEPS = 160


def start_node(node: str, env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", node, "env", *[f"{k}={v}" for k, v in env.items()],
           "launch/slurm/node-launch.sh", *args]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(node: str) -> None:
    """SIGKILL every process in the namespace: launcher, agent and the workers (torchrun gives each a session)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=30).stdout.split()
    subprocess.run(["kill", "-9", *pids], capture_output=True, timeout=30)


def wait_for(run_dir: Path, what: str, condition, procs: list[subprocess.Popen], timeout_s: float) -> list[dict]:
    """Poll metrics.jsonl until `condition(records)` holds; fail (killing everything) on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        if condition(records):
            return records
        time.sleep(0.2)
    for proc in procs:
        kill_tree(proc.pid)
    pytest.fail(f"no {what} within {timeout_s} s")


def world_sizes(records: list[dict]) -> list[int]:
    return [r["run/world_size"] for r in records if "run/world_size" in r]


def test_an_elastic_job_loses_a_node_keeps_training_and_grows_back(netns_nodes, colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_command(colour_shards, run_dir, f"train.steps={STEPS}", "logging.every_steps=5",
                         "checkpoint.every_steps=10", "eval.images=8", "distributed.timeout_s=60",
                         "train.hang_timeout_s=45")[2:]  # fmt: skip
    # OMP_NUM_THREADS=1: both "nodes" share this machine's 2 cores (accelerate would give each rank 2 threads)
    elastic = {
        "MIN_NODES": "1",
        "LAST_CALL_TIMEOUT": "3",
        "RDZV_TIMEOUT": "60",
        "MAX_RESTARTS": "2",
        "OMP_NUM_THREADS": "1",
    }
    envs = [{**node_env(rank, 2, NODE0_IP, 29531, "multinode-ddp"), **elastic} for rank in (0, 1)]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node0 = start_node(netns_nodes[0], envs[0], args, logs[0])
    procs = [node0, start_node(netns_nodes[1], envs[1], args, logs[1])]
    wait_for(run_dir, "checkpoint at step 10", lambda rs: any("checkpoint/saved_step" in r for r in rs), procs, 240)
    kill_node(netns_nodes[1])
    wait_for(run_dir, "world size 1", lambda rs: world_sizes(rs)[-1:] == [1], [node0], 180)
    rejoined = start_node(netns_nodes[1], envs[1], args, tmp_path / "node1-again.log")
    procs = [node0, rejoined]
    wait_for(run_dir, "world size 2 again", lambda rs: world_sizes(rs)[-1:] == [2] and len(world_sizes(rs)) == 3,
             procs, 180)  # fmt: skip
    logs[1] = tmp_path / "node1-again.log"
    for proc, log in zip(procs, logs):
        try:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            for other in procs:
                kill_tree(other.pid)
            pytest.fail("the elastic job did not finish")
    records = read_metrics(run_dir)
    assert world_sizes(records) == [2, 1, 2]
    shrink = [r for r in records if r.get("run/world_size") == 1][0]
    assert shrink["run/restarts"] == 1 and shrink["run/global_batch"] == 4  # 4 per rank x 1 rank
    steps = [r["step"] for r in records if "loss/g_total" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # every logged update once, up to the last
    assert (run_dir / "export" / "g_xy.safetensors").is_file()
    out = logs[0].read_text()
    assert "world size 2 -> 1 (agent restart 1)" in out and "world size 1 -> 2" in out
    # No traceback of ours. torch's elastic agent may log one of its own (each line prefixed "E1207 hh:mm:ss ..."):
    # the exit barrier's store, on node 0's agent, can be gone when node 1's agent reaches it; both still exit 0.
    assert not [line for line in logs[1].read_text().splitlines() if line.startswith("Traceback")]


def test_an_elastic_rendezvous_below_min_nodes_fails_within_its_timeout(netns_nodes, colour_shards, tmp_path):
    args = train_command(colour_shards, tmp_path / "run", "train.steps=2")[2:]
    env = {**node_env(0, 3, NODE0_IP, 29532, "multinode-ddp"), "MIN_NODES": "2", "RDZV_TIMEOUT": "10"}
    start = time.monotonic()
    proc = start_node(netns_nodes[0], env, args, tmp_path / "node0.log")
    assert proc.wait(timeout=120) != 0
    assert time.monotonic() - start < 60
    lines = (tmp_path / "node0.log").read_text().splitlines()
    assert (
        "node-launch: fewer than MIN_NODES=2 nodes reached the elastic rendezvous at 10.200.0.1:29532 within "
        "RDZV_TIMEOUT=10s" in lines
    )


def test_a_preempted_elastic_job_checkpoints_and_stops_instead_of_restarting(netns_nodes, colour_shards, tmp_path):
    """SIGUSR1 (Slurm's warning, forwarded by the batch script) to an elastic node: its agent stops the workers,
    which checkpoint, and ends; a worker that merely exited after its checkpoint would be restarted and train on."""
    run_dir = tmp_path / "run"
    args = train_command(colour_shards, run_dir, "train.steps=2000", "logging.every_steps=5",
                         "checkpoint.preempt_check_steps=1", "eval.images=0")[2:]  # fmt: skip
    env = {**node_env(0, 2, NODE0_IP, 29533, "multinode-ddp"), "MIN_NODES": "1", "LAST_CALL_TIMEOUT": "2",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = start_node(netns_nodes[0], env, args, tmp_path / "node0.log")
    wait_for(run_dir, "training", lambda rs: any("loss/g_total" in r for r in rs), [proc], 120)
    subprocess.run(["pkill", "-USR1", "-f", f"node-launch.sh --config configs/demo-cpu.yaml data.root={colour_shards}"])
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail("the preempted elastic node did not stop")
    marker = run_dir / PREEMPTED_MARKER
    assert marker.is_file(), (tmp_path / "node0.log").read_text()[-3000:]
    saved = int(marker.read_text())
    assert max(r["step"] for r in read_metrics(run_dir) if "loss/g_total" in r) <= saved < 2000  # no restart
    assert (run_dir / "checkpoints" / f"step_{saved:08d}" / "COMPLETE").is_file()
