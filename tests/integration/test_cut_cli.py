"""A CUT run through the command lines: what it logs and draws, its one-direction export, and translate, evaluate
and export on it (the y2x direction refused in one line)."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import evaluate_cli, read_metrics, run_bounded, train_command


@pytest.fixture(scope="module")
def cut_run(colour_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cut") / "run"
    overrides = ["train.steps=8", "eval.every_steps=4", "logging.image_every_steps=4", "logging.every_steps=4",
                 "checkpoint.every_steps=4", "train.precision=fp32", "eval.images=8", "eval.select=psnr"]  # fmt: skip
    result = run_bounded(train_command(colour_shards, run_dir, *overrides, config="cut-demo"), timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(g_xy: X->Y); translate images with" in result.stdout
    return run_dir


def test_a_cut_run_logs_its_terms_and_one_direction(cut_run):
    records = read_metrics(cut_run)
    losses = next(r for r in records if "loss/g_total" in r)
    assert {"loss/adv_g_xy", "loss/nce_x", "loss/nce_y", "loss/d_y", "loss/d_total"} <= losses.keys()
    assert not any(key.startswith(("loss/cycle", "loss/d_x", "loss/idt")) for key in losses)
    final = [r for r in records if "eval/psnr_g_xy" in r][-1]
    assert {"eval/ssim_g_xy", "eval/psnr_identity", "eval/psnr_gain_xy", "eval/select_score"} <= final.keys()
    assert not any(key.endswith(("_g_yx", "_yx")) or "cycle_l1" in key for key in final)
    assert final["eval/select_score"] == final["eval/psnr_g_xy"]
    grids = sorted(p.name for p in (cut_run / "images").iterdir())
    assert grids == ["x_to_y_00000004.png", "x_to_y_00000008.png", "y_identity_00000004.png", "y_identity_00000008.png"]


def test_the_export_holds_g_alone_and_evaluates_as_logged(cut_run, colour_shards):
    export = cut_run / "export"
    assert sorted(p.name for p in export.iterdir()) == ["COMPLETE", "g_xy.safetensors", "model.json", "raw"]
    assert json.loads((export / "model.json").read_text())["model"]["family"] == "cut"
    assert not any(key.startswith("head.") for key in load_file(str(export / "g_xy.safetensors")))
    result, metrics = evaluate_cli(export, colour_shards, 8)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in read_metrics(cut_run) if "eval/psnr_g_xy" in r][-1]
    assert metrics["eval/psnr_g_xy"] == pytest.approx(logged["eval/psnr_g_xy"], abs=1e-4)
    assert "eval/psnr_g_yx" not in metrics
    again = run_bounded([sys.executable, "-m", "trainer.export", str(cut_run), "--out", str(cut_run / "again")])
    assert again.returncode == 0, again.stderr
    assert (
        load_file(str(cut_run / "again" / "g_xy.safetensors")).keys()
        == load_file(str(export / "g_xy.safetensors")).keys()
    )


def test_translate_goes_x_to_y_and_refuses_y_to_x_in_one_line(cut_run, colour_shards, tmp_path):
    base = [sys.executable, "-m", "trainer.translate", "--weights", str(cut_run / "export"), "--input",
            str(colour_shards), "--split", "x-test"]  # fmt: skip
    result = run_bounded([*base, "--direction", "x2y", "--out", str(tmp_path / "x2y")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "x2y").iterdir())) == 16
    refused = run_bounded([*base, "--direction", "y2x", "--out", str(tmp_path / "y2x")])
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "--direction y2x: model.family=cut trains one generator, X -> Y" in refused.stderr
