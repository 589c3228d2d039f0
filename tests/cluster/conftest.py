"""Fixtures for the cluster tests: the local Slurm of launch/local-slurm.sh and the two network-namespace nodes of
launch/netns-nodes.sh. Without them the tests skip, naming the command that starts them; with
CYCLEGAN_REQUIRE_CLUSTER=1 (set by .ci/run) they fail instead, so CI cannot pass by skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SLURM_CONF = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/cyclegan-local-slurm")) / "slurm.conf"
NODES = ("cgd-node0", "cgd-node1")
NODE0_IP = "10.200.0.1"


def unavailable(reason: str) -> None:
    if os.environ.get("CYCLEGAN_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"{reason} (CYCLEGAN_REQUIRE_CLUSTER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment for sbatch/scontrol against the local Slurm, once it answers with an idle node."""
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", str(SLURM_CONF))}
    if shutil.which("sbatch") is None or not Path(env["SLURM_CONF"]).is_file():
        unavailable("no local Slurm: start it with `sudo launch/local-slurm.sh start`")
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or not {"idle", "mixed", "allocated"} & set(state.stdout.split()):
        unavailable(f"the local Slurm has no usable node: {state.stdout.strip() or state.stderr.strip()}")
    return env


@pytest.fixture(scope="session")
def netns_nodes() -> tuple[str, ...]:
    """The names of the two namespace nodes, once both exist and we may enter them."""
    if os.geteuid() != 0:
        unavailable("the namespace nodes need root")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    if not all(any(line.split()[0] == node for line in listed.splitlines() if line.strip()) for node in NODES):
        unavailable("no namespace nodes: start them with `sudo launch/netns-nodes.sh up`")
    return NODES
