"""Demo training throughput on a shared CPU, before and after the CPU policy (shards.cpu_budget): alone, beside
busy processes, and inside a cgroup limited to one CPU; plus the demo's precision (auto against forced bf16).

    python benchmarks/contention.py [--seconds 10] [--busy 2] [--rows alone/after,busy/after,...] [--out FILE]

"before" is torch's default (a thread per CPU the machine has, whatever else runs: train.cpu_threads=N); "after"
is train.cpu_threads=auto. Each row trains configs/demo-cpu.yaml through the training's own build in a fresh
process for --seconds after 3 warm-up steps; busy processes spin in pure Python. The one-CPU cgroup needs root
and a writable cgroup CPU controller (v2 cpu.max or v1 cpu.cfs_quota_us); elsewhere its rows record why not.
Writes JSON (benchmarks/results/contention.json): images/s per row and the ratios to the same variant alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.process_group import run_group  # noqa: E402

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_NAME = "cyclegan-dist-contention"


def measure(seconds: float, overrides: list[str]) -> dict:
    """Train the demo in this process for `seconds` after warm-up; its images/s and torch's thread count."""
    import torch

    from benchmarks.train_throughput import setup
    from trainer.config.load import load_config
    from trainer.train import train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs/demo-cpu.yaml", [f"train.run_dir={tmp}/run", *overrides])
        run, loader = setup(cfg)
        for _ in range(3):
            train_step(run, [next(loader)])
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            train_step(run, [next(loader)])
            steps += 1
        elapsed = time.perf_counter() - start
        run.engine.end()
    return {"images_per_s": steps * cfg.train.batch_size / elapsed, "threads": torch.get_num_threads(),
            "precision": run.engine.precision}  # fmt: skip


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """`count` processes spinning in pure Python, one CPU each."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(1.0 if count else 0.0)
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def one_cpu_cgroup() -> Path | str:
    """The cgroup.procs file of a cgroup limited to one CPU (created), or why there is none."""
    try:
        if (CGROUP_V2 / "cgroup.controllers").is_file():
            with contextlib.suppress(OSError):
                (CGROUP_V2 / "cgroup.subtree_control").write_text("+cpu")
            group = CGROUP_V2 / CGROUP_NAME
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text("100000 100000")
        else:
            group = CGROUP_V1 / CGROUP_NAME
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("100000")
    except OSError as err:
        return f"no one-CPU cgroup here ({err.strerror}: needs root and a writable cgroup CPU controller)"
    return group / "cgroup.procs"


def run_row(seconds: float, overrides: list[str], cgroup: Path | None = None) -> dict:
    """One row in a fresh process (in `cgroup` when given)."""
    cmd = [sys.executable, __file__, "--row", "--seconds", str(seconds), *overrides]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > {cgroup} && exec "$@"', "sh", *cmd]
    code, stdout, stderr = run_group(cmd, seconds + 300, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "WANDB_SILENT": "true"})  # fmt: skip
    if code != 0:
        return {"error": "timed out" if code is None else stderr[-2000:]}
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the busy rows")
    parser.add_argument("--rows", help="only these rows, comma-separated (e.g. busy/after); default: all")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/contention.json")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.row:
        print(json.dumps(measure(args.seconds, overrides)))
        return
    default_threads = len(os.sched_getaffinity(0))  # torch's default: one per CPU it may run on
    variants = {"before": [f"train.cpu_threads={default_threads}"], "after": ["train.cpu_threads=auto"],
                "bf16_forced": ["train.precision=bf16"]}  # fmt: skip
    plan = [("alone", "before"), ("alone", "after"), ("busy", "before"), ("busy", "after"),
            ("one_cpu_cgroup", "before"), ("one_cpu_cgroup", "after"), ("alone", "bf16_forced")]  # fmt: skip
    wanted = set(args.rows.split(",")) if args.rows else {f"{c}/{v}" for c, v in plan}
    rows: dict[str, dict] = {}
    for condition, variant in plan:
        if f"{condition}/{variant}" not in wanted:
            continue
        with busy(args.busy if condition == "busy" else 0):
            cgroup = one_cpu_cgroup() if condition == "one_cpu_cgroup" else None
            row = {"error": cgroup} if isinstance(cgroup, str) else run_row(args.seconds, variants[variant], cgroup)
        rows[f"{condition}/{variant}"] = row
    speed = {f"{c}/{v}": rows.get(f"{c}/{v}", {}).get("images_per_s") for c, v in plan}
    ratios = {}
    for name in ("before", "after"):
        for condition in ("busy", "one_cpu_cgroup"):
            if speed[f"{condition}/{name}"] and speed[f"alone/{name}"]:
                ratios[f"{condition}_slowdown_{name}"] = speed[f"alone/{name}"] / speed[f"{condition}/{name}"]
    if speed["alone/before"] and speed["alone/after"]:
        ratios["alone_after_vs_before"] = speed["alone/after"] / speed["alone/before"]
    if speed["alone/bf16_forced"] and speed["alone/after"]:
        ratios["bf16_forced_slowdown_vs_auto"] = speed["alone/after"] / speed["alone/bf16_forced"]
    figures = {
        "benchmark": "contention",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "seconds_per_row": args.seconds,
        "busy_processes": args.busy,
        "rows": rows,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, row in rows.items():
        shown = row["error"] if "error" in row else f"{row['images_per_s']:.1f} img/s, {row['threads']} thread(s)"
        print(f"{key:>24}: {shown}")
    for key, value in ratios.items():
        print(f"{key:>36}: {value:.2f}x")


if __name__ == "__main__":
    main()
