"""Two network-namespace nodes without a shared path: each trains into a run directory of its own (as on nodes
with only local disks), checkpoints go to an S3 store (moto) served from the host side of the nodes' bridge. Node 1
is lost mid-run with its disk; the job started again resumes from the store on both nodes and finishes, with every
rank's file in the store's checkpoints. Without checkpoint.remote such a launch is refused at start in one line."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.cluster.conftest import NODE0_IP
from tests.cluster.test_elastic import kill_node, start_node
from tests.cluster.test_multinode import node_env, run_nodes
from tests.conftest import S3_CREDENTIALS, free_port, kill_tree, read_metrics, train_command

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]
HOST_IP = "10.200.0.254"  # the host's side of the nodes' bridge (launch/netns-nodes.sh)
STEPS = 16


@pytest.fixture
def bridge_store(netns_nodes):
    """(endpoint, s3fs filesystem) of a moto S3 server on the host side of the bridge, with bucket `nodes`."""
    pytest.importorskip("s3fs")
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST_IP, port=port, verbose=False)
    server.start()
    endpoint = f"http://{HOST_IP}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in S3_CREDENTIALS.items():
            env.setenv(key, value)
        filesystem = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        filesystem.mkdir("nodes")
        yield endpoint, filesystem
    server.stop()


def node_args(colour_shards, run_dir, *extra: str) -> list[str]:
    return train_command(colour_shards, run_dir, f"train.steps={STEPS}", "checkpoint.every_steps=4",
                         "logging.every_steps=4", "eval.images=8", "train.hang_timeout_s=30", *extra)[2:]  # fmt: skip


def test_nodes_with_their_own_run_directories_checkpoint_to_a_store_lose_a_node_and_resume(
    netns_nodes, bridge_store, colour_shards, tmp_path
):
    endpoint, store = bridge_store
    remote = "checkpoint.remote=s3://nodes/run"
    dirs = [tmp_path / f"node{rank}" / "run" for rank in (0, 1)]
    envs = [node_env(rank, 2, NODE0_IP, 29541, "multinode-ddp") | S3_CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint}
            for rank in (0, 1)]  # fmt: skip
    slow = {"CYCLEGAN_TEST_FAULT": "delay:data:1:0.4"}  # time to lose node 1 after the first checkpoint
    procs = [
        start_node(
            node, env | (slow if rank else {}), node_args(colour_shards, dirs[rank], remote), tmp_path / f"{rank}"
        )
        for rank, (node, env) in enumerate(zip(netns_nodes, envs))
    ]
    deadline = time.monotonic() + 300
    while not store.exists("nodes/run/checkpoints/step_00000004/COMPLETE"):
        store.invalidate_cache()
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for proc in procs:
                kill_tree(proc.pid)
            pytest.fail("no complete checkpoint in the store:\n" + (tmp_path / "0").read_text()[-3000:])
        time.sleep(0.2)
    kill_node(netns_nodes[1])
    shutil.rmtree(dirs[1].parent)  # node 1 and its disk are gone
    assert procs[0].wait(timeout=120) != 0  # node 0 fails without its peer
    first = json.loads(store.cat("nodes/run/checkpoints/step_00000004/COMPLETE"))
    assert {"rank_00000.safetensors", "rank_00001.safetensors", "units.safetensors", "train_state.json"} <= set(first)

    results = run_nodes(netns_nodes, envs, [node_args(colour_shards, d, remote) for d in dirs], timeout_s=400)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"node {rank}:\n{result.stderr[-3000:]}"
    resumed = [line for line in results[0].stdout.splitlines() if "resuming from" in line]
    assert resumed and f"resuming from {dirs[0] / 'checkpoints'}/step_0000000" in resumed[0]
    assert f"uploaded to s3://nodes/run: checkpoints to step_{STEPS:08d} and the final files" in results[0].stdout
    store.invalidate_cache()
    final = json.loads(store.cat(f"nodes/run/checkpoints/step_{STEPS:08d}/COMPLETE"))
    assert {"rank_00000.safetensors", "rank_00001.safetensors"} <= set(final)
    assert store.exists("nodes/run/export/g_xy.safetensors") and store.exists("nodes/run/metrics.jsonl")
    records = read_metrics(dirs[0])
    assert [r["run/replica_spread"] for r in records if "run/replica_spread" in r][-1] == 0.0
    leftovers = [p for p in (dirs[1] / "checkpoints").rglob("rank_00001.safetensors") if ".tmp" in p.parent.name]
    assert leftovers == []  # node 1 deletes its own files once they are in the store


def test_nodes_with_their_own_run_directories_need_a_store(netns_nodes, colour_shards, tmp_path):
    envs = [node_env(rank, 2, NODE0_IP, 29542, "multinode-ddp") for rank in (0, 1)]
    args = [train_command(colour_shards, tmp_path / f"node{rank}", "train.steps=2")[2:] for rank in (0, 1)]
    results = run_nodes(netns_nodes, envs, args, timeout_s=300)
    for result in results:
        assert result.returncode != 0
    assert (
        f"ranks 1 do not see the main rank's train.run_dir={tmp_path / 'node0'} (a directory on each node's own disk):"
        " set checkpoint.remote to an object store (s3://, gs://), or put the run directory on a filesystem every "
        "node shares"
    ) in results[0].stderr
