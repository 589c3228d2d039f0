"""End-to-end runs of the CLI on tiny synthetic shards (CPU, a few steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command
from trainer.checkpoint.export import load_generators
from trainer.checkpoint.format import COMPLETE
from trainer.config.load import load_config

TINY = ["model.ngf=8", "model.ndf=8", "model.n_blocks=1", "train.batch_size=2", "logging.every_steps=2"]


def train_cli(run_dir: Path, data: Path, *extra: str, launcher: list[str] | None = None):
    steps = ["train.steps=6", "eval.every_steps=3", "logging.image_every_steps=3", "checkpoint.every_steps=4"]
    cmd = train_command(data, run_dir, *steps, *TINY, *extra, launcher=launcher)
    result = run_bounded(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_writes_a_complete_run_directory(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    train_cli(run_dir, colour_shards)
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.steps == 6 and cfg.model.ngf == 8 and cfg.data.root == str(colour_shards)

    records = read_metrics(run_dir)
    losses = [r for r in records if "loss/g_total" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    for key in (
        "loss/adv_g_xy",
        "loss/adv_g_yx",
        "loss/cycle_x",
        "loss/cycle_y",
        "loss/idt_x",
        "loss/idt_y",
        "loss/d_x_real",
        "loss/d_y_fake",
        "lr/g",
        "lr/d",
        "perf/images_per_s",
    ):
        assert all(key in r for r in losses), key
    evals = [r for r in records if "eval/psnr_g_xy" in r]
    assert [r["step"] for r in evals] == [3, 6]

    for name in ("x_to_y", "y_to_x"):
        for step in (3, 6):
            grid = Image.open(run_dir / "images" / f"{name}_{step:08d}.png")
            assert grid.size == (3 * 32, 4 * 32)  # x | G(x) | F(G(x)) for 4 sample images

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (checkpoints / "step_00000006" / COMPLETE).is_file()
    assert json.loads((checkpoints / "step_00000006" / "train_state.json").read_text())["step"] == 6

    exported = load_generators(run_dir / "export")
    assert exported.model == cfg.model and exported.image_size == 32 and exported.extra == "none"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert exported.g_xy(x).shape == (1, 3, 32, 32)


def test_exported_generators_reproduce_the_final_evaluation(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    train_cli(run_dir, colour_shards, "train.precision=fp32")
    final = [r for r in read_metrics(run_dir) if "eval/psnr_g_xy" in r][-1]
    result, metrics = evaluate_cli(run_dir / "export", colour_shards, 16)
    assert result.returncode == 0, result.stderr[-2000:]
    for key in ("eval/psnr_g_xy", "eval/psnr_g_yx", "eval/psnr_identity", "eval/cycle_l1_x"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-4)


def test_accelerate_launch_runs_the_same_cli(tmp_path, colour_shards):
    launcher = [
        "accelerate",
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    run_dir = tmp_path / "run"
    train_cli(run_dir, colour_shards, "train.steps=2", launcher=launcher)
    assert (run_dir / "export" / "g_xy.safetensors").is_file()


def test_bad_override_exits_with_one_line(tmp_path, colour_shards):
    result = run_bounded([sys.executable, "trainer/main.py", "--config", "configs/demo-cpu.yaml", "data.crop_size=64"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: data.crop_size=64 exceeds data.load_size=32; lower crop_size or raise load_size"
    )


def test_missing_shards_are_a_one_line_error(tmp_path):
    result = run_bounded(train_command(f"{tmp_path}/none", tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.root={tmp_path}/none does not exist; give a shard directory (manifest.json) or builtin:colour"
    )


def test_wandb_offline_run_is_written(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    train_cli(run_dir, colour_shards, "logging.wandb=offline", "train.steps=2")
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize(
    "generator,discriminator,extra",
    [
        ("unet_article", "patchgan", []),
        ("encoder_decoder", "pixel", []),
        ("densenet", "hnet", ["loss.lambda_feature=1.0", "model.n_blocks=1"]),
        ("resnet_6blocks", "patchgan", ["model.n_blocks=null"]),  # the demo config's n_blocks: 3 would contradict it
    ],
)
def test_each_family_trains(tmp_path, colour_shards, generator, discriminator, extra):
    run_dir = tmp_path / "run"
    family = [f"model.generator={generator}", f"model.discriminator={discriminator}", *extra]
    small = ["model.ngf=8", "model.ndf=8", "train.batch_size=2", "train.steps=2", "logging.every_steps=1"]
    cmd = train_command(colour_shards, run_dir, *small, *family)
    result = run_bounded(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r for r in read_metrics(run_dir) if "loss/g_total" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(r["loss/g_total"])) for r in losses)
    if discriminator == "hnet":
        assert all("loss/feature_x" in r for r in losses)


@pytest.mark.parametrize("config", ["unet-article", "cyclegan-hnet", "horse2zebra"])
def test_shipped_experiment_configs_train(tmp_path, colour_shards, config):
    run_dir = tmp_path / "run"
    small = ["data.load_size=36", "data.crop_size=32", "model.ngf=8", "model.ndf=8", "train.steps=2"]
    result = run_bounded(
        train_command(colour_shards, run_dir, *small, "train.batch_size=2", "logging.every_steps=1", config=config)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(run_dir / "config.yaml")
    losses = [r for r in read_metrics(run_dir) if "loss/g_total" in r]
    assert len(losses) == 2
    assert ("loss/feature_x" in losses[0]) == (cfg.loss.lambda_feature > 0)
    assert ("loss/preserve_x" in losses[0]) == (cfg.loss.lambda_preserve > 0)


def test_checkpoint_rotation_keeps_the_newest_and_every_nth(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    train_cli(
        run_dir,
        colour_shards,
        "train.steps=10",
        "checkpoint.every_steps=2",
        "checkpoint.keep=1",
        "checkpoint.keep_every_steps=4",
    )
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000008", "step_00000010"]


def test_train_state_counts_images_across_a_resume_with_another_batch(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    train_cli(run_dir, colour_shards, "train.steps=4")  # batch 2: 8 images per domain by step 4
    first = json.loads((run_dir / "checkpoints/step_00000004/train_state.json").read_text())
    assert first["format"] == 1 and first["images_seen"] == 8 and len(first["config_hash"]) == 64
    result = train_cli(run_dir, colour_shards, "train.steps=6", "train.batch_size=1")  # 2 more steps at batch 1
    state = json.loads((run_dir / "checkpoints/step_00000006/train_state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 8 + 2 * 1
    assert state["config_hash"] != first["config_hash"]
    assert "note: the config differs from the one that wrote" in result.stdout + result.stderr
    again = train_cli(run_dir, colour_shards, "train.steps=6", "train.batch_size=1")  # asks for nothing more
    assert (
        f"{run_dir} is finished: its checkpoint is at step 6 and train.steps=6, so nothing is trained" in again.stdout
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_a_train_state_of_a_newer_format_is_refused(tmp_path):
    from trainer.checkpoint.format import CheckpointError, read_train_state

    (tmp_path / "train_state.json").write_text(json.dumps({"format": 99, "step": 4, "world_size": 1, "backend": "ddp"}))
    with pytest.raises(CheckpointError, match="has format=99"):
        read_train_state(tmp_path)
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 4, "world_size": 1, "backend": "ddp"}))
    assert read_train_state(tmp_path)["format"] == 0  # written before formats were numbered
