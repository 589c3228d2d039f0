"""Checkpoints on real 2-rank runs: bitwise exact resume (synchronous and asynchronous saves), kill -9 at random
moments, preemption by SIGUSR1, resume on another world size and backend, damaged checkpoints, export."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, accelerate_launch, kill_tree, read_metrics, run_bounded, train_command
from trainer.checkpoint.format import COMPLETE, UNIVERSAL, rank_file
from trainer.checkpoint.state_file import load_state_file
from trainer.runtime.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

TINY = [
    "model.ngf=4",
    "model.ndf=4",
    "model.n_blocks=1",
    "train.batch_size=2",
    "train.precision=fp32",
    "data.load_size=36",
    "data.crop_size=32",
    "data.rotation_deg=10",
    "data.num_workers=1",
    "train.pool_size=4",
    "eval.images=4",
    "logging.every_steps=2",
    "logging.image_every_steps=0",
]


def command(launch_config: str | None, data: Path, run_dir: Path, *extra: str) -> list[str]:
    prefix = [sys.executable] if launch_config is None else accelerate_launch(launch_config, 2)
    return train_command(data, run_dir, *TINY, *extra, launcher=prefix)


def train(launch_config: str | None, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_bounded(command(launch_config, data, run_dir, *extra), timeout_s=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(run_dir: Path) -> dict[int, dict]:
    records = read_metrics(run_dir)
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/g_total" in r}


def units(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / UNIVERSAL))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any(k.endswith(".exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_resume_is_bitwise_exact(saving, colour_shards, tmp_path):
    """Through the whole trainer on 2 DDP ranks (data positions, pools, RNG; the resume matrix checks that every
    backend continues exactly on its own topology)."""
    launch_config = "cpu-ddp-2"
    straight = tmp_path / "straight"
    mode = f"checkpoint.async_save={saving == 'async'}"
    train(launch_config, colour_shards, straight, "train.steps=12", "checkpoint.every_steps=6", "checkpoint.keep=5",
          mode)  # fmt: skip
    # The second run starts from the first run's half-way checkpoint, in new processes.
    resumed = tmp_path / "resumed"
    half = straight / "checkpoints" / "step_00000006"
    train(launch_config, colour_shards, resumed, "train.steps=12", "checkpoint.every_steps=6", f"train.resume={half}",
          mode)  # fmt: skip
    final = "checkpoints/step_00000012"
    assert_identical(units(straight / final), units(resumed / final))  # weights and Adam moments of both units
    assert {s: v for s, v in losses(straight).items() if s > 6} == losses(resumed)  # the loss curve
    for rank in (0, 1):  # image pools, data positions and RNG
        a = load_state_file(straight / final / rank_file(rank))
        b = load_state_file(resumed / final / rank_file(rank))
        assert a["data"]["slots"] == b["data"]["slots"]
        assert len(a["pool_x"]["images"]) == 4
        assert all(torch.equal(x, y) for x, y in zip(a["pool_x"]["images"], b["pool_x"]["images"]))
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_cut_resume_is_bitwise_exact(colour_shards, tmp_path):
    """FastCUT with the identity term: the flip coins and patch locations come from each rank's RNG, which the
    checkpoint holds, so the resumed run draws what the straight one drew."""
    cut = ("model.family=fastcut", "model.nce_identity=true", "model.nce_mlp_channels=8", "model.nce_patches=8",
           "train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep=5")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train("cpu-ddp-2", colour_shards, straight, *cut)
    train("cpu-ddp-2", colour_shards, resumed, *cut, f"train.resume={straight / 'checkpoints' / 'step_00000004'}")
    final = "checkpoints/step_00000008"
    saved = units(straight / final)
    assert any(key.startswith("g/head.") for key in saved)
    assert_identical(saved, units(resumed / final))
    straight_losses = losses(straight)
    assert {s: v for s, v in straight_losses.items() if s > 4} == losses(resumed)
    assert "loss/nce_y" in straight_losses[8] and "loss/cycle_x" not in straight_losses[8]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_finish_equals_an_uninterrupted_run(colour_shards, tmp_path):
    steps = ["train.steps=120", "checkpoint.every_steps=4", "checkpoint.keep=2", "logging.every_steps=4"]
    reference = tmp_path / "reference"
    train("cpu-ddp-2", colour_shards, reference, *steps)
    run_dir = tmp_path / "killed"
    rng = random.Random(7)
    targets = sorted(rng.sample(range(8, 110, 4), 5))  # kill after these checkpoints: mid-step, or mid-save
    for attempt, target in enumerate(targets):
        proc = subprocess.Popen(
            command("cpu-ddp-2", colour_shards, run_dir, *steps),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 180
        while not (latest.is_file() and int(latest.read_text().split("_")[1]) >= target):
            assert time.monotonic() < deadline and proc.poll() is None, f"run stopped before step {target}"
            time.sleep(0.05)
        if attempt % 2:  # during a save: as soon as the next checkpoint's temporary directory appears
            while not list((run_dir / "checkpoints").glob("*.tmp")):
                assert time.monotonic() < deadline and proc.poll() is None, "no save started"
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        kill_tree(proc.pid)  # every rank, not only the launcher
        proc.wait()
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        print(f"kill {attempt} after step {target}: {names}")
    final = "checkpoints/step_00000120"
    assert not (run_dir / final).exists(), "the kills came too late to interrupt the run"
    train("cpu-ddp-2", colour_shards, run_dir, *steps)
    assert_identical(units(reference / final), units(run_dir / final))
    for name in ("g_xy", "g_yx"):
        a, b = (
            load_file(str(reference / "export" / f"{name}.safetensors")),
            load_file(str(run_dir / "export" / f"{name}.safetensors")),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(losses(run_dir)) == list(range(4, 121, 4))  # every logged step once


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks: direct children of the launcher that run trainer/main.py (not the loader workers)."""
    children = psutil.Process(launcher.pid).children(recursive=True)
    ranks = [
        p
        for p in children
        if "trainer/main.py" in " ".join(p.cmdline())
        and p.parent().pid not in {c.pid for c in children if "trainer/main.py" in " ".join(c.cmdline())}
    ]
    return ranks


def test_sigusr1_saves_exits_with_the_preemption_code_and_resumes(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.steps=400", "checkpoint.every_steps=0", "checkpoint.preempt_check_steps=2"]
    proc = subprocess.Popen(
        command("cpu-ddp-2", colour_shards, run_dir, *args),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.5)
        ranks = rank_processes(proc)
        assert len(ranks) == 2
        for rank in ranks:
            rank.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        for rank in ranks:  # a second signal during the save changes nothing
            if rank.is_running():
                rank.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        kill_tree(proc.pid)
    # Each rank exits with PREEMPTED_EXIT_CODE (see the single-process test); torchrun reports that as a failed
    # launch, so job scripts read the marker file.
    assert proc.returncode != 0
    step = int((run_dir / PREEMPTED_MARKER).read_text())
    assert 4 <= step < 400 and step % 2 == 0
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / COMPLETE).is_file()
    assert "preempted: saved" in out
    train("cpu-ddp-2", colour_shards, run_dir, "train.steps=" + str(step + 4), "checkpoint.preempt_check_steps=2")
    assert not (run_dir / PREEMPTED_MARKER).exists()
    assert max(losses(run_dir)) == step + 4


def test_single_process_preemption_exit_code(colour_shards, tmp_path):
    """SIGTERM to the whole process group, as torchelastic and Slurm send it: the loader workers ignore it and the
    training process saves and exits with the preemption code (the workers used to die first, failing the run)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        command(None, colour_shards, run_dir, "train.steps=400", "checkpoint.preempt_check_steps=1"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 1:
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, proc.stderr.read()[-3000:]
    assert (run_dir / PREEMPTED_MARKER).is_file()


@pytest.mark.parametrize("sharded", ["zero3", "fsdp2"])
def test_a_sharded_run_resumes_on_one_ddp_rank_and_back(sharded, colour_shards, tmp_path):
    """2 sharded ranks -> 1 DDP rank -> 2 sharded ranks, one run directory: each resume re-partitions the last
    checkpoint, and the loss curve continues from where it was rather than from an untrained model's level."""
    run_dir = tmp_path / "run"
    common = ["logging.every_steps=1", "schedule.kind=constant", "optimizer.lr_scaling=none"]  # full steps at once
    train(sharded, colour_shards, run_dir, "train.steps=6", "checkpoint.every_steps=6", *common)
    before = losses(run_dir)
    for launch_config, steps in ((None, 8), (sharded, 10)):
        result = train(launch_config, colour_shards, run_dir, f"train.steps={steps}", *common)
        assert result.stdout.count("weights and optimizer state re-partitioned") == 1  # the main rank says it once
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 11))
    untrained = before[1]["loss/g_total"]
    for step in (7, 8, 9, 10):
        assert (
            abs(after[step]["loss/g_total"] - before[6]["loss/g_total"])
            < 0.5 * abs(untrained - before[6]["loss/g_total"]) + 0.5
        )
    saved = units(run_dir / "checkpoints" / "step_00000010")
    for export, unit in ((run_dir / "export", "g_ema"), (run_dir / "export" / "raw", "g")):  # the demo's EMA is on
        exported = load_file(str(export / "g_xy.safetensors"))
        names = {k[len(f"{unit}/g_xy.") :] for k in saved if k.startswith(f"{unit}/g_xy.") and "exp_avg" not in k}
        assert exported.keys() == names and all(torch.equal(exported[k], saved[f"{unit}/g_xy.{k}"]) for k in names)


def test_damaged_checkpoint_falls_back_or_fails_clearly(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(None, colour_shards, run_dir, "train.steps=4", "checkpoint.every_steps=2")
    latest = run_dir / "checkpoints" / "step_00000004"
    (latest / UNIVERSAL).write_bytes((latest / UNIVERSAL).read_bytes()[:100])  # truncated
    explicit = run_bounded(command(None, colour_shards, tmp_path / "other", f"train.resume={latest}"), timeout_s=120)
    assert explicit.returncode == 2
    assert explicit.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {latest} is damaged: {UNIVERSAL} does not match its sha256"
    )
    fresh = run_bounded(command(None, colour_shards, run_dir, "train.resume=none"), timeout_s=120)
    assert fresh.returncode == 2 and "already has checkpoints; use train.resume=auto" in fresh.stderr
    result = train(None, colour_shards, run_dir, "train.steps=6", "checkpoint.every_steps=2")
    assert f"skipping checkpoint {latest} is damaged: {UNIVERSAL} does not match its sha256" in result.stdout
    assert "resuming from" in result.stdout and "step_00000002 at step 2" in result.stdout
    assert sorted(losses(run_dir)) == [2, 4, 6]


def test_export_cli_writes_the_generators_of_a_zero3_checkpoint(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    train("zero3", colour_shards, run_dir, "train.steps=2")
    result = run_bounded([sys.executable, "-m", "trainer.export", str(run_dir), "--out", str(tmp_path / "out")], 120)
    assert result.returncode == 0, result.stderr
    a, b = (
        load_file(str(tmp_path / "out" / "g_yx.safetensors")),
        load_file(str(run_dir / "export" / "g_yx.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    missing = run_bounded([sys.executable, "-m", "trainer.export", str(run_dir), "--step", "99"], 60)
    assert missing.returncode == 2 and "step_00000099 does not exist" in missing.stderr
