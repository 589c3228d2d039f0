"""W&B offline runs read back with W&B's own reader, resume into the same run, and training without wandb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_bounded, train_command

TINY = [
    "model.ngf=4",
    "model.ndf=4",
    "model.n_blocks=1",
    "train.batch_size=2",
    "logging.every_steps=2",
    "logging.image_every_steps=2",
    "eval.images=4",
]


def train(data: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = train_command(data, run_dir, *TINY, *extra)
    return run_bounded(cmd, timeout_s=300, env=env)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def history(wandb_file: Path) -> dict[int, dict]:
    """step -> logged values, from `wandb leet inspect --json`."""
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(wandb_file)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    steps: dict[int, dict] = {}
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            steps.setdefault(record["history"]["step"]["num"], {}).update(record["history"]["item"])
    return steps


def test_offline_run_holds_config_metrics_and_images_like_metrics_jsonl(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        colour_shards, run_dir, "train.steps=4", "logging.wandb=offline", "logging.run_name=smoke", "logging.tags=a,b"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wandb_file,) = offline_runs(run_dir)
    summary = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", str(wandb_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "state    finished (exit code 0)" in summary
    assert "model.generator" in summary and "git_commit" in summary
    logged = history(wandb_file)
    expected = [
        "loss/adv_g_xy",
        "loss/adv_g_yx",
        "loss/cycle_x",
        "loss/cycle_y",
        "loss/idt_x",
        "loss/idt_y",
        "loss/d_x_real",
        "loss/d_x_fake",
        "loss/d_y_real",
        "loss/d_y_fake",
        "lr/g",
        "lr/d",
        "grad_norm/g",
        "grad_norm/d",
        "perf/images_per_s",
        "perf/images_per_s_per_rank",
        "perf/data_wait_fraction",
        "perf/step_time_s",
        "mem/host_rss_gb",
        "data/bad_corrupt",
        "eval/psnr_g_xy",
        "checkpoint/saved_step",
    ]
    for key in expected:
        assert key in logged[4], key
    assert logged[2]["images/x_to_y._type"] == "image-file"
    jsonl = read_metrics(run_dir)
    for record in jsonl:
        for key, value in record.items():
            if key != "step":
                assert logged[record["step"]][key] == pytest.approx(value, rel=1e-6), key


def test_resume_continues_the_same_run_and_never_goes_back(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = train(
        colour_shards,
        run_dir,
        "train.steps=6",
        "checkpoint.every_steps=4",
        "checkpoint.keep=3",
        "logging.wandb=offline",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # Resume from step 4 although W&B already has steps up to 6 (as after a crash past a checkpoint).
    second = train(
        colour_shards,
        run_dir,
        "train.steps=10",
        f"train.resume={run_dir}/checkpoints/step_00000004",
        "logging.wandb=offline",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and runs[0].name == runs[1].name  # run-<id>.wandb: the same id
    assert max(history(runs[0])) == 6
    assert min(history(runs[1])) > 6 and max(history(runs[1])) == 10
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert [s for s in steps if s > 4][:1] == [6]  # metrics.jsonl re-logs 6 from the resumed run


def test_training_works_without_wandb_installed(colour_shards, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # import wandb -> ImportError\n")
    env = {"PYTHONPATH": str(hide)}
    probe = run_bounded([sys.executable, "-c", "import wandb"], timeout_s=60, env=env)
    assert probe.returncode != 0  # really hidden
    result = train(colour_shards, tmp_path / "run", "train.steps=2", "logging.wandb=disabled", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = train(colour_shards, tmp_path / "run2", "train.steps=2", "logging.wandb=offline", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logging.wandb=offline needs the wandb package; install it or set logging.wandb=disabled"
    )


def test_a_resume_drops_and_counts_the_updates_an_interrupted_attempt_logged_after_its_checkpoint(tmp_path):
    from trainer.observe.tracking import Tracker

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss/g_total": 1.0}) + "\n" for step in range(1, 10)))
    handle, last = Tracker._open_jsonl(path, resume_step=6)
    handle.close()
    assert last == 9  # so run/steps_redone = 9 - 6
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    handle, last = Tracker._open_jsonl(path, resume_step=0)  # a fresh run starts over and redoes nothing
    handle.close()
    assert last == 0 and path.read_text() == ""
