"""How long a checkpoint stops the training loop: synchronous saves against asynchronous ones
(checkpoint.async_save) and, with --remote, synchronous saves uploaded to an object store (checkpoint.remote: moto's
S3 server on loopback), the same training otherwise, one after the other in one run.

    python benchmarks/checkpoint_stall.py [--config configs/horse2zebra.yaml] [--size 64] [--steps 24] [--every 4]
                                          [--remote]

Each run trains `--steps` updates with a checkpoint every `--every` and logs, per save, the seconds the loop waited
for it (checkpoint/stall_s in metrics.jsonl). The first save of each run is left out (it creates the directory
tree and warms the page cache). Also per run: its wall time (with the remote run's final wait for its uploads) and,
uploading, the lag behind the store at each save (checkpoint/upload_lag_steps). Writes JSON
(benchmarks/results/checkpoint_stall.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run(args: argparse.Namespace, data: Path, run_dir: Path, asynchronous: bool, store: dict | None = None) -> dict:
    """One training run; its stalls (seconds per save after the first), step time, wall time and checkpoint size;
    `store` ({"url", "env"}): uploading every checkpoint there."""
    cmd = [sys.executable, "trainer/main.py", "--config", args.config, f"data.root={data}", f"train.run_dir={run_dir}",
           f"data.load_size={args.size}", f"data.crop_size={args.size}", f"train.steps={args.steps}",
           f"checkpoint.every_steps={args.every}", "checkpoint.keep=2", f"logging.every_steps={args.every}",
           "eval.images=0", "logging.image_every_steps=0", f"checkpoint.async_save={asynchronous}",
           *([f"checkpoint.remote={store['url']}"] if store else [])]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true", **(store["env"] if store else {})}
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stalls = [r["checkpoint/stall_s"] for r in records if "checkpoint/stall_s" in r][1:]
    steps = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r][1:]
    lags = [r["checkpoint/upload_lag_steps"] for r in records if "checkpoint/upload_lag_steps" in r]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {
        "async_save": asynchronous,
        "remote": bool(store),
        "wall_s": wall,
        **({"upload_lag_steps": lags} if store else {}),
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
    parser.add_argument("--remote", action="store_true", help="also a run uploading to moto's S3 server on loopback")
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
        if args.remote:
            with moto_store() as store:
                remote = run(args, data, Path(tmp) / "remote", asynchronous=False, store=store)
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
    if args.remote:
        figures["remote"] = remote
        figures["remote_stall_fraction"] = remote["mean_stall_s"] / sync["mean_stall_s"]
        figures["remote_wall_fraction"] = remote["wall_s"] / sync["wall_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"checkpoint of {sync['checkpoint_bytes'] / 2**20:.0f} MiB: the loop stalls {sync['mean_stall_s']:.3f} s "
        f"(synchronous) vs {async_['mean_stall_s']:.3f} s (asynchronous) = {figures['async_stall_fraction']:.2f}x; "
        f"step time {sync['mean_step_time_s']:.3f} s vs {async_['mean_step_time_s']:.3f} s"
        + (remote_line(figures) if args.remote else "")
    )


def remote_line(figures: dict) -> str:
    return (
        f"; uploading to a store: stall {figures['remote_stall_fraction']:.2f}x and run "
        f"{figures['remote_wall_fraction']:.2f}x of synchronous local saves"
    )


@contextlib.contextmanager
def moto_store() -> Iterator[dict]:
    """A moto S3 server on loopback with an empty bucket: {"url", "env"} for a run that uploads there."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    try:
        s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}).mkdir(
            "checkpoint-stall"
        )
        yield {"url": "s3://checkpoint-stall/run", "env": env}
    finally:
        server.stop()


if __name__ == "__main__":
    main()
