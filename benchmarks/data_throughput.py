"""Data-loading throughput: decoded + augmented training images per second per core from pre-resized shards.

    python benchmarks/data_throughput.py [--size 256] [--images 2048] [--out benchmarks/results/data_throughput.json]

Writes JPEG shards of synthetic scenes pre-resized to load_size = size * 286 / 256 (the paper's ratio), then reads
them through the training stream (decode, random crop to `size`, flip, batching) in the main process (one core)
and through a DataLoader with 2 workers. Writes JSON.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.manifest import split_entry, write_manifest
from shards.synthetic import render_scene
from shards.writer import write_shards
from trainer.config import DataConfig
from trainer.data import UnpairedShards


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
    result = {
        "benchmark": "data_throughput",
        "crop_size": args.size,
        "load_size": load_size,
        "format": "jpg",
        "images_per_domain": args.images,
        "batch_size": args.batch_size,
        "images_per_s_one_core": round(one_core, 1),
        "images_per_s_two_workers": round(two_workers, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
