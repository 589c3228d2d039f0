"""Test harness, run directly or under `accelerate launch`: trains a tiny CycleGAN (or CUT: model.family) on fixed
random tensors with the real Engine, build_training and train_step, then saves each rank's consolidated weights
(before and after), the bytes of parameters and optimizer state it holds, and loss scales to OUT/rank<R>.pt.

Rank r's micro-batch j of a step is images [(j * world + r) * b, (j * world + r + 1) * b) of that step's global
batch, so any (world, batch, accumulation) split of the same global batch sees the same images.

    python tests/distributed/worker.py --out DIR [--overflow-d] [section.key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trainer.build import build_training
from trainer.config.load import load_config
from trainer.runtime.engine import Engine
from trainer.runtime.process_exit import exit_process
from trainer.train import train_step

TINY = [
    "model.generator=resnet",
    "model.n_blocks=1",
    "model.ngf=4",
    "model.ndf=4",
    "model.n_layers_d=2",
    "train.pool_size=0",
    "data.load_size=16",
    "data.crop_size=16",
    "schedule.kind=constant",
    "optimizer.lr=1e-3",
    "optimizer.lr_scaling=none",  # the same LR for every split of a global batch, and no warm-up
    # With eps=1e-8 Adam's first update is lr * sign(g): an element whose gradient sums to rounding level flips sign
    # between batch splits. A larger eps keeps the update smooth in the gradient, so splits can be compared.
    "optimizer.eps=1e-4",
    # These runs compare weights across batch splits and backends at fp32 tolerances: fp32 on every machine (auto
    # is bf16 on a CPU with AVX512-BF16, where bf16's rounding differs between the splits).
    "train.precision=fp32",
]
SIZE = 16


def biases_before_instance_norm(module: torch.nn.Module, prefix: str) -> list[str]:
    """Names of conv biases that an affine-free InstanceNorm right after them cancels: their true gradient is zero,
    so Adam turns rounding noise into full-size steps and they cannot be compared across batch splits."""
    names = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Sequential):
            for i in range(len(child) - 1):
                conv, norm = child[i], child[i + 1]
                if isinstance(norm, torch.nn.InstanceNorm2d) and getattr(conv, "bias", None) is not None:
                    names.append(f"{prefix}{name}.{i}.bias".replace("..", "."))
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--overflow-d", action="store_true", help="make every discriminator-step loss infinite")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, TINY + args.overrides)
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    run = build_training(cfg, engine)
    global_batch = run.global_batch
    init = {unit: engine.full_state_dict(unit) for unit in ("g", "d")}
    if args.overflow_d:
        # Only the pair's forward (the D step) is hooked; the G step calls d_x/d_y directly.
        engine.unwrap("d").register_forward_hook(
            lambda module, inputs, out: {k: v * float("inf") for k, v in out.items()}
        )
    b, k, world, rank = cfg.train.batch_size, cfg.train.grad_accum_steps, engine.world_size, engine.rank
    data = torch.Generator().manual_seed(1234)
    for _ in range(cfg.train.steps):
        xs = torch.rand(global_batch, 3, SIZE, SIZE, generator=data) * 2 - 1
        ys = torch.rand(global_batch, 3, SIZE, SIZE, generator=data) * 2 - 1
        starts = [(j * world + rank) * b for j in range(k)]
        micro = [{"x": xs[s : s + b].to(engine.device), "y": ys[s : s + b].to(engine.device)} for s in starts]
        train_step(run, micro)  # (stats, images) unused
    result = {
        "init": init,
        "final": {unit: engine.full_state_dict(unit) for unit in ("g", "d")},
        "state_bytes": {unit: engine.state_bytes(unit) for unit in ("g", "d")},
        "loss_scale": {unit: engine.loss_scale(unit) for unit in ("g", "d")},
        "backend": engine.backend_name,
        "noise_driven": {u: biases_before_instance_norm(engine.unwrap(u), "") for u in ("g", "d")},
        "world": world,
        "replica_spread": engine.replica_spread(),
    }
    torch.save(result, Path(args.out) / f"rank{rank}.pt")
    engine.end()


if __name__ == "__main__":
    main()
    exit_process(0)
