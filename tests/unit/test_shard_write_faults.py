"""shards.write on hostile inputs: zero-byte, non-image, truncated and decompression-bomb files, special files
named like images, missing label maps. Default: skip and name each; --strict: one line; never a .tar.tmp left."""

import io
import json
import os
import struct
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import write
from shards.manifest import read_manifest
from shards.tar_shards import write_shards, write_tar
from tests.conftest import run_bounded


def save_image(path: Path, value: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A flat RGB PNG of `value`, size (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def bomb_png(path: Path, side: int) -> None:
    """A valid 8x8 PNG whose IHDR claims side x side pixels, with a correct CRC."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # signature (8), then length (4) and type (4) of the first chunk
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # over chunk type + 13 data bytes
    path.write_bytes(bytes(data))


def truncated_jpeg(path: Path) -> None:
    """The first half of a noisy 64x64 JPEG: its header opens, its pixels do not decode."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


HOSTILE = {
    "x.jpg": ("zero bytes", lambda p: p.write_bytes(b"")),
    "y.jpg": ("not an image PIL can identify", lambda p: p.write_text("hello, not a JPEG")),
    "z.jpg": ("a dangling symlink, not a regular file", lambda p: os.symlink(p.parent / "gone.jpg", p)),
    "d.jpg": ("a directory, not a regular file", lambda p: p.mkdir()),
    "f.png": ("a FIFO, not a regular file", lambda p: os.mkfifo(p)),
    "bomb.png": ("decompression bomb: Image size (400000000 pixels) exceeds limit", lambda p: bomb_png(p, 20000)),
    "big.png": ("decompression bomb: Image size (100000000 pixels) exceeds limit", lambda p: bomb_png(p, 10000)),
    "trunc.jpg": ("corrupt or truncated image: image file is truncated", truncated_jpeg),
}
"""File name -> (the start of the reason shards.write gives, how to make it). PIL raises DecompressionBombError
over twice Image.MAX_IMAGE_PIXELS (bomb.png) and warns over it (big.png)."""


def make_hostile(folder: Path, name: str) -> str:
    """Create one hostile input in `folder`; returns the start of its expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    reason, make = HOSTILE[name]
    make(folder / name)
    return reason


def shards_write(*args: str | Path):
    """`python -m shards.write ARGS`, killed after 60 s (a FIFO must not hang the test)."""
    return run_bounded([sys.executable, "-m", "shards.write", *map(str, args)], timeout_s=60)


def temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tar.tmp"))


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [name.split(".")[0] for name in tar.getnames() if name.endswith(".jpg")]


def check_manifest_matches_tars(out: Path, split: str, samples: int) -> None:
    """The manifest counts `samples`, its shards are numbered densely from 0 and hold exactly those samples."""
    entry = read_manifest(out)["splits"][split]
    names = [s["name"] for s in entry["shards"]]
    assert entry["samples"] == samples
    assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
    assert [len(tar_keys(out / n)) for n in names] == [s["samples"] for s in entry["shards"]]
    assert sorted(out.glob(f"{split}-*.tar")) == [out / n for n in names]


@pytest.mark.timeout(120)
def test_unreadable_inputs_are_skipped_and_each_named_with_its_reason(tmp_path):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for i in range(5):
        save_image(x / f"a{i}.png", 40 * i)
        save_image(y / f"b{i}.png", 40 * i)
    os.symlink(x / "a0.png", x / "link.png")  # a symlink to a regular file is an image like any other
    reasons = {name: make_hostile(x, name) for name in HOSTILE}
    result = shards_write("--x", x, "--y", y, "--out", out, "--maxcount", "3", "--workers", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"skipped {len(HOSTILE)} unreadable input(s) (--strict stops at the first):"
    assert sorted(lines[1:]) == lines[1:] and len(lines) == 1 + len(HOSTILE)
    for name, reason in reasons.items():
        assert any(line.startswith(f"  x-train: {name} ({reason}") for line in lines), (name, lines)
    check_manifest_matches_tars(out, "x-train", 6)
    check_manifest_matches_tars(out, "y-train", 5)
    assert temporaries(out) == [] and not (out / write.PROGRESS).exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_strict_stops_at_the_first_unreadable_input_with_one_line(tmp_path, name):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for i in range(6):
        save_image(x / f"a{i}.png", 40 * i)  # three good shards before the hostile input
        save_image(x / f"zz{i}.png", 40 * i)  # and more after it, written while it fails
        save_image(y / f"b{i}.png", 40 * i)
    reason = make_hostile(x, name)
    result = shards_write("--x", x, "--y", y, "--out", out, "--maxcount", "2", "--workers", "2", "--strict")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"shards.write: {x / name}: {reason}")
    assert temporaries(out) == [] and not (out / "manifest.json").exists()
    progress = json.loads((out / write.PROGRESS).read_text())
    assert {"x-train-000000", "x-train-000001", "x-train-000002"} <= set(progress)
    assert "x-train-000003" not in progress


@pytest.mark.timeout(120)
def test_a_missing_label_map_is_an_unreadable_input(tmp_path):
    x, y, labels, out = tmp_path / "x", tmp_path / "y", tmp_path / "labels", tmp_path / "out"
    for i in range(4):
        save_image(x / f"a{i}.png", 40 * i)
        save_image(y / f"b{i}.png", 40 * i)
        save_image(labels / f"b{i}.png", i)
    for i in range(3):
        save_image(labels / f"a{i}.png", i)
    args = ("--x", x, "--y", y, "--labels-x", labels, "--labels-y", labels, "--maxcount", "3")
    result = shards_write(*args, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"  x-train: a3.png (label map {labels / 'a3.png'}: does not exist)" in result.stderr.splitlines()
    check_manifest_matches_tars(out, "x-train", 3)
    with tarfile.open(out / "x-train-000000.tar") as tar:
        assert {"a0.jpg", "a0.label.png", "a2.jpg", "a2.label.png"} <= set(tar.getnames())
    strict = shards_write(*args, "--out", tmp_path / "strict", "--strict")
    assert strict.returncode != 0
    assert strict.stderr.strip().splitlines() == [
        f"shards.write: {x / 'a3.png'}: label map {labels / 'a3.png'}: does not exist"
    ]
    assert temporaries(tmp_path / "strict") == []


@pytest.mark.timeout(120)
def test_a_split_without_readable_inputs_is_a_one_line_error_and_a_rerun_reads_it_again(tmp_path):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    make_hostile(x, "x.jpg")
    make_hostile(x, "y.jpg")
    for i in range(3):
        save_image(y / f"b{i}.png", 40 * i)
    result = shards_write("--x", x, "--y", y, "--out", out)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"shards.write: {x}: none of its 2 images is readable (first: x.jpg: zero bytes)"
    ]
    assert temporaries(out) == [] and not (out / "manifest.json").exists()
    (x / "x.jpg").unlink()
    save_image(x / "x.jpg", 7)  # fixed; y-train's finished shard is kept, x-train's are read again
    rerun = shards_write("--x", x, "--y", y, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    check_manifest_matches_tars(out, "x-train", 1)
    check_manifest_matches_tars(out, "y-train", 3)


def test_a_planned_shard_with_only_unreadable_inputs_leaves_no_gap(tmp_path):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for name in ("a0", "a1", "c0"):
        save_image(x / f"{name}.png", 50)
    for name in ("b0", "b1"):
        (x / f"{name}.png").write_bytes(b"")  # the whole second planned shard
    save_image(y / "y0.png", 50)
    write.main(["--x", str(x), "--y", str(y), "--out", str(out), "--maxcount", "2"])
    check_manifest_matches_tars(out, "x-train", 3)
    assert tar_keys(out / "x-train-000001.tar") == ["c0"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for i in range(3):
        save_image(x / f"a{i}.png", 40 * i)
        save_image(y / f"b{i}.png", 40 * i)
    out.mkdir()
    for name in ("x-train-000000.tar.tmp", "x-train-000009.tar.tmp", "y-train-000001.tar.tmp"):
        (out / name).write_bytes(b"half a tar from a killed run")
    write.main(["--x", str(x), "--y", str(y), "--out", str(out), "--maxcount", "2"])
    assert temporaries(out) == []
    check_manifest_matches_tars(out, "x-train", 3)
    check_manifest_matches_tars(out, "y-train", 3)


def test_a_failing_worker_leaves_no_temporary_and_the_rerun_resumes_densely(tmp_path, monkeypatch, capsys):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for name in ("a0", "a1", "c0", "c1", "d0", "d1"):
        save_image(x / f"{name}.png", 50)
    for name in ("b0", "b1"):
        (x / f"{name}.png").write_text("no image")  # the second planned shard has no readable input
    save_image(y / "y0.png", 50)
    calls = []

    def encode_failing_on_the_sixth(pixels, fmt, quality):
        calls.append(fmt)
        if len(calls) == 6:  # the second sample of the fourth planned shard: its .tar.tmp exists
            raise RuntimeError("disk full")
        return encode(pixels, fmt, quality)

    encode = write.encode_pixels
    monkeypatch.setattr(write, "ProcessPoolExecutor", ThreadPoolExecutor)  # workers see the patched encode
    monkeypatch.setattr(write, "encode_pixels", encode_failing_on_the_sixth)
    args = ["--x", str(x), "--y", str(y), "--out", str(out), "--maxcount", "2"]
    with pytest.raises(RuntimeError, match="disk full"):
        write.main(args)
    assert temporaries(out) == []
    progress = json.loads((out / write.PROGRESS).read_text())
    assert [progress[f"x-train-{i:06d}"]["name"] for i in range(3)] == [
        "x-train-000000.tar",
        None,
        "x-train-000001.tar",
    ]
    assert "x-train-000003" not in progress
    first = out / "x-train-000000.tar"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(write, "encode_pixels", encode)
    write.main(args)
    assert first.stat().st_mtime_ns == stamp  # resumed, not written again
    check_manifest_matches_tars(out, "x-train", 6)
    assert tar_keys(out / "x-train-000002.tar") == ["d0", "d1"]
    report = capsys.readouterr().err.splitlines()  # names the inputs skipped before the failure too
    assert report[-2:] == [
        "  x-train: b0.png (not an image PIL can identify)",
        "  x-train: b1.png (not an image PIL can identify)",
    ]


def test_skipping_keeps_shards_byte_reproducible_across_worker_counts(tmp_path):
    x, y = tmp_path / "x", tmp_path / "y"
    for i in range(7):
        save_image(x / f"a{i}.png", 30 * i)
        save_image(y / f"b{i}.png", 30 * i)
    make_hostile(x, "trunc.jpg")
    make_hostile(x, "bomb.png")
    digests = []
    for workers in ("1", "3"):
        out = tmp_path / f"out{workers}"
        write.main(["--x", str(x), "--y", str(y), "--out", str(out), "--maxcount", "2", "--workers", workers])
        digests.append([s["sha256"] for s in read_manifest(out)["splits"]["x-train"]["shards"]])
    assert digests[0] == digests[1] and len(digests[0]) == 4


def test_write_tar_removes_its_file_when_the_samples_fail(tmp_path):
    def samples():
        yield {"__key__": "a", "txt": b"one"}
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError):
        write_tar(tmp_path / "s.tar.tmp", samples())
    with pytest.raises(RuntimeError):
        write_shards(tmp_path, "x-train", samples(), maxcount=5)
    assert list(tmp_path.iterdir()) == []
    assert write_tar(tmp_path / "empty.tar.tmp", []) == 0 and list(tmp_path.iterdir()) == []
