"""GPU paths: skipped without CUDA; run them on a GPU machine with `python -m pytest tests/gpu`."""

import pytest
import torch

from tests.conftest import accelerate_launch, run_bounded, train_command
from trainer.config import DistributedConfig, OptimizerConfig, TrainConfig
from trainer.engine import Engine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@needs_cuda
def test_engine_runs_on_cuda_with_bf16_autocast():
    engine = Engine(DistributedConfig(), TrainConfig(precision="bf16"), OptimizerConfig())
    assert engine.device.type == "cuda"
    conv = torch.nn.Conv2d(3, 3, 3).to(engine.device)
    with engine.autocast():
        out = conv(torch.randn(1, 3, 8, 8, device=engine.device))
    assert out.dtype == torch.bfloat16


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_demo_trains_on_one_gpu(precision, tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    small = [f"train.precision={precision}", "train.steps=20", "logging.every_steps=10"]
    result = run_bounded(train_command(colour_shards, run_dir, *small))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuda" in result.stdout


@needs_two_gpus
def test_ddp_converts_batch_norm_to_sync_batch_norm_on_gpus(tmp_path, colour_shards):
    run_dir = tmp_path / "run"
    small = ["data.load_size=32", "data.crop_size=32", "train.steps=2", "train.batch_size=2"]
    cmd = train_command(colour_shards, run_dir, *small, config="unet-article", launcher=accelerate_launch("gpu-ddp", 2))
    result = run_bounded(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SyncBatchNorm: " in result.stdout
