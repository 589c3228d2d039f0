"""What an operator sees: mistakes are caught before the run directory changes, Ctrl-C saves and stops cleanly,
a log file gets one line per interval and a summary, and the demo needs no preparatory command."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shards.synthetic import builtin_root
from tests.conftest import REPO, accelerate_launch, kill_tree, read_metrics, run_bounded, train_command
from trainer.checkpoint.export import load_generators
from trainer.runtime.preemption import INTERRUPTED_EXIT_CODE

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "data.num_workers=1",
        "eval.images=4", "logging.image_every_steps=0", "logging.every_steps=2"]  # fmt: skip


def train(data: Path | str, run_dir: Path, *extra: str, launcher=None, env=None) -> subprocess.CompletedProcess:
    return run_bounded(train_command(data, run_dir, *TINY, *extra, launcher=launcher), env=env)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["missing", "raw-folders", "no-manifest"])
def test_a_wrong_data_root_is_one_line_and_leaves_the_run_directory_untouched(layout, tmp_path):
    root = tmp_path / "data"
    if layout != "missing":
        for folder in ("trainA", "trainB") if layout == "raw-folders" else ("images",):
            (root / folder).mkdir(parents=True)
    run_dir = tmp_path / "run"
    result = train(root, run_dir)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    expected = {
        "missing": f"error: data.root={root} does not exist",
        "raw-folders": f"error: data.root={root} holds image folders (trainA/, trainB/), not shards; pack them once "
        f"with `python -m shards.write --root {root} --out {root}-shards --load-size 32`",
        "no-manifest": f"error: data.root={root} has no manifest.json; write shards with `python -m shards.write`",
    }[layout]
    assert last.startswith(expected), last
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_an_architecture_change_is_refused_before_anything_is_written(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(colour_shards, run_dir, "train.steps=2").returncode == 0
    before = snapshot(run_dir)
    changed = train(colour_shards, run_dir, "train.steps=4", "model.ngf=8", "model.generator=unet_article")
    assert changed.returncode == 2
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {run_dir / 'checkpoints' / 'step_00000002'} has ")
    assert "model.generator='resnet', config says 'unet_article'; model.ngf=4, config says 8" in last
    assert snapshot(run_dir) == before
    # export reads the architecture stored with the weights, whatever config.yaml says by now
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["ngf"] = 16
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    exported = run_bounded([sys.executable, "-m", "trainer.export", str(run_dir), "--out", str(tmp_path / "e")])
    assert exported.returncode == 0, exported.stderr
    assert load_generators(tmp_path / "e").model.ngf == 4


def test_a_log_file_gets_one_line_per_interval_and_a_summary(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train(colour_shards, run_dir, "train.steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all(
        " | g " in line and " | d " in line and " img/s | data wait " in line and "| eta " in line for line in lines
    )
    assert "\r" not in result.stdout and "it/s" not in result.stderr  # no progress bar off a terminal
    assert "\ndone: 6 steps in " in result.stdout
    assert f"generators exported to {run_dir / 'export'}" in result.stdout
    assert f"python -m trainer.translate --weights {run_dir / 'export'} --direction x2y" in result.stdout
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # DeepSpeed is not imported


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len([r for r in read_metrics(run_dir) if "loss/g_total" in r]) if metrics.is_file() else 0


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 120
    while logged_steps(run_dir) < steps:
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)


def test_ctrl_c_saves_and_stops_and_a_second_ctrl_c_stops_at_once(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(colour_shards, run_dir, *TINY, "train.steps=5000")
    proc = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_steps(proc, run_dir, 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == INTERRUPTED_EXIT_CODE
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert f"interrupted: saved {saved}; run the same command to continue from step" in out
    assert not (run_dir / "PREEMPTED").exists()  # a stop by the user, not a preemption to requeue

    slow_check = [*command, "checkpoint.preempt_check_steps=1000"]  # the second press comes before any save
    proc = subprocess.Popen(slow_check, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_steps(proc, run_dir, logged_steps(run_dir) + 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # two separate presses (the kernel merges a signal that is still pending)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == INTERRUPTED_EXIT_CODE
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted again: stopped at step ") and "without saving; the " in last
    assert f"since the checkpoint of step {int(saved.name[5:])} are lost" in last
    assert "Traceback" not in err


def test_ctrl_c_on_two_ranks_saves_with_one_line_per_rank(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(
        colour_shards, run_dir, *TINY, "train.steps=5000", launcher=accelerate_launch("cpu-ddp-2", 2)
    )
    proc = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for_steps(proc, run_dir, 2)
        proc.send_signal(signal.SIGINT)  # what the terminal sends the launcher; it passes SIGINT to the ranks
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    saved = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert out.count(f"interrupted: saved {saved}") == 1  # the main rank's line
    assert err.count("interrupt: saving a checkpoint within a few steps") == 2  # one per rank
    assert f'File "{REPO / "trainer"}' not in err  # no rank's traceback (the launcher reports the signal itself)


def make_builtin(queue) -> None:
    queue.put(str(builtin_root("builtin:colour")))


def test_builtin_data_is_made_once_whoever_asks_at_the_same_time(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CYCLEGAN_DATA_CACHE", str(tmp_path / "cache"))
    queue = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=make_builtin, args=(queue,)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    roots = {queue.get(timeout=5) for _ in procs}
    assert len(roots) == 1 and capfd.readouterr().out.count("making the built-in data set builtin:colour") == 1
    root = Path(roots.pop())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [root.name, f"{root.name}.lock"]
    assert (root / "manifest.json").is_file()


@pytest.mark.slow
def test_the_demo_config_trains_on_a_fresh_clone_without_preparing_data(tmp_path):
    env = {"CYCLEGAN_DATA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "trainer/main.py", "--config", "configs/demo-cpu.yaml", f"train.run_dir={tmp_path / 'run'}",
           "train.steps=4", "eval.images=4"]  # fmt: skip
    result = run_bounded(cmd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "making the built-in data set builtin:colour" in result.stdout
    assert (tmp_path / "run" / "export" / "g_xy.safetensors").is_file()
