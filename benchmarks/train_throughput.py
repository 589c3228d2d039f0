"""Training throughput: image pairs/s, step-time split (generator update, discriminator update, data wait), peak
memory, model FLOPs per image pair (torch.utils.flop_counter) and MFU, for our training path with the speed levers
switched on one after another, beside the reference-style step (benchmarks/reference_step.py) on the same
networks, all measured in one run on this machine.

    python benchmarks/train_throughput.py [--config configs/horse2zebra.yaml] [--size 128] [--steps 8] [--compile]
        [--batches 4,8,16] [--keep-going] [--row-timeout S] [key=value ...]

Each row runs in its own process (fresh allocator, compile cache and peak-memory counter), on synthetic shards
read through the real loader (the reference gets its images for free). Writes JSON (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.process_group import run_group  # noqa: E402
from trainer.config.load import load_config  # noqa: E402
from trainer.config.schema import Config  # noqa: E402

if TYPE_CHECKING:
    from trainer.build import Training
    from trainer.data.loader import UnpairedLoader

# Dense bf16 tensor-core peaks in TFLOP/s, matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("V100", 125.0)]  # fmt: skip

# The ladder: each row adds one lever to the row above: the per-step levers at batch 1, then the batch. Then
# activation checkpointing as a side row (a memory lever: the row shows its price in speed; the next rows go on
# without it), and torch.compile, with CUDA graphs on a GPU, at the largest batch (two compilations, not one per row).
LADDER = [
    ("ours: fp32, batch 1, for-loop Adam", ["train.precision=fp32", "train.batch_size=1",
                                           "optimizer.implementation=for_loop"]),
    ("+ foreach/fused Adam", ["optimizer.implementation=auto"]),
    ("+ bf16 autocast", ["train.precision=bf16"]),
    ("+ channels_last", ["train.channels_last=true"]),
    ("+ fused generator passes", ["train.fuse_generator_passes=true"]),
]  # fmt: skip
CHECKPOINTING = ("+ activation checkpointing (side row)", ["train.activation_checkpointing=true"])
COMPILE = ("+ torch.compile", ["train.compile=true"])
CUDA_GRAPHS = ("+ CUDA graphs (compile reduce-overhead)", ["train.compile_mode=reduce-overhead"])


def batch_row(batch: int) -> tuple[str, list[str]]:
    return f"+ batch {batch} (linear LR scaling)", [f"train.batch_size={batch}", "optimizer.lr_scaling=linear"]


def batch_list(text: str) -> list[int]:
    """--batches: comma-separated batch sizes ("" for none)."""
    return [int(value) for value in text.split(",") if value.strip()]


def ladder(compile_rows: bool, cuda: bool, batches: list[int]) -> list[tuple[str, list[str], bool]]:
    """The rows to run as (name, overrides, side): a side row's overrides do not carry over to the next rows."""
    rows = [(name, overrides, False) for name, overrides in [*LADDER, *map(batch_row, batches)]]
    rows.append((*CHECKPOINTING, True))
    if compile_rows:
        rows += [(*COMPILE, False)] + ([(*CUDA_GRAPHS, False)] if cuda else [])
    return rows


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(cfg: Config) -> tuple[Training, UnpairedLoader]:
    """The training of `cfg` and its loader, built as the training loop builds them (trainer.build)."""
    from trainer.build import build_engine, build_loader, build_training

    engine, cfg = build_engine(cfg)
    return build_training(cfg, engine), build_loader(cfg, engine)


def measure_ours(cfg: Config, steps: int, warmup: int, count_flops: bool) -> dict:
    """Time our train_step through the real loader, its generator and discriminator updates apart; returns the
    row's figures."""
    from trainer.train import discriminator_update, generator_update, train_step

    run, loader = setup(cfg)
    engine, device, batch = run.engine, run.engine.device, cfg.train.batch_size
    phases = {"generator": 0.0, "discriminator": 0.0, "data_wait": 0.0}
    mark = [0.0]

    def clock(phase: str) -> None:
        synchronize(device)
        now = time.perf_counter()
        phases[phase] += now - mark[0]
        mark[0] = now

    flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            train_step(run, [next(loader)])
        flops = counter.get_total_flops() / batch
    for step in range(warmup + steps):
        if step == warmup:
            phases = dict.fromkeys(phases, 0.0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        mark[0] = time.perf_counter()
        micro = next(loader)
        clock("data_wait")
        _, fakes, _ = generator_update(run, [micro])
        clock("generator")
        discriminator_update(run, [micro], fakes)
        clock("discriminator")
    elapsed = time.perf_counter() - start
    row = _row(steps * batch / elapsed, elapsed / steps, phases, steps, flops, device)
    key = "mem/" + ("peak_allocated_gb" if device.type == "cuda" else "host_rss_gb")
    row[key] = engine.memory_metrics()[key]
    engine.end()
    return row


def measure_reference(cfg: Config, steps: int, warmup: int) -> dict:
    """Time the reference-style step on in-memory images (batch 1, fp32)."""
    from benchmarks.reference_step import ReferenceStep

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    step_fn = ReferenceStep(cfg.model, cfg.loss, cfg.optimizer.lr, str(device))
    size = cfg.data.crop_size
    images = [torch.rand(1, 3, size, size, device=device) * 2 - 1 for _ in range(8)]
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        step_fn(images[step % 8], images[(step + 3) % 8])
    synchronize(device)
    elapsed = time.perf_counter() - start
    return _row(steps / elapsed, elapsed / steps, {}, steps, None, device)


def _row(images_per_s: float, step_s: float, phases: dict, steps: int, flops: float | None, device) -> dict:
    row = {"images_per_s": images_per_s, "step_s": step_s, "device": device_name(device)}
    for name, seconds in phases.items():
        row[f"{name}_s"] = seconds / steps
    if phases:
        row["data_wait_fraction"] = phases["data_wait"] / (step_s * steps)
    if flops is not None:
        row["flops_per_image_pair"] = flops
    return row


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count, for the figures' records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_row(args: argparse.Namespace, name: str, overrides: list[str], data: Path) -> dict:
    """One row in a fresh process (see --row); with --keep-going a failed or timed-out row is recorded with its
    error instead of stopping the ladder."""
    cmd = [sys.executable, __file__, "--row", name, "--config", args.config, "--size", str(args.size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", str(data), *args.overrides,
           *overrides]  # fmt: skip
    if args.flops and name == LADDER[0][0]:
        cmd.append("--count-flops")
    env = {**os.environ, "WANDB_SILENT": "true"}
    returncode, stdout, stderr = run_group(  # the row and its compile workers
        cmd, args.row_timeout, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    error = None if returncode == 0 else stderr[-3000:] if returncode else f"timed out after {args.row_timeout:g} s"
    if error is not None:
        if not args.keep_going:
            raise RuntimeError(f"row {name!r} failed:\n{error}")
        return {"row": name, "overrides": overrides, "error": error}
    return {"row": name, "overrides": overrides, **json.loads(stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/horse2zebra.yaml")
    parser.add_argument("--size", type=int, default=128, help="crop size (load size = size * 286 / 256)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes on a CPU)")
    parser.add_argument("--batches", type=batch_list, default=[4], help="larger per-rank batches to add: 4,8,16")
    parser.add_argument("--keep-going", action="store_true", help="record a failed row and go on")
    parser.add_argument("--row-timeout", type=float, default=None, help="seconds before a row counts as failed")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting FLOPs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/train_throughput.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print its JSON
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every row, e.g. model.ngf=32")
    args = parser.parse_args()
    load_size = round(args.size * 286 / 256)
    base = [f"data.load_size={load_size}", f"data.crop_size={args.size}", "logging.wandb=disabled"]

    if args.row is not None:
        cfg = load_config(args.config, [*base, f"data.root={args.data}", *args.overrides])
        if args.row == "reference":
            row = measure_reference(cfg, args.steps, args.warmup)
        else:
            row = measure_ours(cfg, args.steps, args.warmup, args.count_flops)
        print(json.dumps(row))
        return

    from shards.synthetic import write_synthetic

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, "colour", size=load_size, train=64, test=4, seed=0, maxcount=32)
        rows = [run_row(args, "reference", [], data)]
        applied: list[str] = []
        for name, overrides, side in ladder(args.compile, device.type == "cuda", args.batches):
            rows.append(run_row(args, name, applied + overrides, data))
            if not side:
                applied = applied + overrides
    measured = [row for row in rows if "error" not in row]
    reference = rows[0].get("images_per_s")
    flops = next((r["flops_per_image_pair"] for r in rows if "flops_per_image_pair" in r), None)
    peak = peak_tflops(device)
    for row in measured:
        if reference is not None:
            row["speedup_vs_reference"] = row["images_per_s"] / reference
        if flops is not None:
            row["achieved_tflops"] = flops * row["images_per_s"] / 1e12
            if peak is not None:
                row["mfu"] = row["achieved_tflops"] / peak
    figures = {
        "benchmark": "train_throughput",
        "config": args.config,
        "size": args.size,
        "overrides": args.overrides,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": device_name(device),
        "peak_tflops_bf16": peak,
        "flops_per_image_pair": flops,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for row in rows:
        if "error" in row:
            print(f"{row['row']:<42} failed: {row['error'].strip().splitlines()[-1]}")
            continue
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        wait = f"  data wait {row['data_wait_fraction']:.1%}" if "data_wait_fraction" in row else ""
        speedup = f"  x{row['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in row else ""
        print(f"{row['row']:<42} {row['images_per_s']:8.2f} img/s{speedup}{wait}{mfu}")


if __name__ == "__main__":
    main()
