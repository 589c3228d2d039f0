"""Config files and run directories that used to end in a traceback or an endless parse (issue 27): one line each."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from trainer.config.checks import ConfigError
from trainer.config.load import MAX_CONFIG_BYTES, load_config
from trainer.runtime.run_lock import RunLock


def deep_yaml(levels: int) -> str:
    return "train:\n  steps: " + "[" * levels + "]" * levels + "\n"


@pytest.mark.parametrize("levels", [100, 100_000])  # caught by the depth check; the parser's own recursion
def test_a_deeply_nested_config_is_one_line(tmp_path, levels):
    path = tmp_path / "deep.yaml"
    path.write_text(deep_yaml(levels))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config file {path} nests deeper than 64 levels"


def test_a_deeply_nested_override_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=" + "[" * 5000 + "]" * 5000])
    assert str(err.value) == "override train.steps nests deeper than 64 levels"


def test_an_oversized_config_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  steps: 5\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))  # valid YAML, 1 MiB + 18 B
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes"
    assert time.perf_counter() - started < 1


def test_a_config_named_through_a_symlink_is_still_read(tmp_path):
    target = tmp_path / "real.yaml"
    target.write_text("train:\n  steps: 7\n")
    (tmp_path / "link.yaml").symlink_to(target)
    assert load_config(tmp_path / "link.yaml").train.steps == 7


@pytest.mark.parametrize("kind", ["deep", "oversized"])
def test_the_cli_says_it_in_one_line_with_exit_code_2(tmp_path, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(deep_yaml(100_000) if kind == "deep" else "train:\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"config error: config file {path} ")
    assert line.endswith(("nests deeper than 64 levels", f"is larger than {MAX_CONFIG_BYTES} bytes"))


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "logging.wandb_fallback=retry",
            "logging.wandb_fallback='retry' is not allowed; expected one of: offline, stop",
        ),
        ("logging.wandb_init_timeout_s=0", "logging.wandb_init_timeout_s=0.0 is not allowed; expected a number > 0"),
    ],
)
def test_the_wandb_fallback_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_a_run_dir_that_cannot_be_created_names_the_key_and_why(tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    run_dir = afile if where == "file" else afile / "run"
    with pytest.raises(ConfigError) as err:
        RunLock(run_dir).acquire()
    assert str(err.value) == (
        f"train.run_dir={run_dir} cannot be created ({afile} is not a directory); choose another train.run_dir"
    )
