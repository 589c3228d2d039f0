import re
import typing

import pytest

from trainer.config.checks import ConfigError
from trainer.config.load import config_yaml, load_config
from trainer.config.model import ModelConfig
from trainer.config.schema import Config
from trainer.models import GENERATORS

BAD_OVERRIDES = [
    (["trian.steps=3"], "unknown key trian; valid keys here: model, loss"),
    (["train.stpes=3"], "did you mean train.steps?"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is not allowed; expected a number > 0"),
    (["data.crop_size=300", "data.load_size=286"], "data.crop_size=300 exceeds data.load_size=286"),
    (["model.generator=unet"], "model.generator='unet' is not allowed; expected one of: resnet_9blocks"),
    (["model.discriminator=big"], "model.discriminator='big' is not allowed; expected one of: patchgan, pixel, hnet"),
    (["train.batch_size=abc"], "train.batch_size='abc' has the wrong type; expected int"),
    (["train.steps=2.5"], "train.steps=2.5 has the wrong type; expected int"),
    (["train.steps=0"], "train.steps=0 is not allowed; expected an integer >= 1"),
    (["loss.gan_mode=wgan"], "loss.gan_mode='wgan' is not allowed; expected one of: lsgan, vanilla, hinge"),
    (["loss.lambda_cycle=-1"], "loss.lambda_cycle=-1.0 is not allowed"),
    (["logging.wandb=always"], "logging.wandb='always' is not allowed; expected one of: online, offline, disabled"),
    (["model.norm_g=layer"], "model.norm_g='layer' is not allowed; expected one of: batch, instance, none"),
    (["model.generator=resnet_9blocks", "model.n_blocks=4"], "model.n_blocks=4 contradicts model.generator"),
    (["loss.lambda_feature=1.0"], "loss.lambda_feature=1.0 needs model.discriminator=hnet"),
    (
        ["model.generator=unet_256", "data.load_size=286", "data.crop_size=128"],
        "data.crop_size=128 must be a multiple of 256 for model.generator=unet_256",
    ),
    (["train.flip=true"], "unknown key train.flip"),
    (["data.flip=1"], "data.flip=1 has the wrong type; expected bool"),
    (["train"], "override 'train' must look like section.key=value"),
    (["train.steps.max=3"], "train.steps={'max': 3} has the wrong type; expected int"),
    (["optimizer.beta1=1.0"], "optimizer.beta1=1.0 is not allowed; expected a number in [0, 1)"),
    (["checkpoint.keep=0"], "checkpoint.keep=0 is not allowed; expected an integer >= 1"),
    (["optimizer.lr=.inf"], "optimizer.lr=inf is not allowed; expected a finite number"),
    (["loss.lambda_cycle=inf"], "loss.lambda_cycle='inf' is not allowed; expected a finite number"),
    (["loss.lambda_identity=.nan"], "loss.lambda_identity=nan is not allowed; expected a finite number"),
    (["optimizer.lr_d=-.inf"], "optimizer.lr_d=-inf is not allowed; expected a finite number"),
    (["data.max_image_pixels=0"], "data.max_image_pixels=0 is not allowed; expected an integer >= 1"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps=0 is not allowed"),
    (["logging.straggler_factor=0.9"], "logging.straggler_factor=0.9 is not allowed; expected 0 (off) or a number > 1"),
    (["logging.straggler_windows=0"], "logging.straggler_windows=0 is not allowed; expected an integer >= 1"),
    (["train.steps=[[1, 2, 3, 4, 5, 6], 2, 3, 4, 5]"], "train.steps=[[1, 2, 3, 4, ...], 2, 3, 4, ...] has the wrong"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES)
def test_bad_config_is_refused_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n bad: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line 3, column 2: "):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(listed)


def test_yaml_then_overrides_win_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  batch_size: 4\n  steps: 7\noptimizer:\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.batch_size=8", "model.generator=unet_article"])
    assert cfg.train.batch_size == 8
    assert cfg.train.steps == 7
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # "1e-3" (YAML reads it as a string) is accepted for a float
    assert cfg.model.generator == "unet_article"
    assert cfg.model.ngf == 64  # default kept


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.generator=resnet_6blocks", "loss.gan_mode=hinge", "optimizer.lr_d=1e-4"])
    assert cfg.model.n_blocks == 6
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_generator_name_in_the_config_has_a_builder():
    names = typing.get_args(typing.get_type_hints(ModelConfig)["generator"])
    assert set(names) == set(GENERATORS)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), Config)


def test_config_cli_prints_one_resolved_value_or_a_clear_error(capsys):
    from tests.conftest import REPO
    from trainer.config.__main__ import main

    demo = str(REPO / "configs/demo-cpu.yaml")
    assert main(["--config", demo, "train.run_dir=/tmp/x", "--get", "train.run_dir"]) == 0
    assert capsys.readouterr().out == "/tmp/x\n"
    assert main(["--config", demo, "--get", "train.nope"]) == 2
    assert capsys.readouterr().err == "config error: --get train.nope: no such key\n"
    assert main(["--config", demo, "model.ngf=8"]) == 0
    assert load_config(None, []).model.ngf != 8 and "ngf: 8\n" in capsys.readouterr().out


def alias_levels(levels: int) -> str:
    """train.steps as a list whose item i is 9 aliases of item i - 1: 9^levels values once expanded."""
    items = ['    - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "train:\n  steps:\n" + "\n".join(items) + "\n"


@pytest.mark.timeout(20)
def test_a_yaml_alias_bomb_under_a_known_key_is_refused_quickly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_levels(9))  # a few hundred bytes of YAML, 9^9 values
    with pytest.raises(ConfigError, match="expands to more than 100000 values through YAML aliases"):
        load_config(bomb)
    # Under the bound, the wrong value is reported in a bounded line, however shared its parts are.
    small = tmp_path / "small.yaml"
    small.write_text(alias_levels(4))
    with pytest.raises(ConfigError) as err:
        load_config(small)
    assert str(err.value).startswith("train.steps=[[") and "has the wrong type; expected int" in str(err.value)
    assert len(str(err.value)) < 300


def test_yaml_anchors_within_the_bound_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("optimizer:\n  lr: &lr 0.001\n  lr_d: *lr\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == cfg.optimizer.lr_d == pytest.approx(1e-3)


def test_help_lists_every_config_section_and_where_the_fields_are(capsys):
    from trainer.main import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    for name in ("model", "loss", "optimizer", "schedule", "data", "train", "distributed", "logging", "eval",
                 "checkpoint", "ema"):  # fmt: skip
        assert re.search(rf"^  {name} +\S", shown, re.M), name
    assert "python -m trainer.config --config FILE" in shown
