"""What can go wrong around a run directory on a shared cluster: a full disk, a torn metrics line, a second training
on the same run directory, checkpoints planted with pickles, and a run whose losses turn NaN."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shards.manifest import sha256_file
from tests.conftest import REPO, accelerate_launch, kill_tree, read_metrics, run_bounded, train_command
from trainer.checkpoint.format import COMPLETE, UNIVERSAL, verify_checkpoint

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "data.num_workers=1",
        "train.pool_size=4", "eval.images=4", "logging.image_every_steps=0", "logging.every_steps=2"]  # fmt: skip


def train(data: Path, run_dir: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_bounded(train_command(data, run_dir, *TINY, *extra, launcher=launcher))


@pytest.fixture()
def small_disk(tmp_path):
    """A 640 KiB tmpfs (needs root; skipped without, failed under CI's CYCLEGAN_REQUIRE_CLUSTER=1)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        if os.environ.get("CYCLEGAN_REQUIRE_CLUSTER") == "1":
            pytest.fail("the full-disk test needs root to mount a tmpfs (CYCLEGAN_REQUIRE_CLUSTER=1)")
        pytest.skip("the full-disk test needs root to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_once_there_is_room(colour_shards, small_disk):
    run_dir = small_disk / "run"
    args = ["train.steps=6", "checkpoint.every_steps=2", "checkpoint.keep=1", "train.precision=fp32"]
    full = train(colour_shards, run_dir, *args)
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    previous = run_dir / "checkpoints" / "step_00000002"
    assert last.startswith("error: cannot save checkpoint step_00000004: No space left on device (")
    assert last.endswith(f"; {previous} is still the newest intact checkpoint"), last
    assert "Traceback" not in full.stderr
    verify_checkpoint(previous)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = train(colour_shards, run_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {previous} at step 2" in resumed.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000006"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(colour_shards, run_dir, "train.steps=4", "checkpoint.every_steps=2").returncode == 0
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss/g_tot')  # what a full disk or a crash mid-write leaves
    resumed = train(colour_shards, run_dir, "train.steps=6", "checkpoint.every_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "metrics.jsonl: dropped 1 torn line(s) that an interrupted write left" in resumed.stdout
    assert sorted(r["step"] for r in read_metrics(run_dir) if "loss/g_total" in r) == [2, 4, 6]


def test_a_second_training_on_the_same_run_dir_is_refused_and_a_dead_holder_is_taken_over(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(colour_shards, run_dir, *TINY, "train.steps=5000"),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
            assert time.monotonic() < deadline and first.poll() is None, "the first training did not start"
            time.sleep(0.3)
        config = (run_dir / "config.yaml").read_text()
        # the second one on 2 ranks: both must stop, and nothing in the run directory changes
        second = train(
            colour_shards, run_dir, "train.steps=3", "model.ngf=8", launcher=accelerate_launch("cpu-ddp-2", 2)
        )
        assert second.returncode != 0
        assert f"is in use by another training (host {os.uname().nodename} pid {first.pid} since" in second.stderr
        assert f'File "{REPO / "trainer"}' not in second.stderr  # no rank's traceback (the launcher has its own)
        assert (run_dir / "config.yaml").read_text() == config
    finally:
        kill_tree(first.pid)  # SIGKILL: the holder dies without releasing the lock
    third = train(colour_shards, run_dir, "train.steps=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"the last training there (host {os.uname().nodename} pid {first.pid} since" in third.stdout
    assert "ended without releasing it; taking over" in third.stdout
    assert (run_dir / ".lock").read_text() == ""  # released at the end


class Planted:
    """A pickle that creates a marker file when unpickled, as a hostile checkpoint would run any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_never_unpickles_what_deepspeed_or_accelerate_would_load(colour_shards, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "UNPICKLED"
    zero2 = ["distributed.backend=deepspeed", "distributed.zero_stage=2", "train.precision=fp32"]
    assert train(colour_shards, run_dir, "train.steps=2", *zero2).returncode == 0
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    payload = pickle.dumps(Planted(marker))
    for name in (
        "pytorch_model/mp_rank_00_model_states.pt",  # DeepSpeed's loader: torch.load(weights_only=False)
        "pytorch_model/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "pytorch_model_1/mp_rank_00_model_states.pt",
        "random_states_0.pkl",  # Accelerate's RNG states
        "optimizer.bin",
        "scheduler.bin",
        "rank_00000.pt",  # this project's rank state before it became safetensors
    ):
        (checkpoint / name).parent.mkdir(exist_ok=True)
        (checkpoint / name).write_bytes(payload)
    hashes = {str(p.relative_to(checkpoint)): sha256_file(p) for p in checkpoint.rglob("*") if p.is_file()}
    (checkpoint / COMPLETE).write_text(json.dumps({k: v for k, v in hashes.items() if k != COMPLETE}))  # re-hashed
    resumed = train(colour_shards, run_dir, "train.steps=4", *zero2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} at step 2" in resumed.stdout
    assert not marker.exists()
    pickle.loads(payload)  # the planted files were live: loading one runs its code
    assert marker.exists()


def test_a_run_whose_losses_stay_nan_stops_with_one_line_and_keeps_its_checkpoint(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    diverging = ["optimizer.lr=1e30", "train.steps=100", "train.max_nonfinite_steps=3", "checkpoint.every_steps=2"]
    result = train(colour_shards, run_dir, *diverging)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the generators skipped 3 consecutive updates with a NaN or")
    assert "(train.max_nonfinite_steps=3); the newest checkpoint, " in last and "Traceback" not in result.stderr
    assert not (run_dir / "export").exists()
    skipped = [r["loss/nonfinite_g"] for r in read_metrics(run_dir) if "loss/nonfinite_g" in r]
    assert skipped and skipped[-1] >= 1
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    verify_checkpoint(checkpoint)
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / UNIVERSAL)).values())
