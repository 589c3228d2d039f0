"""Data is untrusted: a manifest cannot make training or the shard tools run a command or read outside the data
root, a tar cannot make translate write outside --out, and decompression bombs and malformed extras are counted
bad samples."""

from __future__ import annotations

import io
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.decode import BadSample, decode_extra, decode_rgb
from shards.encoding import npy_bytes, png_bytes
from shards.manifest import shard_entry, split_entry, write_manifest
from shards.tar_shards import write_shards
from shards.urls import ShardsError, check_url, expand_shard_spec
from tests.conftest import REPO, run_bounded, untrained_export
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader, UnpairedShards
from trainer.data.plan import train_shards

TINY_MODEL = ["model.generator=resnet", "model.ngf=4", "model.n_blocks=1"]
NOISE_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def huge_png(width: int = 10000, height: int = 10000) -> bytes:
    """A small valid PNG whose header claims width x height pixels (IHDR patched, CRC recomputed)."""
    data = bytearray(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def sample(i: int, **parts: bytes) -> dict:
    return {"__key__": f"{i:06d}", "png": png_bytes(np.full((8, 8, 3), i, np.uint8)), **parts}


@pytest.fixture()
def hostile_manifest_root(tmp_path, monkeypatch) -> Path:
    """A shard directory whose manifest names a shard `pipe:touch MARKER; cat x-train-000000.tar`, used as `.`."""
    good = write_shards(tmp_path, "x-train", [sample(i) for i in range(4)], maxcount=4)
    y = write_shards(tmp_path, "y-train", [sample(i) for i in range(4)], maxcount=4)
    hostile = dict(good[0], name=f"pipe:touch {tmp_path / 'MARKER'}; cat x-train-000000.tar")
    splits = {"x-train": split_entry([hostile], (8, 8)), "y-train": split_entry(y, (8, 8))}
    write_manifest(tmp_path, {**splits, "x-test": split_entry([hostile], (8, 8)), "y-test": split_entry(y, (8, 8))})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_manifest_cannot_make_training_run_a_command(hostile_manifest_root):
    cfg = DataConfig(root=".", load_size=8, crop_size=8, allow_pipe=True)  # allow_pipe covers user URLs only
    with pytest.raises(ConfigError, match=r"manifest.json: shard name 'pipe:touch .* is not a plain relative"):
        train_shards(cfg, "x")
    assert not (hostile_manifest_root / "MARKER").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "shards.verify", "."],
        ["-m", "shards.info", "."],
        ["-m", "trainer.translate", "--weights", "export", "--direction", "x2y", "--input", ".", "--out", "out"],
    ],
    ids=["verify", "info", "translate"],
)
def test_a_manifest_cannot_make_the_tools_run_a_command(argv, hostile_manifest_root):
    untrained_export(load_config(None, TINY_MODEL), hostile_manifest_root / "export")
    result = run_bounded(
        [sys.executable, *argv], timeout_s=120, env={"PYTHONPATH": str(REPO)}, cwd=hostile_manifest_root
    )
    assert result.returncode != 0
    assert "is not a plain relative file name" in result.stderr and "Traceback" not in result.stderr
    assert not (hostile_manifest_root / "MARKER").exists()


@pytest.mark.parametrize("name", ["../x-train-000000.tar", "/etc/passwd", ".hidden.tar", "-rf.tar", "a/../b.tar", 7])
def test_manifest_shard_names_must_be_plain_relative_names(name, tmp_path):
    write_manifest(tmp_path, {"x-train": split_entry([{"name": name, "samples": 1}], (8, 8))})
    with pytest.raises(ConfigError, match="is not a plain relative file name"):
        train_shards(DataConfig(root=str(tmp_path), load_size=8, crop_size=8), "x")


def test_user_urls_pass_the_same_validator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards(tmp_path, "gs:odd", [sample(0)], maxcount=1)  # a local file whose name reads like a scheme
    with pytest.raises(ShardsError, match="has the scheme gs:"):
        check_url("gs:odd-000000.tar", False, "data.x_train")
    assert expand_shard_spec("./gs:odd-{000000..000000}.tar", False, "data.x_train") == [
        str(tmp_path / "gs:odd-000000.tar")
    ]
    with pytest.raises(ShardsError, match="runs a shell command; set data.allow_pipe=true"):
        expand_shard_spec("pipe:cat x.tar", False, "data.x_train")
    with pytest.raises(ShardsError, match="does not exist or is not a regular file"):
        expand_shard_spec(str(tmp_path), False, "data.x_train")


def test_translate_writes_only_inside_out(tmp_path):
    hostile = tmp_path / "hostile.tar"
    image = png_bytes(np.full((8, 8, 3), 90, np.uint8))
    with tarfile.open(hostile, "w") as tar:
        for name in ("../../escape.png", "/abs/escape2.png", "ok/../../../escape3.png", "plain.png"):
            info = tarfile.TarInfo(name)
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    export = untrained_export(load_config(None, [*TINY_MODEL, "data.crop_size=8"]), tmp_path / "e")
    out = tmp_path / "deep" / "er" / "out"
    cmd = ["-m", "trainer.translate", "--weights", str(export), "--direction", "x2y"]
    result = run_bounded([sys.executable, *cmd, "--input", str(hostile), "--out", str(out)], timeout_s=120)
    assert result.returncode == 0, result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["abs/escape2.png", "escape.png", "ok/escape3.png", "plain.png"]
    assert [p for p in tmp_path.rglob("escape*") if out not in p.parents] == []
    assert not Path("/abs/escape2.png").exists()


@pytest.mark.parametrize(
    "data,reason",
    [
        (huge_png(), "image is 10000x10000 pixels, over the limit of 67108864"),
        (huge_png(60000, 60000), "image does not decode .DecompressionBombError"),  # PIL's own limit, first
        (b"not an image at all", "image is in no format PIL can identify"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], r"image does not decode \(OSError"),
    ],
    ids=["bomb", "huge-bomb", "not-an-image", "truncated"],
)
def test_undecodable_images_are_corrupt_samples(data, reason):
    with pytest.raises(BadSample, match=reason) as err:
        decode_rgb(data)
    assert err.value.kind == "corrupt"


@pytest.mark.parametrize(
    "value,reason",
    [
        (npy_bytes(np.zeros(3, np.float32)), r"hist.npy is float32 of shape \(3,\), expected \(24,\)"),
        (npy_bytes(np.full(24, np.nan, np.float32)), "hist.npy holds non-finite values"),
        (npy_bytes(np.array(["x"] * 24)), "expected .24,. numbers"),
        (npy_bytes(np.array([{}] * 24, dtype=object)), "hist.npy does not load"),  # a pickle: never loaded
        (b"not npy", "hist.npy does not load"),
    ],
    ids=["shape", "nan", "strings", "pickle", "garbage"],
)
def test_malformed_histograms_are_bad_samples(value, reason):
    with pytest.raises(BadSample, match=reason):
        decode_extra({"hist.npy": value}, "hist")


def test_bombs_and_malformed_extras_are_counted_by_the_loader_and_verify(tmp_path):
    hist = npy_bytes(np.ones(24, np.float32) / 8)
    xs = [sample(i, **{"hist.npy": hist}) for i in range(6)]
    xs[1]["png"] = huge_png()
    xs[2]["hist.npy"] = npy_bytes(np.zeros(5, np.float32))
    xs[3]["hist.npy"] = npy_bytes(np.array([{}] * 24, dtype=object))
    x = write_shards(tmp_path, "x-train", xs, maxcount=6)
    y = write_shards(tmp_path, "y-train", [sample(i, **{"hist.npy": hist}) for i in range(6)], maxcount=6)
    write_manifest(tmp_path, {"x-train": split_entry(x, (8, 8)), "y-train": split_entry(y, (8, 8))})
    cfg = DataConfig(root=str(tmp_path), load_size=8, crop_size=8, extra="hist", num_workers=0, shuffle_buffer=1)
    stream = iter(UnpairedShards(cfg, batch_size=3, seed=0, rank=0, world_size=1, slot_states={}, offset=0))
    first = next(stream)
    assert first["bad"] == {"corrupt": 3} and first["x"].shape == (3, 3, 8, 8)
    assert any("10000x10000 pixels" in e for e in first["bad_examples"])
    result = run_bounded([sys.executable, "-m", "shards.verify", str(tmp_path)], timeout_s=120)
    assert result.returncode == 1
    assert "x-train-000000.tar:000001: image is 10000x10000 pixels, over the limit" in result.stdout
    assert "x-train-000000.tar:000002: hist.npy is float32 of shape (5,)" in result.stdout
    assert "x-train-000000.tar:000003: hist.npy does not load" in result.stdout
    assert "x-train-000000.tar: 3 of 6 samples bad" in result.stdout
    assert "y-train" not in result.stdout.replace(f"{tmp_path}:", "")


@pytest.mark.timeout(120)
def test_the_pixel_limit_is_configurable(tmp_path):
    big = {"__key__": "000000", "png": png_bytes(np.zeros((64, 64, 3), np.uint8))}
    for split in ("x-train", "y-train"):
        write_shards(tmp_path, split, [big], maxcount=1)
    entries = {s: split_entry([shard_entry(tmp_path / f"{s}-000000.tar", 1)], (64, 64)) for s in ("x-train", "y-train")}
    write_manifest(tmp_path, entries)

    def first_batch(max_pixels: int) -> dict:
        cfg = DataConfig(root=str(tmp_path), load_size=64, crop_size=64, max_image_pixels=max_pixels, num_workers=1)
        loader = UnpairedLoader(cfg, 1, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
        return next(loader)

    assert first_batch(64 * 64)["x"].shape == (1, 3, 64, 64)
    # Every sample is over the limit now: the worker, which never completes a batch, stops the run.
    with pytest.raises(RuntimeError, match=r"100 of 100 samples read were bad \(corrupt=100\), more than"):
        first_batch(64 * 64 - 1)
