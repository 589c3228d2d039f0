"""`trainer.translate`: exported weights reproduce the in-training generators; the CLI on image directories,
shard directories and run directories; one-line errors for bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.decode import decode_rgb
from tests.conftest import REPO, rewrite_listed, run_bounded, train_command, untrained_export
from trainer.build import build_training
from trainer.checkpoint.export import load_inference_generators, save_generators
from trainer.config.load import load_config
from trainer.eval.evaluator import eval_mode
from trainer.runtime.engine import Engine
from trainer.train import train_step
from trainer.translate import translate_batches

SMALL = ["model.ngf=8", "model.n_blocks=1", "train.precision=fp32"]


def demo_config(data: Path, run_dir: Path, *overrides: str):
    return load_config(
        REPO / "configs/demo-cpu.yaml", [f"data.root={data}", f"train.run_dir={run_dir}", *SMALL, *overrides]
    )


def test_exported_weights_give_the_in_training_outputs(colour_shards, tmp_path):
    cfg = demo_config(colour_shards, tmp_path / "run", "train.batch_size=2", "train.pool_size=0")
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    run = build_training(cfg, engine)
    data = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few real updates, so the weights are not the initial ones
        batch = {d: torch.rand(2, 3, 32, 32, generator=data) * 2 - 1 for d in ("x", "y")}
        train_step(run, [batch])
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
    assert Image.open(out / "a.png").size == (40, 30)  # its own size (30 rows padded to 32 and cropped back)
    assert Image.open(out / "compare" / "a.png").size == (80, 30)  # input | output
    resized = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", tmp_path / "in",
                            "--out", tmp_path / "resized", "--size", "16")  # fmt: skip
    assert resized.returncode == 0, resized.stderr
    assert Image.open(tmp_path / "resized" / "a.png").size == (16, 16)
    assert resized.stderr.strip().splitlines() == [
        "translate: --size 16 changes the aspect of images that are not square (the first: a.png, 40x30 px); "
        "without --size each keeps its size"
    ]


def test_own_size_is_padding_by_reflection_then_the_crop(export_dir):
    """An image that is not a multiple of the generator's (4 px): the output is G of the reflection-padded image,
    cropped back; a multiple goes through unpadded; images too small to reflect repeat their edge; batching by
    shape changes nothing."""
    gens = load_inference_generators(export_dir)
    rng = torch.Generator().manual_seed(0)
    odd, exact, tiny = (torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8)
                        for shape in [(3, 30, 37), (3, 32, 40), (3, 2, 1)])  # fmt: skip
    items = [("odd", odd, None), ("exact", exact, None), ("tiny", tiny, None), ("odd2", odd, None)]
    outputs = {name: out for name, _, out in translate_batches(gens, "x2y", items, batch_size=2)}
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "odd": (3, 30, 37), "exact": (3, 32, 40), "tiny": (3, 2, 1), "odd2": (3, 30, 37),
    }  # fmt: skip

    def direct(image, pads, mode):
        padded = torch.nn.functional.pad(image[None].float(), pads, mode=mode).div(127.5).sub(1)
        with torch.no_grad():
            return gens.g_xy(padded)[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)

    assert torch.equal(outputs["odd"], direct(odd, (1, 2, 1, 1), "reflect")[:, 1:31, 1:38])
    assert torch.equal(outputs["odd2"], outputs["odd"])
    assert torch.equal(outputs["exact"], direct(exact, (0, 0, 0, 0), "reflect"))
    # at least twice the multiple (8 px): the narrowest layer keeps 2 x 2 pixels for its instance norm
    assert torch.equal(outputs["tiny"], direct(tiny, (3, 4, 3, 3), "replicate")[:, 3:5, 3:4])


def test_cli_translates_a_run_directory_on_shards(colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    trained = run_bounded(train_command(colour_shards, run_dir, *SMALL, "train.steps=2", "eval.images=4"), 300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "out"
    result = translate_cli("--weights", run_dir, "--direction", "x2y", "--input", colour_shards, "--out", out)
    assert result.returncode == 0, result.stderr
    keys = sorted(p.stem for p in out.glob("*.png"))
    assert len(keys) == json.loads((colour_shards / "manifest.json").read_text())["splits"]["x-test"]["samples"]


def test_cli_converts_grey_rgba_and_palette_images_as_training_does(export_dir, tmp_path):
    source = tmp_path / "in"
    for name, mode in (("grey", "L"), ("rgba", "RGBA"), ("palette", "RGB")):
        write_image(source / f"{name}.png", (32, 32), mode)
    with Image.open(source / "palette.png") as image:
        image.convert("P").save(source / "palette.png")
    out = tmp_path / "out"
    result = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "translated 3 images (x2y)" in result.stdout and result.stderr.strip() == ""
    gens = load_inference_generators(export_dir)
    for name in ("grey", "rgba", "palette"):
        with Image.open(out / f"{name}.png") as written:
            assert (written.format, written.mode, written.size) == ("PNG", "RGB", (32, 32))
            pixels = torch.from_numpy(np.asarray(written).copy()).permute(2, 0, 1)
        # training's decoding of the same bytes, through the generator: the same output
        decoded = torch.from_numpy(decode_rgb((source / f"{name}.png").read_bytes()).copy()).permute(2, 0, 1)
        [(_, _, expected)] = translate_batches(gens, "x2y", [(name, decoded, None)])
        assert torch.equal(pixels, expected), name


def test_cli_skips_unreadable_files_naming_each(export_dir, tmp_path):
    source = tmp_path / "in"
    write_image(source / "a.png", (32, 32))
    (source / "b.png").write_bytes(b"not an image at all")
    os.mkfifo(source / "c.png")  # never opened: a FIFO would block the read
    result = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "translated 1 images (x2y)" in result.stdout and "skipped 2" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"translate: skipped {source / 'b.png'}: image ")  # then shards.decode's reason
    assert lines[1] == f"translate: skipped {source / 'c.png'}: a FIFO, not a regular file"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    (source / "a.png").unlink()
    nothing = translate_cli("--weights", export_dir, "--direction", "x2y", "--input", source, "--out", tmp_path / "o2")
    lines = nothing.stderr.strip().splitlines()
    assert nothing.returncode == 2 and len(lines) == 1, nothing.stderr
    assert lines[0].startswith(f"translate: nothing in --input {source} could be translated (2 skipped; the first: ")


def test_cli_errors_are_one_line(export_dir, tmp_path):
    write_image(tmp_path / "rgb" / "a.png", (32, 32))
    (tmp_path / "not_an_export").mkdir()
    (tmp_path / "not_an_export" / "weights.safetensors").write_bytes(b"x")
    safetensors = export_dir / "g_xy.safetensors"
    cases = {
        "no such input": (["--input", tmp_path / "nope"], "translate: --input", "does not exist"),
        "no such weights": (["--weights", tmp_path / "nope"], "translate:", f"--weights {tmp_path / 'nope'} does not "
                            "exist"),
        "a safetensors file": (["--weights", safetensors], "translate:", f"--weights {safetensors} is a file; give "
                               f"the export directory that holds it ({export_dir})"),
        "another file": (["--weights", tmp_path / "not_an_export" / "weights.safetensors"], "translate:",
                         "is a file; expected an export directory (model.json) or a run directory (config.yaml)"),
        "weights a plain directory": (["--weights", tmp_path / "rgb"], "translate:", "neither an export directory"),
        "out a file": (["--out", tmp_path / "rgb" / "a.png"], "translate: --out", "exists and is not a directory"),
    }  # fmt: skip
    for name, (args, prefix, message) in cases.items():
        given = dict(zip(args[::2], args[1::2]))
        full = {"--weights": export_dir, "--input": tmp_path / "rgb", "--out": tmp_path / "out", **given}
        result = translate_cli(*[str(v) for kv in full.items() for v in kv], "--direction", "x2y")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith(prefix) and message in lines[0], (name, lines[0])


def test_weights_of_another_architecture_are_refused_in_one_line(export_dir):
    meta = json.loads((export_dir / "model.json").read_text())
    meta["model"]["generator"] = "unet_article"
    rewrite_listed(export_dir, "model.json", json.dumps(meta).encode())
    result = translate_cli("--weights", export_dir, "--input", export_dir, "--direction", "x2y", "--out", export_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "the g_xy weights do not fit generator=unet_article" in lines[0]
