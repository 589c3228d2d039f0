"""Every fenced command of README.md that can run on a CPU runs, in README order, in a scratch directory, so the
README cannot drift from the code. A few stand-ins make them small: the user's own data and runs (PATH/horse2zebra,
runs/horse2zebra, an Inception file) become tiny ones made here, and training runs a few steps. The
commands that need a cluster, root or a GPU are listed with the reason; a README command matched by no rule, or a
rule that matches no command, fails the test."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from shards.serve import ShardServer
from tests.conftest import REPO, free_port, run_bounded, write_tiny_inception

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NOT_HERE = {  # command prefix -> why this test does not run it
    "bash .ci/run": "the CI entry point itself: it runs this test",
    "ACCELERATE_CONFIG=": "sbatch: the cluster tests run the Slurm scripts on a local Slurm",
    "MIN_NODES=": "elastic sbatch on 4 nodes: tests/cluster/test_elastic.py runs node-launch.sh's elastic mode",
    "export SLURM_CONF=": "local Slurm: tests/cluster",
    "squeue;": "local Slurm: tests/cluster",
    "scontrol update": "local Slurm: tests/cluster",
    "sudo ": "root and network namespaces: tests/cluster",
    "bash benchmarks/gpu_wheels.sh": "downloads from PyPI into the repo: tests/integration/test_gpu_install.py",
    "python benchmarks/gpu_check.py": "needs CUDA; tests/integration/test_gpu_check.py runs its --dry mode",
    "python -m shards.serve": "serves until stopped; this test serves data/colour with its ShardServer instead",
}
STAND_INS = {  # what the README names -> what this test uses
    "pip install torch==2.13.0 && pip install -e . && ": "",  # installed already, exactly so, by .ci/run
    "PATH/horse2zebra": "{images}",
    "PATH/my-images": "{images}",
    "runs/horse2zebra": "runs/demo-cpu",
    "--step 50000": "--step 4",
    "--out /tmp/g": "--out exported-g",  # inside the scratch directory
    "~/inception-2015-12-05.pt": "{inception}",
    "/local/scratch/shards": "shard-cache",
    "http://node0:8000/": "{http}",  # data/colour served by shards.serve's server
    # s3://my-bucket/... stays: AWS_ENDPOINT_URL points at a moto S3 server with that bucket
}
SHORT_TRAINING = ["train.steps=4", "eval.every_steps=2", "eval.select=psnr", "eval.images=8", "logging.every_steps=2"]


def readme_commands() -> list[tuple[str, str]]:
    """("bash" or "python", command) for each command of the README's fenced bash and python blocks, in order."""
    text = (REPO / "README.md").read_text()
    commands = []
    for kind, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if kind == "python":
            commands.append((kind, body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a comment after the command
            if line and not line.startswith("#"):
                commands.append((kind, re.sub(r"\s+", " ", line)))
    return commands


def reference_layout(root: Path) -> Path:
    """trainA/ trainB/ testA/ testB/ with a few small images, as the reference repository lays out data sets."""
    rng = np.random.default_rng(0)
    for folder in ("trainA", "trainB", "testA", "testB"):
        (root / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_every_readme_command_that_can_run_on_a_cpu_runs(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("trainer", "shards", "configs", "launch"):
        (scratch / name).symlink_to(REPO / name)
    images = reference_layout(tmp_path / "horse2zebra")
    inception = write_tiny_inception(tmp_path / "inception.pt")
    env = {"CYCLEGAN_DATA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    with s3_bucket("my-bucket") as s3_env, ShardServer(scratch / "data" / "colour") as http:
        ran = run_readme(scratch, images, inception, http.url, {**env, **s3_env})
    print("ran:\n" + "\n".join(ran))
    assert len(ran) >= 15


@contextlib.contextmanager
def s3_bucket(name: str) -> Iterator[dict[str, str]]:
    """The environment of a moto S3 server on loopback holding an empty bucket `name`."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)  # fmt: skip
        yield env
    finally:
        server.stop()


def run_readme(scratch: Path, images: Path, inception: Path, http: str, env: dict[str, str]) -> list[str]:
    """Run the README's commands (see the module docstring) in `scratch`; returns those that ran."""
    unused_skips, unused_stand_ins = set(NOT_HERE), set(STAND_INS)
    ran = []
    for kind, command in readme_commands():
        skip = next((prefix for prefix in NOT_HERE if command.startswith(prefix)), None)
        if skip is not None:
            unused_skips.discard(skip)
            continue
        for old, new in STAND_INS.items():
            if old in command:
                unused_stand_ins.discard(old)
                command = command.replace(old, new.format(images=images, inception=inception, http=http))
        if kind == "python":
            argv = [sys.executable, "-c", command]
        elif "trainer/main.py" in command:  # python or accelerate launch
            words = command.split()
            argv = [sys.executable if words[0] == "python" else words[0], *words[1:], *SHORT_TRAINING]
        elif command.startswith("python "):
            argv = [sys.executable, *command.split()[1:]]
        else:
            argv = command.split()
        result = run_bounded(argv, timeout_s=300, env={**env, "HOME": os.environ.get("HOME", "/root")}, cwd=scratch)
        assert result.returncode == 0, f"README command failed: {command}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert not unused_skips and not unused_stand_ins, (unused_skips, unused_stand_ins)  # rules the README outgrew
    return ran
