"""How long a checkpoint stops the training loop: synchronous saves against asynchronous ones
(checkpoint.async_save), the same training otherwise, one after the other in one run.

    python benchmarks/checkpoint_stall.py [--config configs/horse2zebra.yaml] [--size 64] [--steps 24] [--every 4]

Each run trains `--steps` updates with a checkpoint every `--every` and logs, per save, the seconds the loop waited
for it (checkpoint/stall_s in metrics.jsonl). The first save of each run is left out (it creates the directory
tree and warms the page cache). Writes JSON (benchmarks/results/checkpoint_stall.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run(args: argparse.Namespace, data: Path, run_dir: Path, asynchronous: bool) -> dict:
    """One training run; its stalls (seconds per save after the first), step time and checkpoint size."""
    cmd = [sys.executable, "trainer/main.py", "--config", args.config, f"data.root={data}", f"train.run_dir={run_dir}",
           f"data.load_size={args.size}", f"data.crop_size={args.size}", f"train.steps={args.steps}",
           f"checkpoint.every_steps={args.every}", "checkpoint.keep=2", f"logging.every_steps={args.every}",
           "eval.images=0", "logging.image_every_steps=0", f"checkpoint.async_save={asynchronous}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stalls = [r["checkpoint/stall_s"] for r in records if "checkpoint/stall_s" in r][1:]
    steps = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r][1:]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {
        "async_save": asynchronous,
        "stall_s": stalls,
        "mean_stall_s": statistics.mean(stalls),
        "mean_step_time_s": statistics.mean(steps),
        "checkpoint_bytes": sum(p.stat().st_size for p in newest.iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/horse2zebra.yaml")
    parser.add_argument("--size", type=int, default=64, help="crop size (the networks' size does not depend on it)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4, help="checkpoint (and logging) interval")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/checkpoint_stall.json")
    args = parser.parse_args()
    if args.steps < 2 * args.every:
        parser.error("--steps must allow at least two checkpoints (2 x --every)")

    from shards.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, "colour", size=args.size, train=64, test=4, seed=0, maxcount=64)
        sync = run(args, data, Path(tmp) / "sync", asynchronous=False)
        async_ = run(args, data, Path(tmp) / "async", asynchronous=True)
    figures = {
        "benchmark": "checkpoint_stall",
        "config": args.config,
        "size": args.size,
        "steps": args.steps,
        "every": args.every,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "sync": sync,
        "async": async_,
        "async_stall_fraction": async_["mean_stall_s"] / sync["mean_stall_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"checkpoint of {sync['checkpoint_bytes'] / 2**20:.0f} MiB: the loop stalls {sync['mean_stall_s']:.3f} s "
        f"(synchronous) vs {async_['mean_stall_s']:.3f} s (asynchronous) = {figures['async_stall_fraction']:.2f}x; "
        f"step time {sync['mean_step_time_s']:.3f} s vs {async_['mean_step_time_s']:.3f} s"
    )


if __name__ == "__main__":
    main()
