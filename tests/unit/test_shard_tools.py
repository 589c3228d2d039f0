"""shards.write (folders -> shards, resumable, parallel), shards.verify and shards.info."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from shards.manifest import read_manifest
from shards.verify import verify
from shards.write import main as write_main
from tests.conftest import REPO
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader


def make_folder(path, count, size=(48, 40), mode="RGB"):
    path.mkdir(parents=True)
    for i in range(count):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = np.full((size[1], size[0], channels), 10 * i, np.uint8).squeeze()
        Image.fromarray(array, mode).save(path / f"img.{i:03d}.png")


@pytest.fixture
def reference_layout(tmp_path):
    root = tmp_path / "horse2zebra"
    make_folder(root / "trainA", 7)
    make_folder(root / "trainB", 5, mode="RGBA")
    make_folder(root / "testA", 2, mode="L")
    make_folder(root / "testB", 2)
    return root


def test_reference_layout_packs_into_verified_shards(reference_layout, tmp_path):
    out = tmp_path / "shards"
    write_main(
        [
            "--root",
            str(reference_layout),
            "--out",
            str(out),
            "--load-size",
            "32",
            "--maxcount",
            "3",
            "--workers",
            "2",
            "--extra",
            "hist",
            "--channels",
            "3",  # trainB is RGBA and testA grey: the domains keep one format only when asked to convert
        ]
    )
    manifest = read_manifest(out)
    assert {v["format"]["channels"] for v in manifest["splits"].values()} == {3}
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {
        "x-train": 7,
        "y-train": 5,
        "x-test": 2,
        "y-test": 2,
    }
    assert [s["name"] for s in manifest["splits"]["x-train"]["shards"]] == [
        "x-train-000000.tar",
        "x-train-000001.tar",
        "x-train-000002.tar",
    ]
    assert manifest["splits"]["y-train"]["image_size"] == [32, 32]
    with tarfile.open(out / "x-train-000000.tar") as tar:
        assert {"img_000.jpg", "img_000.hist.npy"} <= set(tar.getnames())  # dots in stems become underscores
    assert verify(out) == []
    cfg = DataConfig(root=str(out), load_size=32, crop_size=32, num_workers=0, extra="hist")
    batch = next(UnpairedLoader(cfg, 2, seed=0, rank=0, world_size=1, device=torch.device("cpu")))
    assert batch["x"].shape == (2, 3, 32, 32) and batch["extra_y"].shape == (2, 24, 32, 32)


def test_interrupted_write_resumes_and_skips_finished_shards(reference_layout, tmp_path):
    out = tmp_path / "shards"
    broken = reference_layout / "trainA" / "img.005.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")  # with --strict, the second x-train shard (files 3..5) fails
    with pytest.raises(SystemExit, match="img.005.png: not an image"):
        write_main(["--root", str(reference_layout), "--out", str(out), "--maxcount", "3", "--strict"])
    progress = json.loads((out / ".progress.json").read_text())
    assert "x-train-000000" in progress and "x-train-000001" not in progress
    assert not list(out.glob("*.tar.tmp"))
    first = out / "x-train-000000.tar"
    stamp = first.stat().st_mtime_ns
    broken.write_bytes(good)
    write_main(["--root", str(reference_layout), "--out", str(out), "--maxcount", "3"])
    assert first.stat().st_mtime_ns == stamp  # not written again
    assert read_manifest(out)["splits"]["x-train"]["samples"] == 7
    assert not (out / ".progress.json").exists() and verify(out) == []


def test_verify_reports_shard_and_key_and_exits_nonzero(colour_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(colour_shards, copy)
    ok = subprocess.run([sys.executable, "-m", "shards.verify", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    shard = copy / "y-test-000000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x89PNG")  # the first sample's PNG
    data[start + 60 : start + 200] = b"\0" * 140
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "shards.verify", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "y-test-000000.tar: sha256 differs from the manifest" in bad.stdout
    assert "y-test-000000.tar:0000000: image does not decode" in bad.stdout


def test_info_prints_counts_and_writes_a_contact_sheet(colour_shards, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = subprocess.run(
        [sys.executable, "-m", "shards.info", str(colour_shards), "--sheet", str(sheet), "--per-split", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "x-train           96       3" in result.stdout
    assert Image.open(sheet).size == (5 * 96, 4 * 96)


def test_bad_folder_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shards.write",
            "--x",
            str(tmp_path / "nope"),
            "--y",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"shards.write: {tmp_path / 'nope'} is not a directory"
