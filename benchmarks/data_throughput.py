"""Data-loading throughput: decoded + augmented training images per second per core from pre-resized shards.

    python benchmarks/data_throughput.py [--size 256] [--images 2048] [--out benchmarks/results/data_throughput.json]

Writes JPEG shards of synthetic scenes pre-resized to load_size = size * 286 / 256 (the paper's ratio), then reads
them through the training stream (decode, random crop to `size`, flip, batching) in the main process (one core)
and through a DataLoader with 2 workers. Then the remote rows, one core each: the same shards over HTTP on
loopback (`python -m shards.serve` in a process of its own), without the cache, with a cold cache (the pass that
fills it) and with a warm one. Writes JSON, with the remote rows' ratios to the local one-core figure.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.process_group import free_port  # noqa: E402
from shards.manifest import split_entry, write_manifest  # noqa: E402
from shards.synthetic import render_scene  # noqa: E402
from shards.tar_shards import write_shards  # noqa: E402
from trainer.config.sections import DataConfig  # noqa: E402
from trainer.data.loader import UnpairedShards  # noqa: E402


def write_jpeg_shards(root: Path, load_size: int, count: int) -> None:
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("x-train", "y-train"):

        def samples():
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(render_scene(rng, load_size)[0]).save(buffer, format="JPEG", quality=95)
                yield {"__key__": f"{i:07d}", "jpg": buffer.getvalue()}

        splits[split] = split_entry(write_shards(root, split, samples(), maxcount=256), (load_size, load_size))
    write_manifest(root, splits)


def images_per_second(cfg: DataConfig, batches: int, batch_size: int) -> float:
    """Both domains' images per second through the stream."""
    if cfg.num_workers == 0:
        stream = iter(UnpairedShards(cfg, batch_size, seed=0, rank=0, world_size=1, slot_states={}, offset=0))
    else:
        dataset = UnpairedShards(cfg, batch_size, seed=0, rank=0, world_size=1, slot_states={}, offset=0)
        stream = iter(
            torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=4)
        )
    next(stream)  # warm-up: worker start, first shard open
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    return 2 * batches * batch_size / (time.perf_counter() - start)


@contextmanager
def served(root: str) -> Iterator[str]:
    """The URL of `root` served by shards.serve in a separate process (not competing with the reader's GIL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "shards.serve", root, "--port", str(port), "--quiet"]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "serving ... at URL": listening
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="crop size (training resolution)")
    parser.add_argument("--images", type=int, default=2048, help="images per domain in the shards")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    args = parser.parse_args()
    load_size = args.size * 286 // 256
    batches = max(2, args.images // args.batch_size - 2)
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_shards(Path(tmp), load_size, args.images)
        cfg = DataConfig(root=tmp, load_size=load_size, crop_size=args.size, flip=True, num_workers=0)
        one_core = images_per_second(cfg, batches, args.batch_size)
        two_workers = images_per_second(
            DataConfig(root=tmp, load_size=load_size, crop_size=args.size, flip=True, num_workers=2),
            batches,
            args.batch_size,
        )
        with served(tmp) as url, tempfile.TemporaryDirectory() as cache:
            remote = {"root": url, "load_size": load_size, "crop_size": args.size, "flip": True, "num_workers": 0}
            http = images_per_second(DataConfig(**remote), batches, args.batch_size)
            cold = images_per_second(DataConfig(**remote, cache_dir=cache), batches, args.batch_size)
            warm = images_per_second(DataConfig(**remote, cache_dir=cache), batches, args.batch_size)
    result = {
        "benchmark": "data_throughput",
        "crop_size": args.size,
        "load_size": load_size,
        "format": "jpg",
        "images_per_domain": args.images,
        "batch_size": args.batch_size,
        "images_per_s_one_core": round(one_core, 1),
        "images_per_s_two_workers": round(two_workers, 1),
        "images_per_s_http_one_core": round(http, 1),
        "images_per_s_http_cache_cold_one_core": round(cold, 1),
        "images_per_s_http_cache_warm_one_core": round(warm, 1),
        "http_vs_local": round(http / one_core, 3),
        "http_cache_cold_vs_local": round(cold / one_core, 3),
        "http_cache_warm_vs_local": round(warm / one_core, 3),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
