"""torch.compile of the networks (train.compile=true): trains, and exported weights keep their plain names."""

import pytest
from safetensors.torch import load_file

from tests.conftest import run_bounded, train_command


@pytest.mark.slow
def test_compile_trains_and_keeps_parameter_names(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    small = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.steps=2"]
    cmd = train_command(colour_shards, run_dir, "train.compile=true", "train.precision=fp32", *small)
    result = run_bounded(cmd, timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = load_file(str(run_dir / "export" / "g_xy.safetensors")).keys()
    assert keys and not any("_orig_mod" in key for key in keys)
