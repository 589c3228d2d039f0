"""GPU paths: skipped without CUDA; run them on a GPU machine with `python -m pytest tests/gpu`."""

import math

import pytest
import torch

from tests.conftest import accelerate_launch, read_metrics, run_bounded, train_command
from trainer.config.sections import DistributedConfig, OptimizerConfig, TrainConfig
from trainer.runtime.engine import Engine

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


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fsdp2_trains_on_one_gpu_over_nccl(precision, tmp_path, colour_shards):
    """FSDP2 on CUDA: a process group of one over NCCL, bf16 through its mixed-precision policy."""
    run_dir = tmp_path / "run"
    small = ["distributed.backend=fsdp2", f"train.precision={precision}", "train.steps=20", "logging.every_steps=10"]
    result = run_bounded(train_command(colour_shards, run_dir, *small))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training with fsdp2 on 1 process(es), cuda" in result.stdout
    losses = [r["loss/g_total"] for r in read_metrics(run_dir) if "loss/g_total" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and losses[1] < losses[0]


@needs_cuda
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_a_resumed_cuda_run_steps_with_the_fused_adam(backend, tmp_path, colour_shards):
    """The loaded Adam state must sit where the fused kernel wants it: moments on the GPU, the step too."""
    run_dir = tmp_path / "run"
    common = [f"distributed.backend={backend}", "optimizer.implementation=fused", "checkpoint.every_steps=2",
              "logging.every_steps=1"]  # fmt: skip
    for steps in (2, 4):
        result = run_bounded(train_command(colour_shards, run_dir, *common, f"train.steps={steps}"))
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    losses = [r["loss/g_total"] for r in read_metrics(run_dir) if "loss/g_total" in r]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


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


def _cuda_training(*overrides: str):
    """(engine, the built training, cfg) of a small ResNet training on CUDA with the given levers (pools of 4)."""
    from trainer.build import build_training
    from trainer.config.load import load_config

    small = ["model.generator=resnet", "model.n_blocks=2", "model.ngf=16", "model.ndf=16", "data.load_size=64",
             "data.crop_size=64", "train.batch_size=2"]  # fmt: skip
    cfg = load_config(None, [*small, "train.pool_size=4", *overrides])
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    return engine, build_training(cfg, engine), cfg


def _batches(engine: Engine, count: int) -> list[dict[str, torch.Tensor]]:
    data = torch.Generator().manual_seed(3)
    return [
        {d: (torch.rand(2, 3, 64, 64, generator=data) * 2 - 1).to(engine.device) for d in ("x", "y")}
        for _ in range(count)
    ]


@needs_cuda
def test_fast_step_makes_no_host_sync():
    """bf16, fused AdamW, channels_last and fused passes: after a warm-up step, a training step (and the loop's
    per-step bookkeeping) never waits for the GPU; torch raises on any synchronizing call in this mode."""
    from trainer.observe.nonfinite import NonfiniteGuard
    from trainer.train import train_step

    levers = ["train.precision=bf16", "optimizer.implementation=fused", "train.channels_last=true",
              "train.fuse_generator_passes=true"]  # fmt: skip
    engine, run, cfg = _cuda_training(*levers)
    guard = NonfiniteGuard(20, fp16=False)
    batches = _batches(engine, 4)
    train_step(run, batches[:1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            stats, _ = train_step(run, [batch])
            guard.add(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(value).all() for value in stats.values())


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_matches_eager_and_stops_compiling(mode):
    """torch.compile, with CUDA graphs in reduce-overhead mode: the first step's losses equal eager's (bf16
    tolerance), and nothing recompiles once the first steps have compiled every shape."""
    from trainer.train import train_step

    levers = ["train.precision=bf16", "train.fuse_generator_passes=true", "train.pool_size=0"]
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        extra = ["train.compile=true", f"train.compile_mode={mode}"] if compiled else []
        engine, run, cfg = _cuda_training(*levers, *extra)
        history = []
        for i, batch in enumerate(_batches(engine, 6)):
            with torch._dynamo.config.patch(error_on_recompile=compiled and i >= 2):
                stats, _ = train_step(run, [batch])
            history.append({k: v.item() for k, v in stats.items()})
        results.append(history)
        engine.end()
    eager, compiled = results[0][0], results[1][0]  # the first step: same weights, same images
    assert compiled["loss/g_total"] == pytest.approx(eager["loss/g_total"], rel=2e-2)
    assert compiled["loss/d_total"] == pytest.approx(eager["loss/d_total"], rel=2e-2)
    assert all(math.isfinite(value) for step in results[1] for value in step.values())


@needs_cuda
def test_activation_checkpointing_on_cuda_same_gradients_less_memory():
    """One generator update at 256 px: the same gradient norm with checkpointing, and a lower peak of allocated
    GPU memory."""
    from trainer.train import train_step

    figures = []
    for enabled in ("false", "true"):
        engine, run, cfg = _cuda_training(
            f"train.activation_checkpointing={enabled}",
            "model.n_blocks=6",
            "data.load_size=256",
            "data.crop_size=256",
            "train.pool_size=0",
        )
        data = torch.Generator().manual_seed(3)
        batch = {d: (torch.rand(2, 3, 256, 256, generator=data) * 2 - 1).to(engine.device) for d in ("x", "y")}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats, _ = train_step(run, [batch])
        figures.append((stats["grad_norm/g"].item(), torch.cuda.max_memory_allocated()))
        engine.end()
    (norm_off, peak_off), (norm_on, peak_on) = figures
    assert norm_on == pytest.approx(norm_off, rel=1e-4)
    assert peak_on < 0.8 * peak_off, (peak_on, peak_off)
