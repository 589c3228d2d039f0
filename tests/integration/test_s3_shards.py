"""Shards on an S3-compatible store: moto's standalone server on loopback holds the colour shards (uploaded with
shards.upload); credentials and the endpoint come from environment variables only. The loader gives the local
batches and resumes mid-epoch; a training run on s3:// logs exactly the losses of the same run on the local
directory, evaluates on the store's test split, and resumes from its checkpoint."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, free_port, read_metrics, run_bounded, train_command
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
EXACT = dict(load_size=32, crop_size=32, flip=False)


@pytest.fixture(scope="module")
def store(colour_shards):
    """The endpoint URL of a moto S3 server whose bucket `shards` holds colour_shards under colour/."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("shards")
        upload = [sys.executable, "-m", "shards.upload", str(colour_shards), "s3://shards/colour"]
        first = subprocess.run([*upload, "--s3-endpoint-url", endpoint], cwd=REPO, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[-1] == "s3://shards/colour: 9 file(s) uploaded, manifest last"
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
        again = subprocess.run(upload, cwd=REPO, capture_output=True, text=True, env=env)  # all again, manifest last
        assert again.stdout.splitlines()[-2].startswith("uploaded manifest.json (")
        anonymous = {k: v for k, v in env.items() if not k.startswith("AWS_")} | {"AWS_ENDPOINT_URL": endpoint}
        refused = subprocess.run(upload, cwd=REPO, capture_output=True, text=True, env=anonymous)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("shards.upload: NoCredentialsError: Unable to locate credentials")
        yield endpoint
    server.stop()


def batches(cfg: DataConfig, count: int, state: dict | None = None):
    loader = UnpairedLoader(cfg, batch_size=4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    if state is not None:
        loader.load_state_dict(state)
    return [{d: b[d].clone() for d in ("x", "y")} for b in itertools.islice(loader, count)], loader


def test_an_s3_root_gives_the_local_batches_and_resumes_mid_epoch(colour_shards, store):
    local = DataConfig(root=str(colour_shards), num_workers=2, **EXACT)
    remote = DataConfig(root="s3://shards/colour", s3_endpoint_url=store, num_workers=2, **EXACT)
    expected, _ = batches(local, 8)
    first, loader = batches(remote, 3)
    rest, _ = batches(remote, 5, state=loader.state_dict())
    for got, want in zip(first + rest, expected, strict=True):
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])


@pytest.mark.slow
def test_training_on_s3_logs_the_local_losses_and_resumes(colour_shards, store, tmp_path):
    args = ["train.steps=4", "checkpoint.every_steps=2", "logging.every_steps=1", "eval.every_steps=4",
            "eval.images=8", "model.ngf=8", "model.ndf=8", "train.precision=fp32",
            "logging.image_every_steps=0"]  # fmt: skip
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": store}
    local = run_bounded(train_command(colour_shards, tmp_path / "local", *args))
    assert local.returncode == 0, local.stderr[-3000:]
    remote = run_bounded(train_command("s3://shards/colour", tmp_path / "s3", *args), env=env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    keys = ("loss/g_total", "loss/d_total", "eval/psnr_g_xy")
    rows = [[{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / run)] for run in ("local", "s3")]
    assert rows[0] == rows[1] and any("eval/psnr_g_xy" in r for r in rows[0])
    assert [r["loss/g_total"] > 0 for r in rows[0] if "loss/g_total" in r] == [True] * 4
    resumed = run_bounded(train_command("s3://shards/colour", tmp_path / "s3", "train.steps=6", *args[1:]), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {tmp_path / 's3' / 'checkpoints'}" in resumed.stdout and "at step 4" in resumed.stdout
    assert read_metrics(tmp_path / "s3")[-1]["step"] == 6
