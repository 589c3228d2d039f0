"""torch.compile of the networks (train.compile=true): trains, and exported weights keep their plain names."""

import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import run_bounded


@pytest.mark.slow
def test_compile_trains_and_keeps_parameter_names(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    result = run_bounded(
        [
            sys.executable,
            "trainer/main.py",
            "--config",
            "configs/demo-cpu.yaml",
            f"data.root={colour_shards}",
            f"train.run_dir={run_dir}",
            "train.compile=true",
            "train.precision=fp32",
            "train.steps=2",
            "model.ngf=4",
            "model.ndf=4",
            "model.n_blocks=1",
        ],
        timeout_s=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = load_file(str(run_dir / "export" / "g_xy.safetensors")).keys()
    assert keys and not any("_orig_mod" in key for key in keys)
