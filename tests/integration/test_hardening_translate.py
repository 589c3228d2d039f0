"""translate and evaluate on what does not fit (issue 27): an image smaller than the generator's multiple keeps its
size (padded, cropped back); a hostile or damaged export is refused in one line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save

from tests.conftest import evaluate_cli, rewrite_listed, run_bounded, untrained_export
from tests.unit.test_hardening_export import TINY
from trainer.config.load import load_config


@pytest.fixture()
def export_dir(tmp_path) -> Path:
    return untrained_export(load_config(None, TINY), tmp_path / "export")


def translate_cli(*args: object):
    return run_bounded([sys.executable, "-m", "trainer.translate", *map(str, args)], timeout_s=120)


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_images_smaller_than_the_generators_multiple_keep_their_size(export_dir, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    write_image(source / "big.png", 40, 30)
    write_image(source / "tiny.png", 3, 3)
    write_image(source / "line.png", 9, 1)
    for size in ("0", None):  # --size 0 is the default: each image's own size
        flags = ("--size", size) if size else ()
        result = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", out, *flags)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert "translated 3 images (x2y)" in result.stdout
        sizes = {p.name: Image.open(p).size for p in out.iterdir()}
        assert sizes == {"big.png": (40, 30), "tiny.png": (3, 3), "line.png": (9, 1)}
    negative = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", out,
                             "--size", "-1")  # fmt: skip
    assert negative.returncode == 2 and negative.stderr.strip().splitlines() == [
        "translate: --size -1: expected a side in pixels, or 0 for each image's own size"
    ]


def hostile(export_dir: Path, kind: str) -> Path:
    """The export made hostile: a model.json out of bounds, a flipped byte, or all-NaN weights."""
    if kind == "image_size":
        meta = json.loads((export_dir / "model.json").read_text())
        rewrite_listed(export_dir, "model.json", json.dumps({**meta, "image_size": 100000}).encode())
    elif kind == "flipped":
        data = bytearray((export_dir / "g_xy.safetensors").read_bytes())
        data[-1] ^= 0x01
        (export_dir / "g_xy.safetensors").write_bytes(bytes(data))
    else:
        nan = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(export_dir / "g_xy.safetensors")).items()}
        rewrite_listed(export_dir, "g_xy.safetensors", save(nan))
    return export_dir


EXPECTED = {  # patterns
    "image_size": r": model\.json: image_size=100000 is out of bounds; expected a multiple of 4 in \[1, 8192\] .*",
    "flipped": r" is damaged: g_xy\.safetensors does not match its sha256 in COMPLETE",
    "nan": r": g_xy\.safetensors: \S+ holds NaN or infinite values; refusing weights that are not finite",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_translate_refuses_a_hostile_export_in_one_line(kind, export_dir, tmp_path):
    write_image(tmp_path / "in" / "a.png", 8, 8)
    export_dir = hostile(export_dir, kind)
    result = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", tmp_path / "in",
                           "--out", tmp_path / "out")  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.fullmatch(f"translate: export {re.escape(str(export_dir))}{EXPECTED[kind]}", lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_all_nan_export_in_one_line(export_dir, colour_shards):
    result, metrics = evaluate_cli(hostile(export_dir, "nan"), colour_shards, 4)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and metrics is None, result.stderr
    assert re.fullmatch(f"evaluate: export {re.escape(str(export_dir))}{EXPECTED['nan']}", lines[0]), lines[0]
