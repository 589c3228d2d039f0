"""The generators' moving average: StyleGAN2-ADA's rule and ramp-up against hand-computed values, the swap used for
evaluation and export, and a training run whose evaluation, export and checkpoint use the average."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.sections import EMAConfig
from trainer.runtime.ema import GeneratorEMA, ema_beta


def test_beta_follows_the_half_life_and_the_ramp_up():
    cfg = EMAConfig(enabled=True, half_life_images=100, rampup=0.05)
    assert ema_beta(cfg, images_seen=4, batch_images=4) == 0.5 ** (4 / 0.2)  # ramp-up: 5% of 4 images seen
    assert ema_beta(cfg, images_seen=1000, batch_images=4) == 0.5 ** (4 / 50)  # still ramping: 5% of 1000
    assert ema_beta(cfg, images_seen=4000, batch_images=4) == 0.5 ** (4 / 100)  # the half-life itself
    assert ema_beta(EMAConfig(half_life_images=100, rampup=0), images_seen=4, batch_images=4) == 0.5 ** (4 / 100)


def test_updates_match_a_hand_computed_sequence():
    cfg = EMAConfig(enabled=True, half_life_images=8, rampup=0.5)
    weights = torch.zeros(3)
    ema = GeneratorEMA(cfg, [weights])
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, -1.0, 4.0], start=1):
        weights.fill_(value)
        ema.update([weights], images_seen=2 * step, batch_images=2)
        half_life = min(8.0, 0.5 * 2 * step)
        beta = 0.5 ** (2 / half_life)
        expected = beta * expected + (1 - beta) * value
        assert ema.average[0].tolist() == pytest.approx([expected] * 3, rel=1e-6)


def test_the_average_halves_the_distance_every_half_life():
    weights = torch.ones(2)
    ema = GeneratorEMA(EMAConfig(half_life_images=100, rampup=0), [torch.zeros(2)])
    for step in range(1, 11):  # 10 updates of 10 images: one half-life
        ema.update([weights], images_seen=10 * step, batch_images=10)
    assert ema.average[0].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)


def test_swapped_in_writes_the_average_and_restores_the_weights_even_after_an_error():
    weights = torch.tensor([1.0, 2.0])
    ema = GeneratorEMA(EMAConfig(), [weights])
    ema.average[0].fill_(7.0)
    with pytest.raises(RuntimeError), ema.swapped_in([weights]):
        assert weights.tolist() == [7.0, 7.0]
        raise RuntimeError("evaluation failed")
    assert weights.tolist() == [1.0, 2.0]


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"ema.half_life_images=0"):
        load_config(None, ["ema.half_life_images=0"])
    with pytest.raises(ConfigError, match=r"ema.rampup=-1"):
        load_config(None, ["ema.rampup=-1"])


@pytest.mark.slow
def test_evaluation_export_and_checkpoints_use_the_average(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.steps=6", "ema.enabled=true", "ema.half_life_images=16", "ema.eval_raw=true", "eval.every_steps=6",
            "eval.images=8",
            "model.ngf=8", "model.ndf=8", "train.precision=fp32", "logging.every_steps=3", "checkpoint.every_steps=6",
            "logging.image_every_steps=0"]  # fmt: skip
    result = run_bounded(train_command(colour_shards, run_dir, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    export = run_dir / "export"
    assert json.loads((export / "model.json").read_text())["weights"] == "ema"
    assert json.loads((export / "raw" / "model.json").read_text())["weights"] == "raw"
    units = load_file(str(run_dir / "checkpoints" / "step_00000006" / "units.safetensors"))
    ema, raw = load_file(str(export / "g_xy.safetensors")), load_file(str(export / "raw" / "g_xy.safetensors"))
    assert all(torch.equal(ema[k], units[f"g_ema/g_xy.{k}"]) and torch.equal(raw[k], units[f"g/g_xy.{k}"]) for k in raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    logged = [r for r in read_metrics(run_dir) if "eval/psnr_g_xy" in r][-1]
    _, of_ema = evaluate_cli(export, colour_shards, 8)
    _, of_raw = evaluate_cli(export / "raw", colour_shards, 8)
    assert of_ema["eval/psnr_g_xy"] == pytest.approx(logged["eval/psnr_g_xy"], abs=1e-4)  # what training measured
    assert of_raw["eval/psnr_g_xy"] != pytest.approx(logged["eval/psnr_g_xy"], abs=1e-4)
    assert of_raw["eval/psnr_g_xy"] == pytest.approx(logged["eval_raw/psnr_g_xy"], abs=1e-4)  # ema.eval_raw


@pytest.mark.slow
def test_a_run_without_an_average_resumes_with_one(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "checkpoint.every_steps=2",
        "eval.images=0",
        "model.ngf=8",
        "model.ndf=8",
        "logging.image_every_steps=0",
        "train.precision=fp32",
        "optimizer.lr_scaling=none",
    ]  # lr_scaling=none: full-size steps from the first one, so the weights move
    first = run_bounded(train_command(colour_shards, run_dir, "train.steps=2", "ema.enabled=false", *args))
    assert first.returncode == 0, first.stderr[-3000:]
    slow = ["ema.enabled=true", "ema.rampup=0", "ema.half_life_images=1000000"]  # the average barely moves
    resumed = run_bounded(train_command(colour_shards, run_dir, "train.steps=4", *slow, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "holds no moving average of the generators: it starts from their loaded weights" in resumed.stdout
    loaded = load_file(str(run_dir / "checkpoints" / "step_00000002" / "units.safetensors"))
    units = load_file(str(run_dir / "checkpoints" / "step_00000004" / "units.safetensors"))
    weights = {k[2:] for k in loaded if k.startswith("g/") and not k.endswith(("exp_avg", "exp_avg_sq", "__step__"))}
    assert {k[len("g_ema/") :] for k in units if k.startswith("g_ema/")} == weights
    for name in weights:  # the average started at the loaded weights, not at a fresh initialization
        assert torch.allclose(units[f"g_ema/{name}"], loaded[f"g/{name}"], atol=1e-4), name
    assert any(not torch.allclose(units[f"g/{name}"], loaded[f"g/{name}"], atol=1e-4) for name in weights)


def test_eval_raw_needs_an_average():
    with pytest.raises(ConfigError, match=r"ema.eval_raw=true needs ema.enabled=true"):
        load_config(None, ["ema.eval_raw=true"])
