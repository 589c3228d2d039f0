"""The speed levers are plain config switches that leave the math alone: with channels-last weights, another
AdamW kernel or fused generator passes, the first step's loss terms equal the defaults' and its gradient norms
agree within float32 kernel noise; the optimizer kernels and the fused passes, which do the same arithmetic, also
give the same weights after several steps. torch.compile (also with CUDA graphs' mode) matches eager and compiles
nothing more after its warm-up steps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tests.conftest import run_bounded, train_command
from trainer.algorithms.cyclegan import GeneratorPair, build_units
from trainer.build import build_training
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.runtime.engine import Engine
from trainer.runtime.schedule import optimizer_kernel
from trainer.train import train_step

# fp32 tolerances on every machine: train.precision=auto is bf16 on a CPU with AVX512-BF16.
TINY = ["model.generator=resnet", "model.n_blocks=1", "model.ngf=8", "model.ndf=8", "model.n_layers_d=2",
        "data.load_size=16", "data.crop_size=16", "train.batch_size=2", "optimizer.eps=1e-4",
        "train.precision=fp32"]  # fmt: skip


def train_tiny(
    *overrides: str, steps: int = 3, warmup: int | None = None
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict]:
    """(per-step stats, final weights, the units) of a tiny training on fixed random images. After `warmup` steps
    (if given), a torch.compile recompilation raises."""
    cfg = load_config(None, [*TINY, "train.pool_size=0", *overrides])
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    run = build_training(cfg, engine)
    data = torch.Generator().manual_seed(5)
    history = []
    for step in range(steps):
        batch = {d: torch.rand(2, 3, 16, 16, generator=data) * 2 - 1 for d in ("x", "y")}
        strict = warmup is not None and step >= warmup
        with torch._dynamo.config.patch(error_on_recompile=strict):
            stats, _ = train_step(run, [batch])
        history.append({k: v.item() for k, v in stats.items()})
    weights = {f"{u}.{k}": v.detach().clone() for u in ("g", "d") for k, v in engine.unwrap(u).state_dict().items()}
    engine.end()
    return history, weights, run.units


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_optimizer_kernel_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert optimizer_kernel("auto", cpu) == {"foreach": True} and optimizer_kernel("auto", cuda) == {"fused": True}
    assert optimizer_kernel("for_loop", cpu) == {"foreach": False}


@pytest.mark.parametrize(
    "lever", ["train.channels_last=true", "optimizer.implementation=for_loop", "train.fuse_generator_passes=true"]
)
def test_lever_keeps_losses_and_gradients(lever):
    reference, reference_weights, _ = train_tiny()
    changed, weights, units = train_tiny(lever)
    before, after = reference[0], changed[0]  # the first step: same weights, same images
    assert before.keys() == after.keys()
    for key in before:
        # float32 CPU convolution kernels of this tiny model differ by up to ~0.1% in weight gradients between
        # memory formats (the losses, computed before any backward, agree to rounding).
        rel = 1e-2 if key.startswith("grad_norm/") else 1e-5
        assert after[key] == pytest.approx(before[key], rel=rel, abs=1e-6), key
    if lever.startswith("train.channels_last"):
        convs = [p for u in units.values() for p in u.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    elif lever.startswith("optimizer"):  # the same arithmetic per tensor, batched or not
        assert max_difference(reference_weights, weights) <= 1e-6
    else:  # the same per-sample math; convolution kernels of batch 2N may round differently, and Adam's
        # normalized updates carry that rounding into the weights at ~1e-6
        assert max_difference(reference_weights, weights) <= 1e-5


@pytest.mark.parametrize("extra", ["none", "hist"])
def test_fused_generator_passes_give_the_separate_passes_outputs(extra):
    cfg = load_config(None, [*TINY, "model.ngf=4", f"data.extra={extra}"])
    torch.manual_seed(0)
    separate, _ = build_units(cfg.model, cfg.loss)
    fused = GeneratorPair(separate.g_xy, separate.g_yx, use_identity=True, fuse_passes=True)
    images = torch.Generator().manual_seed(1)
    x, y = (torch.rand(3, 3, 16, 16, generator=images) * 2 - 1 for _ in range(2))
    extras = (None, None) if extra == "none" else tuple(torch.rand(3, 24, 16, 16, generator=images) for _ in range(2))
    expected, got = separate(x, y, *extras), fused(x, y, *extras)
    assert expected.keys() == got.keys() == {"fake_x", "fake_y", "rec_x", "rec_y", "idt_x", "idt_y"}
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key


def test_fused_passes_are_refused_with_batch_norm():
    with pytest.raises(ConfigError, match="train.fuse_generator_passes=true needs model.norm_g=instance or none"):
        load_config(None, ["train.fuse_generator_passes=true", "model.norm_g=batch"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_equals_eager_and_stops_compiling_after_warmup(mode):
    """With fused passes: their two batch shapes per generator compile during the first step. On CPU,
    reduce-overhead runs plain compiled code (no CUDA graphs), but the step's CUDA-graph bookkeeping runs."""
    torch._dynamo.reset()
    levers = ["train.fuse_generator_passes=true"]
    eager, eager_weights, _ = train_tiny(*levers, steps=4)
    compiled, compiled_weights, _ = train_tiny(
        *levers, "train.compile=true", f"train.compile_mode={mode}", steps=4, warmup=1
    )
    for before, after in zip(eager, compiled):
        for key in before:
            assert after[key] == pytest.approx(before[key], rel=1e-3, abs=1e-5), key
    assert max_difference(eager_weights, compiled_weights) <= 1e-4
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_channels_last_runs_save_export_and_resume_exactly(colour_shards, tmp_path):
    """Checkpoints and exports need contiguous tensors (safetensors refuses channels-last strides); a resume puts
    Adam's moments back in the weights' memory format and continues exactly."""
    tiny = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "train.precision=fp32",
            "train.channels_last=true", "eval.images=0", "logging.every_steps=1", "checkpoint.every_steps=2",
            "checkpoint.keep=3"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir, extra in ((straight, []), (resumed, [f"train.resume={straight}/checkpoints/step_00000002"])):
        result = run_bounded(train_command(colour_shards, run_dir, *tiny, "train.steps=4", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    final = "checkpoints/step_00000004/units.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(resumed / final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "export" / "g_xy.safetensors").is_file()
