"""shards.verify and shards.info on shards without a manifest (plain tar files, brace patterns, directories of
*.tar), the image size distribution, unusable targets and hostile names."""

from __future__ import annotations

import io
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.encoding import npy_bytes, png_bytes
from shards.info import describe_sizes
from shards.manifest import split_entry, write_manifest
from shards.tar_shards import write_shards
from tests.conftest import REPO, run_bounded


def encoded(height: int, width: int, fmt: str = "PNG", value: int = 90) -> bytes:
    """An image of height x width pixels, encoded as `fmt`."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def plain_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar as GNU tar writes it from a folder of files (`tar cf x.tar 0001.jpg 0002.png ...`): regular file
    members in the given order, no webdataset conventions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(first: int, count: int) -> list[tuple[str, bytes]]:
    """`count` images 0001.jpg, 0002.png, ... (JPEG and PNG alternating), numbered from `first`."""
    return [
        (f"{i:04d}.jpg", encoded(16, 8, "JPEG", i)) if i % 2 else (f"{i:04d}.png", encoded(16, 8, "PNG", i))
        for i in range(first, first + count)
    ]


def tool(name: str, *args: object, cwd: Path = REPO):
    """`python -m shards.<name> ARGS...` from `cwd`, bounded."""
    cmd = [sys.executable, "-m", f"shards.{name}", *map(str, args)]
    return run_bounded(cmd, timeout_s=120, env={"PYTHONPATH": str(REPO)}, cwd=cwd)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_verify_passes_sound_plain_tar_files_and_brace_patterns(tmp_path):
    plain_tar(tmp_path / "x-000000.tar", good_members(1, 3))
    plain_tar(tmp_path / "x-000001.tar", good_members(4, 2))
    single, pattern = tmp_path / "x-000000.tar", f"{tmp_path}/x-{{000000..000001}}.tar"
    result = tool("verify", single, pattern)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{single}: 1 shard file(s), no manifest.json",
        f"{single}: 1 shard file(s), 3 samples, 0 bad, 0 problem(s)",
        f"{pattern}: 2 shard file(s), no manifest.json",
        f"{pattern}: 2 shard file(s), 5 samples, 0 bad, 0 problem(s)",
        "all 2 targets: 0 problem(s)",
    ]
    assert result.stderr == ""


def test_verify_names_the_file_key_and_reason_of_each_bad_sample(tmp_path):
    shard = plain_tar(
        tmp_path / "shard.tar",
        [
            *good_members(1, 2),
            ("0003.png", b"not an image"),
            ("0004.jpg", encoded(40, 40, "JPEG")),  # 1600 pixels, over --max-pixels 1000
            ("0005.png", encoded(8, 8)),
            ("0005.hist.npy", npy_bytes(np.zeros(5, np.float32))),
            ("0006.bmp", encoded(8, 8, "BMP")),  # no image under a training extension
            ("0007.png", encoded(8, 8)),
            ("0007.label.png", b"garbage"),
        ],
    )
    result = tool("verify", shard, "--max-pixels", 1000)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"{shard}:0003: image is in no format PIL can identify")
    assert lines[2] == f"{shard}:0004: image is 40x40 pixels, over the limit of 1000 (max_image_pixels)"
    assert lines[3].startswith(f"{shard}:0005: hist.npy is float32 of shape (5,)")
    assert lines[4] == f"{shard}:0006: no image"
    assert lines[5].startswith(f"{shard}:0007: label.png is in no format PIL can identify")
    assert lines[6:] == [f"{shard}: 5 of 7 samples bad", f"{shard}: 1 shard file(s), 7 samples, 5 bad, 6 problem(s)"]


def test_verify_reports_unreadable_tars(tmp_path):
    whole = plain_tar(tmp_path / "whole.tar", good_members(1, 4)).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 3])  # ends inside a member
    (tmp_path / "text.tar").write_bytes(b"not a tar file\n" * 100)
    result = tool("verify", tmp_path / "cut.tar", tmp_path / "text.tar")
    assert result.returncode == 1
    assert f"{tmp_path / 'cut.tar'}: unreadable tar (ReadError: unexpected end of data)" in result.stdout
    assert f"{tmp_path / 'text.tar'}: unreadable tar (ReadError: " in result.stdout
    assert result.stdout.splitlines()[-1] == "all 2 targets: 2 problem(s)"


def test_a_directory_without_manifest_is_its_sorted_tar_files(tmp_path):
    data = tmp_path / "data"
    plain_tar(data / "b.tar", [*good_members(1, 2), ("0003.png", b"bad b")])
    plain_tar(data / "a.tar", [("0001.png", b"bad a"), *good_members(2, 3)])
    (data / ".partial.tar").write_bytes(b"left out, as DIR/*.tar leaves it out")
    (data / "README.txt").write_text("not a shard")
    (data / "dir.tar").mkdir()  # not a regular file: skipped and named

    verify = tool("verify", data)
    assert verify.returncode == 1
    note = f"{data}: no manifest.json; reading its 2 *.tar files in name order (skipped, not regular files: dir.tar)"
    lines = verify.stdout.splitlines()
    assert lines[0] == note and len(lines) == 6
    assert lines[1].startswith(f"{data / 'a.tar'}:0001: image is in no format PIL can identify")
    assert lines[2] == f"{data / 'a.tar'}: 1 of 4 samples bad"
    assert lines[3].startswith(f"{data / 'b.tar'}:0003: image is in no format PIL can identify")
    assert lines[4] == f"{data / 'b.tar'}: 1 of 3 samples bad"
    assert lines[5] == f"{data}: 2 shard file(s), 7 samples, 2 bad, 4 problem(s)"

    info = tool("info", data, "--per-split", 4)
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert lines[0] == note
    assert lines[2].split() == [str(data), "7", "2", lines[2].split()[3], "none"]
    assert lines[3] == "  image sizes HxW (images): 16x8 (5)"
    assert lines[4] == "  bad: 2 unreadable image headers (python -m shards.verify names them)"
    assert lines[5] == f"contact sheet: {data / 'contact_sheet.png'} (rows: {data})"
    assert Image.open(data / "contact_sheet.png").size == (4 * 96, 96)


@pytest.mark.parametrize(
    "name,case",
    [("verify", case) for case in ("missing", "pipe", "pipe-in-list", "empty-dir", "dir-without-tars")]
    + [("info", case) for case in ("missing", "pipe", "empty-dir")],  # the same resolution as verify's
)
def test_unusable_targets_exit_2_with_one_line(name, case, tmp_path):
    plain_tar(tmp_path / "ok.tar", good_members(1, 1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0001.png").write_bytes(encoded(8, 8))
    marker = tmp_path / "MARKER"
    pipe = "is a pipe: command; the shard tools read local files only"
    no_shards = "has no manifest.json and no *.tar files; give its shard files, e.g."
    target, message = {
        "missing": (f"{tmp_path}/x-{{0..1}}.tar", f"shard {tmp_path}/x-0.tar does not exist or is not a regular file"),
        "pipe": (f"pipe:touch {marker}", f"'pipe:touch {marker}' {pipe}"),
        "pipe-in-list": (f"{tmp_path}/ok.tar pipe:touch {marker}", f"'{tmp_path}/ok.tar pipe:touch {marker}' {pipe}"),
        "empty-dir": (tmp_path / "empty", f"{tmp_path}/empty {no_shards} {tmp_path}/empty/*.tar"),
        "dir-without-tars": (tmp_path / "images", f"{tmp_path}/images {no_shards} {tmp_path}/images/*.tar"),
    }[case]
    before = files_under(tmp_path)
    result = tool(name, tmp_path / "ok.tar", target, cwd=tmp_path)  # a good first target changes nothing
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"shards.{name}: {message}"]
    assert result.stdout == "" and files_under(tmp_path) == before  # nothing read, no contact sheet


def test_info_reports_the_size_distribution_of_mixed_sizes(tmp_path):
    sizes = [(32, 32)] * 5 + [(20, 30)] * 3 + [(40, 10)] * 2 + [(64, 48), (8, 8)]  # height, width
    members = [
        (f"{i:04d}.png", encoded(h, w)) if i % 3 else (f"{i:04d}.jpg", encoded(h, w, "JPEG"))
        for i, (h, w) in enumerate(sizes)
    ]
    members += [("0100.jpg", b"\xff\xd8 a broken JPEG header"), ("0101.txt", b"no image")]
    plain_tar(tmp_path / "mixed-0.tar", members[:7])
    plain_tar(tmp_path / "mixed-1.tar", members[7:])
    spec = f"{tmp_path}/mixed-{{0..1}}.tar"
    result = tool("info", spec, "--sheet", tmp_path / "sheet.png", "--per-split", 3)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{spec}: 2 shard file(s), no manifest.json"
    assert lines[2].split()[:3] == [spec, "14", "2"]
    assert (
        lines[3] == "  image sizes HxW (images): 32x32 (5), 20x30 (3), 40x10 (2), 2 other sizes (2); min 8x8, max 64x48"
    )
    assert (
        lines[4] == "  bad: 1 unreadable image headers, 1 samples without an image (python -m shards.verify names them)"
    )
    assert Image.open(tmp_path / "sheet.png").size == (3 * 96, 96)


def test_size_distribution_format():
    assert describe_sizes(Counter()) == "no readable image"
    assert describe_sizes(Counter({(256, 256): 7})) == "256x256 (7)"
    tied = Counter({(20, 30): 2, (10, 10): 2, (300, 200): 1, (90, 120): 1})
    assert describe_sizes(tied, top=2) == "10x10 (2), 20x30 (2), 2 other sizes (2); min 10x10, max 300x200"


def test_info_on_a_manifest_directory_reads_sizes_and_extras_from_the_samples(tmp_path):
    hist = npy_bytes(np.full(24, 1 / 8, np.float32))
    xs = [{"__key__": f"{i:06d}", "png": png_bytes(np.zeros((16, 8 + 8 * (i % 2), 3), np.uint8))} for i in range(5)]
    for sample in xs[:3]:
        sample["hist.npy"] = hist
    xs[0]["label.png"] = png_bytes(np.zeros((16, 8), np.uint8))
    ys = [{"__key__": f"{i:06d}", "png": png_bytes(np.zeros((12, 12, 3), np.uint8))} for i in range(2)]
    x, y = write_shards(tmp_path, "x-train", xs, maxcount=2), write_shards(tmp_path, "y-train", ys, maxcount=2)
    write_manifest(tmp_path, {"x-train": split_entry(x, (8, 8)), "y-train": split_entry(y, (8, 8))})  # sizes lie
    result = tool("info", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{tmp_path}: manifest.json, 2 splits"
    assert lines[2].split()[:3] == ["x-train", "5", "3"] and lines[2].endswith("  hist.npy 3, label.png 1")
    assert lines[3] == "  image sizes HxW (images): 16x8 (3), 16x16 (2); min 16x8, max 16x16; 8-bit with 3 channels"
    assert lines[4].split()[:3] == ["y-train", "2", "1"] and lines[4].endswith("  none")
    assert lines[5] == "  image sizes HxW (images): 12x12 (2); 8-bit with 3 channels"
    assert lines[6] == f"contact sheet: {tmp_path / 'contact_sheet.png'} (rows: x-train, y-train)"


def test_hostile_member_names_are_only_printed(tmp_path):
    shard = plain_tar(
        tmp_path / "data" / "hostile.tar",
        [
            ("../../escape.png", encoded(8, 8)),
            ("/abs/escape2.png", encoded(8, 8)),
            ("ok/../../../escape3.png", encoded(8, 8)),
            ("evil\nFORGED: 0 problem(s).png", b"not an image"),
        ],
    )
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    before = files_under(tmp_path)
    verify = tool("verify", shard, cwd=work)
    info = tool("info", shard, cwd=work)
    assert verify.returncode == 1 and info.returncode == 0, verify.stderr + info.stderr
    assert f"{shard}:evil\\nFORGED: 0 problem(s): image is in no format PIL can identify" in verify.stdout
    assert not any(line.startswith("FORGED") for line in verify.stdout.splitlines() + info.stdout.splitlines())
    assert "  image sizes HxW (images): 8x8 (3)" in info.stdout
    assert files_under(tmp_path) - before == {work / "contact_sheet.png"}  # the default for a file target: .
    assert not Path("/abs/escape2.png").exists()


def test_a_shard_file_named_like_a_command_is_opened_as_a_file(tmp_path):
    data = tmp_path / "data"
    plain_tar(data / "pipe:touch MARKER; echo .tar", good_members(1, 2))
    for name in ("verify", "info"):
        result = tool(name, ".", cwd=data)  # "." joined naively to the name would read as a pipe: URL
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reading its 1 *.tar files" in result.stdout.splitlines()[0]
    assert not (data / "MARKER").exists()


def test_the_contact_sheet_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    data = tmp_path / "data"
    plain_tar(data / "x.tar", good_members(1, 2))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (data / "contact_sheet.png").symlink_to(victim)
    result = tool("info", data)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious"
    sheet = data / "contact_sheet.png"
    assert not sheet.is_symlink() and Image.open(sheet).size == (8 * 96, 96)
    assert sorted(p.name for p in data.iterdir()) == ["contact_sheet.png", "x.tar"]
