"""GPU paths: skipped without CUDA; run them on a GPU machine with `python -m pytest tests/gpu`."""

import pytest
import torch

from tests.conftest import accelerate_launch, read_metrics, run_bounded, train_command
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


@needs_cuda
def test_fast_path_on_cuda_fused_adam_channels_last_bf16(tmp_path, colour_shards):
    from trainer.train import optimizer_kernel

    assert optimizer_kernel("auto", torch.device("cuda")) == {"fused": True}
    run_dir = tmp_path / "run"
    fast = ["train.precision=bf16", "train.channels_last=true", "optimizer.implementation=fused", "train.steps=10",
            "logging.every_steps=5"]  # fmt: skip
    result = run_bounded(train_command(colour_shards, run_dir, *fast))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss/g_total"] for r in read_metrics(run_dir) if "loss/g_total" in r]
    assert len(losses) == 2 and all(loss == loss and loss < 1e4 for loss in losses)


@needs_cuda
def test_throughput_benchmark_reports_mfu_on_cuda(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--config", "configs/demo-cpu.yaml", "--size", "32",
           "--steps", "2", "--warmup", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    if figures["peak_tflops_bf16"] is not None:
        assert all(0 < row["mfu"] < 1 for row in figures["rows"])
