"""Checkpoints in object storage (checkpoint.remote) against moto's S3 server on loopback: a node lost after a
checkpoint reached the store (its run directory gone) continues on a fresh node from the store and ends with the
weights of an uninterrupted run; a kill during an upload leaves the previous complete checkpoint, which the fresh
node resumes from; the export, metrics.jsonl and config.yaml are uploaded at the end; missing credentials are one
line at start; a store that is away for a while delays the uploads, not the training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, S3_CREDENTIALS, eventually, kill_tree, read_metrics, run_bounded, train_command
from tests.integration.test_save_faults import TINY, reference, weights  # noqa: F401 (reference: a fixture)
from trainer.runtime.faults import ENV

UPLOAD_CRASH = "tests/integration/crash_during_upload.py"


@pytest.mark.parametrize(
    "phase,resumed", [("after-latest", "step_00000004"), ("before-complete", "step_00000002")]
)  # fmt: skip
def test_a_lost_node_continues_on_a_fresh_one_from_the_store(
    phase,
    resumed,
    reference,  # noqa: F811 (test_save_faults' fixture)
    colour_shards,
    s3_server,
    tmp_path,
):
    remote = f"{s3_server.bucket(f'lost-{phase}')}/run"
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint}
    lost, fresh = tmp_path / "lost-node", tmp_path / "fresh-node"
    command = train_command(colour_shards, lost, *TINY, f"checkpoint.remote={remote}")
    crashed = run_bounded([sys.executable, UPLOAD_CRASH, phase, "4", *command[2:]], env=env)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    shutil.rmtree(lost)  # the node and its local disk are gone

    result = run_bounded(train_command(colour_shards, fresh, *TINY, f"checkpoint.remote={remote}"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"downloaded {remote}/checkpoints/{resumed} (verified) to continue from" in result.stdout
    assert f"resuming from {fresh / 'checkpoints' / resumed} at step {int(resumed[5:])}" in result.stdout
    final = weights(fresh)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)

    assert result.stdout.splitlines()[-1] == f"uploaded to {remote}: checkpoints to step_00000008 and the final files"
    bucket = remote.removeprefix("s3://")
    stored = sorted(name.removeprefix(bucket + "/") for name in s3_server.filesystem().find(bucket))
    checkpoint = ["COMPLETE", "rank_00000.safetensors", "train_state.json", "units.safetensors"]
    exported = ["COMPLETE", "g_xy.safetensors", "g_yx.safetensors", "model.json"]
    # keep=1: the store is rotated like the run directory; the interrupted upload is gone
    assert stored == sorted(
        [
            "checkpoints/latest",
            *(f"checkpoints/step_00000008/{name}" for name in checkpoint),
            "config.yaml",
            "metrics.jsonl",
            *(f"export/{name}" for name in exported),
            *(f"export/raw/{name}" for name in exported),
        ]
    )  # fmt: skip
    lags = [r["checkpoint/upload_lag_steps"] for r in read_metrics(fresh) if "checkpoint/upload_lag_steps" in r]
    assert lags and all(lag >= 2 for lag in lags)  # each save is at least one checkpoint ahead of the store


def test_missing_credentials_are_one_line_at_start(colour_shards, s3_server, tmp_path):
    remote = f"{s3_server.bucket('credentials')}/run"
    env = {key: "" for key in S3_CREDENTIALS} | {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_CONFIG_FILE": "/dev/null",
                                                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}  # fmt: skip
    result = run_bounded(train_command(colour_shards, tmp_path / "run", *TINY, f"checkpoint.remote={remote}"), env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: checkpoint.remote={remote}: cannot list the store (NoCredentialsError")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_goes_on_while_the_store_is_down_and_uploads_catch_up(colour_shards, s3_server, tmp_path):
    remote = f"{s3_server.bucket('training-downtime')}/run"
    run_dir = tmp_path / "run"
    steps = ["train.steps=16", "checkpoint.every_steps=2", "logging.every_steps=2"]
    command = train_command(colour_shards, run_dir, *TINY, *steps, f"checkpoint.remote={remote}")
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_MAX_ATTEMPTS": "1",
        "PYTHONUNBUFFERED": "1",
        ENV: "delay:data:0:0.25",
    }  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    store = s3_server.filesystem()
    try:
        assert eventually(
            lambda: store.invalidate_cache() or store.exists(f"{remote}/checkpoints/step_00000002/COMPLETE"), 120
        )
        s3_server.server.stop()
        try:
            assert eventually(lambda: any(r.get("checkpoint/saved_step", 0) >= 10 for r in read_metrics(run_dir)), 120)
        finally:
            s3_server.server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert "warning: uploading checkpoint step_0000000" in out and "failed (cannot " in out
    assert f"warning: checkpoint uploads to {remote} are 3 checkpoints behind" in out
    assert f"checkpoint uploads to {remote} caught up" in out
    assert out.splitlines()[-1] == f"uploaded to {remote}: checkpoints to step_00000016 and the final files"
    lags = [r["checkpoint/upload_lag_steps"] for r in read_metrics(run_dir) if "checkpoint/upload_lag_steps" in r]
    assert max(lags) >= 8 and lags[0] == 2  # the store fell behind while away
    assert store.exists(f"{remote}/checkpoints/step_00000016/COMPLETE") and store.exists(f"{remote}/metrics.jsonl")
