"""`trainer.translate`: exported weights reproduce the in-training generators; the CLI on image directories,
shard directories and run directories; one-line errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, run_bounded, train_command, untrained_export
from trainer.checkpoint import save_generators
from trainer.config import load_config
from trainer.engine import Engine
from trainer.evaluate import eval_mode
from trainer.export import load_inference_generators
from trainer.pool import ImagePool
from trainer.train import build_training, train_step
from trainer.translate import translate_batches

SMALL = ["model.ngf=8", "model.n_blocks=1", "train.precision=fp32"]


def demo_config(data: Path, run_dir: Path, *overrides: str):
    return load_config(
        REPO / "configs/demo-cpu.yaml", [f"data.root={data}", f"train.run_dir={run_dir}", *SMALL, *overrides]
    )


def test_exported_weights_give_the_in_training_outputs(colour_shards, tmp_path):
    cfg = demo_config(colour_shards, tmp_path / "run", "train.batch_size=2")
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    units, _, _ = build_training(cfg, engine)
    pools = (ImagePool(0, seed=0), ImagePool(0, seed=1))
    data = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few real updates, so the weights are not the initial ones
        batch = {d: torch.rand(2, 3, 32, 32, generator=data) * 2 - 1 for d in ("x", "y")}
        train_step(engine, units, pools, [batch], cfg.loss)
    gens = engine.unwrap("g")
    x = torch.rand(5, 3, 32, 32, generator=data) * 2 - 1
    with eval_mode(gens):
        in_training = {"x2y": gens.g_xy(x), "y2x": gens.g_yx(x)}
    save_generators(tmp_path / "export", engine.full_state_dict("g"), cfg.model, cfg.data)
    engine.end()

    exported = load_inference_generators(tmp_path / "export")
    with torch.no_grad():
        assert (exported.g_xy(x) - in_training["x2y"]).abs().max().item() <= 1e-6
        assert (exported.g_yx(x) - in_training["y2x"]).abs().max().item() <= 1e-6
    pixels = x.add(1).mul(127.5).round().to(torch.uint8)  # what a PNG holds
    items = [(f"{i}.png", image, None) for i, image in enumerate(pixels)]
    outputs = list(translate_batches(exported, "x2y", items, batch_size=2))
    assert [name for name, _, _ in outputs] == [f"{i}.png" for i in range(5)]
    expected = exported.g_xy(pixels.float().div(127.5).sub(1)).detach().clamp(-1, 1).add(1).mul(127.5).round()
    assert torch.equal(torch.stack([out for _, _, out in outputs]).float(), expected)


@pytest.fixture()
def export_dir(tmp_path, colour_shards) -> Path:
    return untrained_export(demo_config(colour_shards, tmp_path / "run"), tmp_path / "export")


def translate_cli(*args: str):
    return run_bounded([sys.executable, "-m", "trainer.translate", *map(str, args)], timeout_s=120)


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)


def test_cli_translates_an_image_directory_keeping_names(export_dir, tmp_path):
    write_image(tmp_path / "in" / "a.png", (40, 30))
    write_image(tmp_path / "in" / "sub" / "b.jpg", (32, 32))
    out = tmp_path / "out"
    result = translate_cli("--weights", export_dir, "--direction", "y2x", "--input", tmp_path / "in", "--out", out,
                           "--side-by-side", "--batch-size", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "translated 2 images (y2x)" in result.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == [
        "a.png", "compare/a.png", "compare/sub/b.jpg", "sub/b.jpg",
    ]  # fmt: skip
    assert Image.open(out / "a.png").size == (32, 32)  # resized to the training resolution
    assert Image.open(out / "compare" / "a.png").size == (64, 32)  # input | output
    native = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", tmp_path / "in",
                           "--out", tmp_path / "native", "--size", "0")  # fmt: skip
    assert native.returncode == 0, native.stderr
    assert Image.open(tmp_path / "native" / "a.png").size == (40, 28)  # cropped to a multiple of 4


def test_cli_translates_a_run_directory_on_shards(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    trained = run_bounded(train_command(colour_shards, run_dir, *SMALL, "train.steps=2", "eval.images=4"), 300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "out"
    result = translate_cli("--weights", run_dir, "--direction", "x2y", "--input", colour_shards, "--out", out)
    assert result.returncode == 0, result.stderr
    keys = sorted(p.stem for p in out.glob("*.png"))
    assert len(keys) == json.loads((colour_shards / "manifest.json").read_text())["splits"]["x-test"]["samples"]


def test_cli_errors_are_one_line(export_dir, tmp_path):
    write_image(tmp_path / "rgba" / "a.png", (32, 32), "RGBA")
    cases = {
        "no such input": (["--input", tmp_path / "nope"], "translate: --input", "does not exist"),
        "RGBA image": (
            ["--input", tmp_path / "rgba"],
            "translate:",
            "has 4 channel(s) (RGBA); the generators take RGB",
        ),
        "no such weights": (["--weights", tmp_path / "nope"], "translate:", "neither an export directory"),
    }
    for name, (args, prefix, message) in cases.items():
        full = {"--weights": export_dir, "--input": tmp_path / "rgba", **dict(zip(args[::2], args[1::2]))}
        result = translate_cli(*[str(v) for kv in full.items() for v in kv], "--direction", "x2y", "--out", tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith(prefix) and message in lines[0], (name, lines[0])
    converted = translate_cli("--weights", export_dir, "--input", tmp_path / "rgba", "--direction", "x2y",
                              "--out", tmp_path / "out", "--convert-rgb")  # fmt: skip
    assert converted.returncode == 0, converted.stderr


def test_weights_of_another_architecture_are_refused_in_one_line(export_dir):
    meta = json.loads((export_dir / "model.json").read_text())
    meta["model"]["generator"] = "unet_article"
    (export_dir / "model.json").write_text(json.dumps(meta))
    result = translate_cli("--weights", export_dir, "--input", export_dir, "--direction", "x2y", "--out", export_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "the g_xy weights do not fit generator=unet_article" in lines[0]
