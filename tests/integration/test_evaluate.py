"""`trainer.evaluate` CLI (table, JSON, FID/KID from a local network, one-line errors) and periodic evaluation with
best-checkpoint selection during training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import (
    evaluate_cli,
    read_metrics,
    run_bounded,
    train_command,
    untrained_export,
    write_tiny_inception,
)
from trainer.checkpoint import complete_checkpoints, read_best
from trainer.config import load_config

SMALL = ["model.ngf=8", "model.n_blocks=1", "train.precision=fp32", "logging.every_steps=2"]


def test_cli_prints_a_table_writes_json_and_names_the_inception_option(colour_shards, tmp_path):
    export = untrained_export(
        load_config(None, ["data.load_size=32", "data.crop_size=32", "model.ngf=8"]), tmp_path / "e"
    )
    result, metrics = evaluate_cli(export, colour_shards, 10)
    assert result.returncode == 0, result.stderr
    assert "eval/psnr_g_xy" in result.stdout and "eval/fid_x" not in metrics
    assert "FID/KID skipped: set eval.inception_weights (CLI: --inception-weights)" in result.stdout
    assert metrics["eval/images_x"] == 10 and set(metrics) >= {"eval/ssim_g_yx", "eval/cycle_l1_y"}
    inception = write_tiny_inception(tmp_path / "inception.pt")
    result, with_fid = evaluate_cli(export, colour_shards, 10, "--inception-weights", str(inception))
    assert result.returncode == 0, result.stderr
    assert with_fid["eval/fid_x"] > 0 and with_fid["eval/kid_y"] == with_fid["eval/kid_y"]
    assert {k: v for k, v in with_fid.items() if k in metrics} == metrics


def test_cli_errors_are_one_line(colour_shards, tmp_path):
    export = untrained_export(
        load_config(None, ["data.load_size=32", "data.crop_size=32", "model.ngf=8"]), tmp_path / "e"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ((tmp_path / "nope", colour_shards), "neither an export directory (model.json) nor a run directory"),
        ((export, tmp_path / "nope"), "manifest"),
        ((export, colour_shards, "--inception-weights", str(tmp_path / "none.pt")), "none.pt does not exist"),
    ]
    for (weights, data, *flags), message in cases:
        result, _ = evaluate_cli(weights, data, 4, *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("evaluate: "), result.stderr
        assert message in lines[0], lines[0]


def test_periodic_evaluation_keeps_the_best_checkpoint_through_rotation(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL, "eval.every_steps=2", "eval.images=6", "eval.select=cycle", "checkpoint.keep=1"]
    first = run_bounded(train_command(colour_shards, run_dir, *common, "train.steps=6"), 300)
    assert first.returncode == 0, first.stderr[-3000:]
    evals = [r for r in read_metrics(run_dir) if "eval/select_score" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = read_best(run_dir)
    winner = max(evals, key=lambda r: r["eval/select_score"])
    assert (best["step"], best["select"]) == (winner["step"], "cycle")
    assert best["score"] == winner["eval/select_score"] == -(winner["eval/cycle_l1_x"] + winner["eval/cycle_l1_y"]) / 2
    steps = {int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir)}
    assert steps == {6, best["step"]}  # keep=1 plus the best

    # Make step 2 the unbeatable best, then train on: rotation deletes every other old checkpoint, never step 2.
    record = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    if record["step"] != 2:
        shutil.copytree(
            run_dir / "checkpoints" / f"step_{record['step']:08d}", run_dir / "checkpoints" / "step_00000002"
        )
    record.update(step=2, score=1e9)
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps(record))
    second = run_bounded(train_command(colour_shards, run_dir, *common, "train.steps=10"), 300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir)} == {2, 10}
    assert read_best(run_dir)["step"] == 2

    exported = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run_dir), "--best", "--out", str(tmp_path / "best")],
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    result, metrics = evaluate_cli(run_dir, colour_shards, 6, "--best")
    assert result.returncode == 0, result.stderr
    assert metrics["eval/cycle_l1_x"] > 0


def test_select_psnr_on_unpaired_data_is_refused_at_start(tmp_path):
    from shards.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, "colour", size=32, train=8, test=4, seed=0, maxcount=8)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["synthetic"]["paired_test"] = False
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = run_bounded(train_command(data, tmp_path / "run", *SMALL, "train.steps=2", "eval.select=psnr"), 120)
    assert result.returncode == 2
    assert "eval.select=psnr needs a test split with a known answer" in result.stderr
