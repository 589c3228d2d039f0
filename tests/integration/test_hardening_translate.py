"""translate and evaluate on what does not fit (issue 27): an image smaller than the generator's multiple at
--size 0 is skipped and named, the others are written; a hostile or damaged export is refused in one line."""

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
from trainer.checkpoint.export import load_generators
from trainer.config.load import load_config
from trainer.translate import translate_batches


@pytest.fixture()
def export_dir(tmp_path) -> Path:
    return untrained_export(load_config(None, TINY), tmp_path / "export")


def translate_cli(*args: object):
    return run_bounded([sys.executable, "-m", "trainer.translate", *map(str, args)], timeout_s=120)


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_size_0_skips_images_smaller_than_the_generators_multiple(export_dir, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    write_image(source / "big.png", 40, 30)
    write_image(source / "tiny.png", 3, 3)
    result = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", out,
                           "--size", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "translated 1 images (x2y)" in result.stdout and "skipped 1" in result.stdout
    reason = "3x3 px is smaller than the generator's multiple of 4 px (--size 0 keeps sizes)"
    assert result.stderr.strip().splitlines() == [f"translate: skipped tiny.png: {reason}"]
    assert [p.name for p in out.iterdir()] == ["big.png"] and Image.open(out / "big.png").size == (40, 28)

    (source / "big.png").unlink()
    nothing = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out",
                            tmp_path / "o2", "--size", "0")  # fmt: skip
    assert nothing.returncode == 2 and nothing.stderr.strip().splitlines() == [
        f"translate: nothing in --input {source} could be translated (1 skipped; the first: tiny.png: {reason})"
    ]

    skipped: list[str] = []
    tiny = torch.zeros(3, 2, 9, dtype=torch.uint8)
    items = [("a", tiny, None), ("b", torch.zeros(3, 8, 8, dtype=torch.uint8), None)]
    outputs = list(translate_batches(load_generators(export_dir), "x2y", items, size=0, skipped=skipped))
    assert [name for name, _, _ in outputs] == ["b"]
    assert skipped == ["a: 9x2 px is smaller than the generator's multiple of 4 px (--size 0 keeps sizes)"]


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
