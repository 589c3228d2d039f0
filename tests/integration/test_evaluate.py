"""`trainer.evaluate` CLI (table, JSON, FID/KID from a local network, one-line errors) on shard directories and on
testA/testB image folders, and periodic evaluation with best-checkpoint selection during training."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.manifest import split_entry, write_manifest
from shards.tar_shards import write_shards
from tests.conftest import (
    accelerate_launch,
    evaluate_cli,
    read_metrics,
    rewrite_listed,
    run_bounded,
    train_command,
    untrained_export,
    write_tiny_inception,
)
from trainer.checkpoint.format import complete_checkpoints, read_best
from trainer.config.load import load_config
from trainer.data.image_folders import load_test_folders

SMALL = ["model.ngf=8", "model.n_blocks=1", "train.precision=fp32", "logging.every_steps=2"]
UNDECODABLE = b"not an image at all"


def png_file_bytes(seed: int, size: tuple[int, int], mode: str) -> bytes:
    """A PNG of random pixels in `mode` (RGB, L, RGBA or P), size (width, height)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "P": 3}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_test_folders_and_shards(root: Path) -> tuple[Path, Path]:
    """The same test images twice: as root/folders/testA + testB (files) and as root/shards (x-test and y-test
    shards of the identical PNG bytes, unpaired). X: 5 images of mixed modes and sizes, then an undecodable file
    (last, so it falls in rank 1's share of 2); Y: 4 images."""
    modes = ["RGB", "L", "RGBA", "P"]
    files = {
        "x": [(f"a{i}", png_file_bytes(i, (40 - 2 * i, 30 + i), modes[i % 4])) for i in range(5)]
        + [("a5", UNDECODABLE)],
        "y": [(f"b{i}", png_file_bytes(10 + i, (32 + i, 32), modes[(i + 1) % 4])) for i in range(4)],
    }
    folders, shards = root / "folders", root / "shards"
    splits = {}
    for domain, folder in (("x", "testA"), ("y", "testB")):
        (folders / folder).mkdir(parents=True)
        for name, data in files[domain]:
            (folders / folder / f"{name}.png").write_bytes(data)
        samples = [{"__key__": name, "png": data} for name, data in files[domain]]
        splits[f"{domain}-test"] = split_entry(write_shards(shards, f"{domain}-test", samples, maxcount=3), (32, 32))
    write_manifest(shards, splits)
    return folders, shards


def tiny_export(tmp_path: Path) -> Path:
    return untrained_export(
        load_config(None, ["data.load_size=32", "data.crop_size=32", "model.ngf=8"]), tmp_path / "e"
    )


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


def test_image_folders_give_the_numbers_of_the_same_images_as_shards(tmp_path):
    export = tiny_export(tmp_path)
    folders, shards = write_test_folders_and_shards(tmp_path)
    inception = str(write_tiny_inception(tmp_path / "inception.pt"))
    result, from_folders = evaluate_cli(export, folders, 10, "--inception-weights", inception, "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    shard_result, from_shards = evaluate_cli(export, shards, 10, "--inception-weights", inception, "--batch-size", "2")
    assert shard_result.returncode == 0, shard_result.stderr
    assert {"eval/cycle_l1_x", "eval/cycle_l1_y", "eval/fid_x", "eval/fid_y", "eval/kid_x", "eval/kid_y"} <= set(
        from_folders
    )
    assert not [k for k in from_folders if "psnr" in k or "ssim" in k]
    assert from_folders == from_shards  # the same pixels, resized alike: the same numbers
    assert from_folders["eval/images_x"] == 6 and from_folders["eval/images_y"] == 4
    assert result.stdout.count("PSNR/SSIM skipped") == 1
    skipped = [line for line in result.stdout.splitlines() if "skipped 1 unreadable" in line]
    assert len(skipped) == 1 and f"{folders / 'testA' / 'a5.png'}: image " in skipped[0], result.stdout
    assert "Traceback" not in result.stderr


def test_image_folder_shares_interleave_over_ranks(tmp_path):
    folders, _ = write_test_folders_and_shards(tmp_path)
    one = load_test_folders(folders, 32, "none", 10)
    assert (len(one.x), len(one.y), one.total_x, one.total_y, one.paired) == (5, 4, 6, 4, False)
    assert one.x.min() >= -1 and one.x.max() <= 1 and one.x.shape[1:] == (3, 32, 32)
    shares = [load_test_folders(folders, 32, "none", 10, rank=r, world_size=2) for r in (0, 1)]
    for rank, share in enumerate(shares):
        assert torch.equal(share.x, one.x[rank::2]) and torch.equal(share.y, one.y[rank::2])  # the bad one is #5
        assert (share.total_x, share.total_y) == (6, 4)
    first_three = load_test_folders(folders, 32, "none", 3)
    assert torch.equal(first_three.x, one.x[:3]) and first_three.total_x == 3


def test_folders_holding_the_same_names_are_scored_as_pairs(tmp_path):
    root = tmp_path / "pairs"
    for folder in ("testA", "testB"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        (root / "testA" / f"p{i}.png").write_bytes(png_file_bytes(i, (32, 32), "RGB"))
        answer = "L" if i == 3 else "RGB"  # a grey answer is converted to RGB like any 8-bit RGB test image
        (root / "testB" / f"p{i}.jpg").write_bytes(png_file_bytes(20 + i, (32, 32), answer))  # the suffix differs
    (root / "testB" / "p2.jpg").write_bytes(b"")  # its pair is left out
    paired = load_test_folders(root, 32, "none", 10)
    assert paired.paired and len(paired.x) == len(paired.y) == 3
    expected = [png_file_bytes(20 + i, (32, 32), "L" if i == 3 else "RGB") for i in (0, 1, 3)]
    for image, data in zip(paired.y, expected):
        pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, pixels.float() / 127.5 - 1)
    result, metrics = evaluate_cli(tiny_export(tmp_path), root, 10)
    assert result.returncode == 0, result.stderr
    assert (
        metrics["eval/psnr_g_xy"] > 0 and "eval/psnr_identity" in metrics and "PSNR/SSIM skipped" not in result.stdout
    )
    (root / "testB" / "p0.jpg").rename(root / "testB" / "other.jpg")
    assert not load_test_folders(root, 32, "none", 10).paired


@pytest.mark.distributed
def test_two_ranks_on_image_folders_give_the_numbers_of_one(tmp_path):
    # Shares of 3 and 2 X images (one of rank 1's unreadable) in batches of 2: the ranks run different numbers of
    # metric updates, and KID's subsets (4) are smaller than its sets.
    export = tiny_export(tmp_path)
    folders, _ = write_test_folders_and_shards(tmp_path)
    flags = ["--inception-weights", str(write_tiny_inception(tmp_path / "inception.pt")), "--batch-size", "2"]
    one_result, one = evaluate_cli(export, folders, 10, *flags)
    two_result, two = evaluate_cli(export, folders, 10, *flags, launcher=accelerate_launch("cpu-ddp-2", 2))
    assert one_result.returncode == 0, one_result.stderr[-3000:]
    assert two_result.returncode == 0, two_result.stderr[-3000:]
    assert one.keys() == two.keys() and {"eval/kid_x", "eval/kid_y", "eval/fid_x"} <= one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key


def test_cli_errors_are_one_line(colour_shards, tmp_path):
    export = tiny_export(tmp_path)
    only_a = tmp_path / "only_a"
    (only_a / "testA").mkdir(parents=True)
    unreadable = tmp_path / "unreadable"
    for folder in ("testA", "testB"):
        (unreadable / folder).mkdir(parents=True)
        (unreadable / folder / "a.png").write_bytes(png_file_bytes(0, (8, 8), "RGB") if folder == "testB" else b"")
    cases = [
        ((tmp_path / "nope", colour_shards), f"--weights {tmp_path / 'nope'} does not exist"),
        (
            (export / "g_xy.safetensors", colour_shards),
            f"--weights {export / 'g_xy.safetensors'} is a file; give the export directory that holds it ({export})",
        ),
        ((export, tmp_path / "nope"), "does not exist; expected a shard directory (manifest.json) or image folders"),
        ((export, only_a), "has testA/ only; expected a shard directory"),
        ((export, unreadable), "none of the X test images could be read"),
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
    if record["step"] != 2:  # a copy of the best as step 2, its train_state.json saying so
        forged = run_dir / "checkpoints" / "step_00000002"
        shutil.copytree(run_dir / "checkpoints" / f"step_{record['step']:08d}", forged)
        state = json.loads((forged / "train_state.json").read_text())
        rewrite_listed(forged, "train_state.json", json.dumps({**state, "step": 2}).encode())
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
