"""Each domain's pixel format in the config: taken from the manifest, stated values checked against it, and the
terms that need equal channel counts turned off or refused."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from shards.pixels import PixelFormat
from shards.synthetic import write_synthetic
from trainer.checkpoint.format import TRAIN_STATE, CheckpointError
from trainer.checkpoint.resume import check_architecture
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.data.formats import aspect_note, data_manifest, formats_note, pixel_format, resolve_formats


def resolved(cfg):
    """`cfg` resolved as training resolves it: from data.root's manifest, read once."""
    return resolve_formats(cfg, data_manifest(cfg))


@pytest.fixture(scope="module")
def grey16(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("grey16"), "grey16", size=8, train=2, test=2).parent


@pytest.fixture(scope="module")
def colour2grey(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("c2g"), "colour2grey", size=8, train=2, test=2).parent


def test_the_formats_come_from_the_manifest(grey16, colour2grey):
    cfg = resolved(load_config(None, [f"data.root={grey16}"]))
    assert (cfg.model.x_channels, cfg.model.y_channels, cfg.data.x_bits, cfg.data.y_bits) == (1, 1, 16, 16)
    assert cfg.model.input_nc == 1 and cfg.loss.lambda_identity == 0.5
    assert pixel_format(cfg, "y") == PixelFormat(1, 16)
    assert formats_note(cfg) == "; images: X 16-bit with 1 channel, Y 16-bit with 1 channel"
    cfg = resolved(load_config(None, [f"data.root={colour2grey}", "model.x_channels=3"]))
    assert (cfg.model.input_nc, cfg.model.generator_channels("y", "x")) == (3, (1, 3))
    assert cfg.loss.lambda_identity == 0.0 and formats_note(cfg).endswith(
        "identity loss off: the channel counts differ"
    )
    cut = resolved(load_config(None, [f"data.root={colour2grey}", "model.family=cut"]))
    assert cut.model.nce_identity is False


def test_shards_without_a_manifest_keep_the_config(grey16):
    cfg = load_config(None, [f"data.x_train={grey16}/x-train-000000.tar", f"data.y_train={grey16}/y-train-000000.tar",
                             "model.x_channels=1", "data.x_bits=16"])  # fmt: skip
    assert resolved(cfg) is cfg and pixel_format(cfg, "x") == PixelFormat(1, 16)
    assert pixel_format(cfg, "y") == PixelFormat(3, 8)


@pytest.mark.parametrize(
    ("override", "key", "stated"), [("model.x_channels=3", "model.x_channels", 3), ("data.y_bits=8", "data.y_bits", 8)]
)
def test_a_config_that_contradicts_the_data_is_one_line(grey16, override, key, stated):
    with pytest.raises(ConfigError) as err:
        resolved(load_config(None, [f"data.root={grey16}", override]))
    domain = key.split(".")[1][0]
    assert str(err.value) == (
        f"{key}={stated} contradicts data.root={grey16}: its {domain}-train images are 16-bit with 1 channel; leave "
        f"{key} unset (null) to take the data's"
    )


def test_a_test_split_of_another_format_is_refused(grey16, tmp_path):
    manifest = json.loads((grey16 / "manifest.json").read_text())
    manifest["splits"]["y-test"]["format"] = {"channels": 1, "bits": 8}
    for path in grey16.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="y-test is 8-bit with 1 channel but y-train is 16-bit with 1 channel"):
        resolved(load_config(None, [f"data.root={tmp_path}"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.lambda_preserve=0.5", "loss.lambda_preserve=0.5 compares G(x) with x, but X has 3 channels and Y 1"),
        ("model.discriminator=hnet", "model.discriminator=hnet shares one trunk between D_X and D_Y, but X has 3"),
    ],
)
def test_terms_that_compare_the_two_domains_need_one_channel_count(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.x_channels=3", "model.y_channels=1", override])
    with pytest.raises(ConfigError, match=r"model.x_channels=0 .* an integer in \[1, 64\]"):
        load_config(None, ["model.x_channels=0"])


def test_training_says_once_when_load_size_squashes_images_that_are_not_square(grey16, tmp_path):
    manifest = json.loads((grey16 / "manifest.json").read_text())
    cfg = load_config(None, [f"data.root={tmp_path}", "data.load_size=32", "data.crop_size=32"])
    for square, expected in ((True, None), (False, "data: x-train holds images that are not square")):
        manifest["splits"]["x-train"]["sizes"]["square"] = square
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        note = aspect_note(cfg, data_manifest(cfg))
        assert note == expected if expected is None else note.startswith(expected)
    assert note.endswith("data.load_size=32 resizes each to 32x32, changing its aspect (crop them square first to "
                         "choose what is kept)")  # fmt: skip


def test_a_checkpoint_from_before_formats_resumes_as_rgb(tmp_path):
    """Checkpoints written before the channel counts were recorded hold none: they are 3 channels, as the
    resolved config of an 8-bit RGB manifest says; another count is another architecture."""
    saved = {k: v for k, v in dataclasses.asdict(load_config(None, []).model).items() if not k.endswith("_channels")}
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"step": 4, "world_size": 1, "backend": "ddp", "model": saved}))
    check_architecture(tmp_path, load_config(None, ["model.x_channels=3", "model.y_channels=3"]).model)
    with pytest.raises(CheckpointError, match="model.y_channels=3, config says 1"):
        check_architecture(tmp_path, load_config(None, ["model.x_channels=3", "model.y_channels=1"]).model)
