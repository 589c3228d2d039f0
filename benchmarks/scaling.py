"""Scaling on this machine: weak scaling from 1 to 2 CPU ranks (DDP over gloo, with and without DDP's static
graph, and FSDP2), and the bytes of parameters plus optimizer state each rank holds under FSDP2 and ZeRO-1/2/3
against total / N.

    python benchmarks/scaling.py [--config configs/demo-cpu.yaml] [--steps 60] [--weak 1,ddp2] [--sharded zero3]

Throughput comes from the trainer's own perf/images_per_s (metrics.jsonl), skipping the first logging window.
Writes JSON (benchmarks/results/scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.process_group import launcher  # noqa: E402


def throughput(args: argparse.Namespace, data: Path, run_dir: Path, launch: str | None, nproc: int, *extra: str):
    """Mean global images/s and per-rank images/s after the first logging window of a short training run."""
    cmd = launcher(launch, nproc) + [
        "trainer/main.py", "--config", args.config, f"data.root={data}", f"train.run_dir={run_dir}",
        f"train.steps={args.steps}", f"logging.every_steps={args.steps // 4}", "eval.images=0",
        "checkpoint.every_steps=0", *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "perf/images_per_s" in r][1:]
    mean = sum(r["perf/images_per_s"] for r in windows) / len(windows)
    per_rank = sum(r["perf/images_per_s_per_rank"] for r in windows) / len(windows)
    return {
        "ranks": nproc,
        "launch": launch or "none",
        "images_per_s": mean,
        "images_per_s_per_rank": per_rank,
        "overrides": list(extra),
    }


WEAK_ROWS = {  # name -> (launch config, ranks, overrides)
    "1": (None, 1, ()),
    "ddp2": ("cpu-ddp-2", 2, ()),
    "ddp2-static": ("cpu-ddp-2", 2, ("distributed.static_graph=true",)),
    "fsdp2": ("fsdp2", 2, ()),
}
SHARDED = ("fsdp2", "zero1", "zero2", "zero3")


def names(text: str, known: tuple[str, ...]) -> list[str]:
    """A comma-separated subset of `known`, in the order of `known` (argparse type)."""
    chosen = text.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; expected some of {','.join(known)}")
    return [name for name in known if name in chosen]


def state_probe(config: str, out: Path) -> None:
    """(Under accelerate launch) one training step, then write this rank's parameter and optimizer bytes to
    out/rank_N.json."""
    import torch

    from trainer.build import build_engine, build_training
    from trainer.config.load import load_config
    from trainer.train import train_step

    overrides = ["train.batch_size=2", "data.root=", "train.precision=fp32", "train.pool_size=0"]
    cfg = load_config(config, overrides)  # fp32: no master copy
    engine, cfg = build_engine(cfg)
    run = build_training(cfg, engine)
    size = cfg.data.crop_size
    batch = {d: torch.rand(2, 3, size, size, device=engine.device) * 2 - 1 for d in ("x", "y")}
    train_step(run, [batch])
    held = [engine.state_bytes(unit) for unit in ("g", "d")]
    row = {
        "rank": engine.rank,
        "backend": engine.backend_name,
        "param_bytes": sum(h["params"] for h in held),
        "optimizer_bytes": sum(h["optimizer"] for h in held),
    }
    (out / f"rank_{engine.rank}.json").write_text(json.dumps(row))
    engine.end()


def state_memory(args: argparse.Namespace, launch: str | None, nproc: int) -> list[dict]:
    """Each rank's bytes after one step under launch/{launch}.yaml on nproc ranks (None: one plain process)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = launcher(launch, nproc) + [__file__, "--probe", out, "--config", args.config]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"state probe {launch} failed:\n{result.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank_{rank}.json").read_text()) for rank in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo-cpu.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scaling.json")
    parser.add_argument(
        "--weak",
        type=lambda text: names(text, tuple(WEAK_ROWS)),
        default=list(WEAK_ROWS),
        help="weak-scaling rows (default all; the first is the baseline of the speed-ups)",
    )
    parser.add_argument(
        "--sharded",
        type=lambda text: names(text, SHARDED),
        default=list(SHARDED),
        help="backends whose per-rank state is measured (default all)",
    )
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        from trainer.runtime.process_exit import exit_process

        state_probe(args.config, args.probe)
        exit_process(0)

    from shards.synthetic import write_synthetic
    from trainer.config.load import load_config

    size = load_config(args.config).data.load_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, "colour", size=size, train=256, test=4, seed=0, maxcount=64)
        runs = []
        for name in args.weak:
            launch, nproc, overrides = WEAK_ROWS[name]
            runs.append(throughput(args, data, Path(tmp) / name, launch, nproc, *overrides))
    for run in runs:
        run["weak_scaling_speedup"] = run["images_per_s"] / runs[0]["images_per_s"]
        run["efficiency"] = run["weak_scaling_speedup"] / run["ranks"]
    full = state_memory(args, None, 1)[0]
    total = full["param_bytes"] + full["optimizer_bytes"]
    sharded = {}
    for launch in args.sharded:
        ranks = state_memory(args, launch, 2)
        for rank in ranks:
            rank["fraction_of_total"] = (rank["param_bytes"] + rank["optimizer_bytes"]) / total
        sharded[launch] = ranks
    figures = {
        "benchmark": "scaling",
        "config": args.config,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "weak_scaling": runs,
        "state_bytes_one_rank": total,
        "param_bytes_one_rank": full["param_bytes"],
        "sharded_state_per_rank": sharded,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for run in runs:
        print(f"{run['ranks']} x {run['launch']:<9} {' '.join(run['overrides']):<30} {run['images_per_s']:8.1f} img/s "
              f"x{run['weak_scaling_speedup']:.2f}")  # fmt: skip
    for name, ranks in sharded.items():
        print(
            f"{name}: per-rank params + optimizer state = {[round(r['fraction_of_total'], 3) for r in ranks]} of total"
        )


if __name__ == "__main__":
    main()
