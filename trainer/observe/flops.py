"""Achieved FLOP/s and MFU. The FLOPs of one update per image pair - both units' forward and backward, as the
family's step functions run them - are counted once at start by torch.utils.flop_counter on a copy of the units
built on the meta device (no memory, no compute, whatever backend shards the real ones). Activation checkpointing's
recomputation is not counted (MFU counts the model's FLOPs, not the work done). The peak is a table for GPUs and,
on a CPU, a short fp32 matmul measured once with this rank's threads."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.algorithms.family import Family, family
from trainer.config.model import LossConfig
from trainer.config.schema import Config
from trainer.config.sections import EXTRA_CHANNELS

GPU_PEAK_TFLOPS = {  # dense tensor-core peak (bf16/fp16, fp32 through TF32) by a word of the device name; SXM parts
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
}
CPU_PEAK_MATMUL = 512  # the CPU peak's matrix size


def update_flops(chosen: Family, gens: torch.nn.Module, discs: torch.nn.Module, loss: LossConfig, size: int,
                 extra_channels: int = 0, channels: tuple[int, int] = (3, 3)) -> int:  # fmt: skip
    """FLOPs of one update on one image pair of `size` px (X's and Y's `channels`): the generator step's forward
    and backward against the frozen discriminators, then the discriminator step's on the detached fakes."""
    device = next(gens.parameters()).device
    x, y = (torch.zeros(1, c, size, size, device=device) for c in channels)
    extra = torch.zeros(1, extra_channels, size, size, device=device) if extra_channels else None
    with FlopCounterMode(display=False) as counter:
        discs.requires_grad_(False)
        g_loss, _, out = chosen.generator_step(gens, discs, x, y, loss, extra, extra)
        g_loss.backward()
        discs.requires_grad_(True)
        fake_x = out["fake_x"].detach() if "fake_x" in out else None
        d_loss, _ = chosen.discriminator_step(discs, x, y, fake_x, out["fake_y"].detach(), loss)
        d_loss.backward()
    return counter.get_total_flops()


def flops_per_pair(cfg: Config) -> tuple[int | None, str]:
    """(FLOPs of one update per image pair, or None; why not) for cfg's model on meta-device units."""
    chosen = family(cfg.model.family)
    try:
        with torch.random.fork_rng(devices=[]):  # the training's random draws stay as they were
            with torch.device("meta"):
                gens, discs = chosen.build_units(cfg.model, cfg.loss, cfg.train.fuse_generator_passes)
            channels = (cfg.model.channels("x"), cfg.model.channels("y"))
            extra = EXTRA_CHANNELS[cfg.data.extra]
            flops = update_flops(chosen, gens, discs, cfg.loss, cfg.data.crop_size, extra, channels)
    except (RuntimeError, NotImplementedError) as err:  # an operator without a meta kernel
        return None, f"FLOPs not counted ({str(err).splitlines()[0][:120]})"
    return flops, f"{flops / 1e9:.3g} GFLOP per image pair per update"


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(this device's peak FLOP/s for `precision`, or None; where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for word, (low, fp32) in GPU_PEAK_TFLOPS.items():
            if word in name:
                tflops = fp32 if precision == "fp32" else low
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s ({'TF32' if precision == 'fp32' else precision})"
        return None, f"no peak known for {name}: MFU not logged"
    peak = cpu_matmul_flops()
    size, threads = CPU_PEAK_MATMUL, torch.get_num_threads()
    return peak, f"this CPU's {peak / 1e9:.3g} GFLOP/s (an fp32 {size}x{size} matmul on {threads} thread(s))"


def cpu_matmul_flops(seconds: float = 0.05) -> float:
    """FLOP/s of repeated fp32 matmuls on this process's threads (at least 3, for at least `seconds`)."""
    a = b = torch.full((CPU_PEAK_MATMUL, CPU_PEAK_MATMUL), 0.5)  # not random: training's random state stays as it was
    torch.mm(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * CPU_PEAK_MATMUL**3 * runs / (time.perf_counter() - start)
