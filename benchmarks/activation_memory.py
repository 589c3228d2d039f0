"""Activation memory with and without train.activation_checkpointing: per crop size, one full training step of
the config's networks (generator and discriminator updates, batch 1) with checkpointing off and on.

    python benchmarks/activation_memory.py [--config configs/horse2zebra.yaml] [--sizes 256 512] [--steps 3]
        [--warmup 1] [--precision fp32|bf16] [--device cuda|cpu] [key=value ...]
    python benchmarks/activation_memory.py --dry   # ngf 8, 32 px, 1 step: checks that the script runs

Per row: the bytes autograd saves for the generator step's backward (each storage counted once, parameters and
buffers excluded; torch.autograd.graph.saved_tensors_hooks), the peak memory (CUDA: the peak allocated by
tensors; CPU: the process's peak RSS) over the row's steps and that peak minus the memory in use before the first
step, and the median step time (wall and process CPU time). Per size: the ratios on/off. Each row runs in its own
process, so that its peak starts clean. Writes JSON (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.train_throughput import device_name, synchronize  # noqa: E402
from trainer.config.load import load_config  # noqa: E402
from trainer.config.schema import Config  # noqa: E402

MODES = ("off", "on")
DRY = ["model.ngf=8", "model.ndf=8"]


class SavedTensorBytes:
    """While entered, counts the bytes of the distinct storages that autograd saves for backward, leaving out
    those of `exclude` (parameters and buffers: they exist anyway). Tensors that checkpointed blocks recompute
    are never saved, so they are not counted; a checkpoint's own inputs are."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}  # data pointer -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorBytes:
        self.storages = {}
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: Config, steps: int, warmup: int) -> dict:
    """One row: a counted step, then `warmup` and `steps` timed steps on fixed random images."""
    from trainer.build import build_engine, build_training
    from trainer.train import discriminator_update, generator_update, train_step

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pool_size=0))  # every step holds the same
    engine, cfg = build_engine(cfg)
    run = build_training(cfg, engine)
    units = run.units
    device, size = engine.device, cfg.data.crop_size
    data = torch.Generator().manual_seed(0)
    batch = {d: (torch.rand(1, 3, size, size, generator=data) * 2 - 1).to(device) for d in ("x", "y")}
    counter = SavedTensorBytes(t for unit in units.values() for t in (*unit.parameters(), *unit.buffers()))

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    else:
        start_bytes = rss_bytes()
    with counter:
        _, fakes, _ = generator_update(run, [batch])
        saved_g = counter.total  # after the generators' update, before the discriminators' step
        discriminator_update(run, [batch], fakes)
    times, cpu_times = [], []
    for _ in range(warmup + steps):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(run, [batch])
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    engine.end()
    return {
        "saved_g_step_bytes": saved_g,
        "peak_bytes": peak,
        "peak_over_start_bytes": peak - start_bytes,
        "step_s": statistics.median(times[warmup:]),
        "step_s_all": times,
        "step_cpu_s": statistics.median(cpu_times[warmup:]),  # all threads: less sensitive to other processes
        "load_average_1m": os.getloadavg()[0],  # other processes on the machine skew the times
        "device": device_name(device),
    }


def row_overrides(args: argparse.Namespace, size: int, mode: str) -> list[str]:
    """The config overrides of one row (the user's last, so that they win)."""
    return [
        f"data.load_size={size}",
        f"data.crop_size={size}",
        "train.batch_size=1",
        f"train.precision={args.precision}",
        f"train.activation_checkpointing={str(mode == 'on').lower()}",
        f"distributed.cpu={str(args.device == 'cpu').lower()}",
        "logging.wandb=disabled",
        *args.overrides,
    ]


def run_row(args: argparse.Namespace, size: int, mode: str) -> dict:
    """One row in a fresh process (see --row)."""
    cmd = [sys.executable, __file__, "--row", "--config", args.config, "--steps", str(args.steps), "--warmup",
           str(args.warmup), *row_overrides(args, size, mode)]  # fmt: skip
    print(f"[activation_memory] {size} px, checkpointing {mode} ...", flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    if result.returncode != 0:
        raise RuntimeError(f"row {size} px {mode} failed:\n{result.stderr[-3000:]}")
    return {"size": size, "checkpointing": mode, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/horse2zebra.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="crop sizes in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the counted one")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry", action="store_true", help="ngf 8, 32 px, 1 step: a quick check of the script")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/activation_memory.json")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # internal: one row, print its JSON
    parser.add_argument("overrides", nargs="*", help="config overrides for every row, e.g. model.ngf=32")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    if args.row:
        print(json.dumps(measure(load_config(args.config, args.overrides), args.steps, args.warmup)))
        return
    if args.dry:
        args.sizes, args.steps, args.warmup, args.overrides = [32], 1, 0, [*DRY, *args.overrides]

    rows = [run_row(args, size, mode) for size in args.sizes for mode in MODES]
    by_size = {size: {r["checkpointing"]: r for r in rows if r["size"] == size} for size in args.sizes}
    ratios = [
        {
            "size": size,
            "saved_g_step_on_over_off": pair["on"]["saved_g_step_bytes"] / pair["off"]["saved_g_step_bytes"],
            "peak_over_start_on_over_off": pair["on"]["peak_over_start_bytes"] / pair["off"]["peak_over_start_bytes"],
            "peak_on_over_off": pair["on"]["peak_bytes"] / pair["off"]["peak_bytes"],
            "time_overhead": pair["on"]["step_s"] / pair["off"]["step_s"] - 1,
            "cpu_time_overhead": pair["on"]["step_cpu_s"] / pair["off"]["step_cpu_s"] - 1,
        }
        for size, pair in by_size.items()
    ]
    figures = {
        "benchmark": "activation_memory",
        "config": args.config,
        "overrides": args.overrides,
        "precision": args.precision,
        "device": rows[0]["device"],
        "peak_memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "process peak RSS (ru_maxrss)",
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for r in ratios:
        print(
            f"{r['size']:>5} px: saved for the generator step x{r['saved_g_step_on_over_off']:.2f}, "
            f"peak over start x{r['peak_over_start_on_over_off']:.2f}, step time {r['time_overhead']:+.1%}"
        )
    print(f"[activation_memory] wrote {args.out}")


if __name__ == "__main__":
    main()
