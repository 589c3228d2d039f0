"""Users' own image formats through the whole path, write -> train -> export -> translate: shards.write keeps each
domain's channels and bit depth (refusing a domain that mixes them unless asked to convert), training builds the
units for them, and translate writes the target's format back; 8-bit RGB is what it was."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from shards.pixels import PixelFormat, read_pixels
from tests.conftest import run_bounded, train_command
from trainer.checkpoint.export import load_generators
from trainer.data.formats import from_unit_range, to_unit_range
from trainer.translate import save_image

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "model.n_layers_d=1", "train.batch_size=2",
        "train.steps=3", "data.load_size=16", "data.crop_size=16", "logging.every_steps=1", "eval.every_steps=3",
        "eval.images=4", "logging.image_every_steps=3", "logging.sample_images=2", "train.precision=fp32"]  # fmt: skip


def scene(rng: np.random.Generator, pixel_format: PixelFormat, size: int = 20) -> np.ndarray:
    """A smooth random image [size, size, C] of `pixel_format` (a gradient plus noise), using the full range."""
    ramp = np.linspace(0, 1, size)[:, None, None] * rng.uniform(0.2, 1, pixel_format.channels)
    values = np.clip(ramp + rng.normal(0, 0.05, (size, size, pixel_format.channels)), 0, 1)
    dtype = np.uint16 if pixel_format.bits == 16 else np.uint8
    return np.round(values * pixel_format.max_value).astype(dtype)


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, pixels.transpose(2, 0, 1), photometric="minisblack")  # one page per band
    else:
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)


def image_folders(root: Path, formats: dict[str, tuple[PixelFormat, str]], count: int = 6) -> Path:
    """trainA/testA of X's format, trainB/testB of Y's, `count` images each (tests share names)."""
    rng = np.random.default_rng(0)
    for domain, folder in (("x", "A"), ("y", "B")):
        pixel_format, suffix = formats[domain]
        for part, n in (("train", count), ("test", 2)):
            for i in range(n):
                save(root / f"{part}{folder}" / f"img{i}{suffix}", scene(rng, pixel_format))
    return root


def write_shards(root: Path, *flags: str) -> Path:
    out = root.with_name(root.name + "-shards")
    cmd = [sys.executable, "-m", "shards.write", "--root", str(root), "--out", str(out), "--format", "png", *flags]
    result = run_bounded(cmd)
    assert result.returncode == 0, result.stderr
    return out


def train(data: Path, run_dir: Path, *extra: str) -> str:
    result = run_bounded(train_command(data, run_dir, *TINY, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def translate(weights: Path, direction: str, source: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "trainer.translate", "--weights", str(weights), "--direction", direction,
           "--input", str(source), "--out", str(out)]  # fmt: skip
    result = run_bounded(cmd)
    assert result.returncode == 0, result.stderr


CASES = {  # X's and Y's (format, file suffix); the outputs' suffix of x2y and y2x
    "grey16": ({"x": (PixelFormat(1, 16), ".png"), "y": (PixelFormat(1, 16), ".png")}, (".png", ".png")),
    "rgb_to_grey": ({"x": (PixelFormat(3, 8), ".png"), "y": (PixelFormat(1, 8), ".png")}, (".png", ".png")),
    "tiff_4_bands": ({"x": (PixelFormat(4, 16), ".tif"), "y": (PixelFormat(3, 8), ".png")}, (".tif", ".tif")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_format_goes_through_write_train_export_and_translate(case, tmp_path):
    formats, suffixes = CASES[case]
    data = write_shards(image_folders(tmp_path / "images", formats))
    manifest = json.loads((data / "manifest.json").read_text())
    for split, entry in manifest["splits"].items():
        assert entry["format"] == formats[split[0]][0].to_json(), split
        assert entry["sizes"] == {"min": [20, 20], "max": [20, 20], "square": True}
    log = train(data, tmp_path / "run")
    x, y = formats["x"][0], formats["y"][0]
    assert f"images: X {x.describe()}, Y {y.describe()}" in log
    assert ("identity loss off: the channel counts differ" in log) == (x.channels != y.channels)

    export = tmp_path / "run" / "export"
    gens = load_generators(export)
    assert (gens.pixel_format("x"), gens.pixel_format("y")) == (x, y)
    for direction, (source, target), suffix in zip(("x2y", "y2x"), ((x, y), (y, x)), suffixes):
        folder = tmp_path / "images" / f"test{'A' if direction == 'x2y' else 'B'}"
        out = tmp_path / direction
        translate(export, direction, folder, out)
        for path in sorted(folder.iterdir()):
            written = read_pixels((out / path.name).with_suffix(suffix).read_bytes(), 1 << 20)
            assert written.shape == (20, 20, target.channels) and written.dtype == (
                np.uint16 if target.bits == 16 else np.uint8
            )
            net = gens.g_xy if direction == "x2y" else gens.g_yx
            pixels = torch.from_numpy(read_pixels(path.read_bytes(), 1 << 20).astype(np.int64)).permute(2, 0, 1)
            with torch.no_grad():  # 20 px: a multiple of the generator's 4, so translate does not pad
                expected = from_unit_range(net(to_unit_range(pixels, source)[None])[0], target)
            difference = torch.from_numpy(written.astype(np.int64)).permute(2, 0, 1) - expected.long()
            assert difference.abs().max() <= 1  # a rounding flip where a batch of two differs in the last bit


def test_8_bit_rgb_shards_of_an_earlier_version_train_to_the_same_weights(tmp_path):
    rgb = (PixelFormat(3, 8), ".png")
    data = write_shards(image_folders(tmp_path / "images", {"x": rgb, "y": rgb}))
    with tarfile.open(data / "x-train-000000.tar") as tar:  # the bytes PIL's RGB conversion and PNG encoder give
        for i in range(6):
            reference = io.BytesIO()
            Image.open(tmp_path / "images" / "trainA" / f"img{i}.png").convert("RGB").save(reference, format="PNG")
            assert tar.extractfile(f"img{i}.png").read() == reference.getvalue()
    old = tmp_path / "old-shards"
    old.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["splits"].values():  # as written before formats and size ranges were recorded
        del entry["format"], entry["sizes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for path in data.glob("*.tar"):
        (old / path.name).write_bytes(path.read_bytes())
    train(data, tmp_path / "new-run", "eval.every_steps=0")
    train(old, tmp_path / "old-run", "eval.every_steps=0")
    new, before = (load_generators(tmp_path / run / "export") for run in ("new-run", "old-run"))
    for name in ("g_xy", "g_yx"):
        for (key, a), b in zip(getattr(new, name).state_dict().items(), getattr(before, name).state_dict().values()):
            assert torch.equal(a, b), key


def test_a_config_that_contradicts_the_data_stops_the_cli_in_one_line(tmp_path):
    grey = (PixelFormat(1, 16), ".png")
    data = write_shards(image_folders(tmp_path / "images", {"x": grey, "y": grey}, count=2))
    result = run_bounded(train_command(data, tmp_path / "run", *TINY, "model.x_channels=3"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.x_channels=3 contradicts data.root={data}: its x-train images are 16-bit with 1 channel; "
        "leave model.x_channels unset (null) to take the data's"
    )
    assert not (tmp_path / "run").exists()


def test_outputs_keep_their_names_unless_the_format_cannot_hold_the_pixels(tmp_path):
    grey16 = torch.full((1, 4, 6), 40000, dtype=torch.int32)
    rgb = torch.zeros(3, 4, 6, dtype=torch.uint8)
    assert save_image(rgb, tmp_path, "a/Photo.JPG") == tmp_path / "a" / "Photo.JPG"
    assert save_image(rgb, tmp_path, "no_suffix") == tmp_path / "no_suffix.png"
    written = save_image(grey16, tmp_path, "scan.jpg", PixelFormat(1, 16))
    assert written == tmp_path / "scan.png" and read_pixels(written.read_bytes(), 100).max() == 40000
