"""Pack unpaired image folders into tar shards plus manifest.json.

    python -m shards.write --root PATH/horse2zebra --out data/horse2zebra --load-size 286 --workers 2
    python -m shards.write --x DIR --y DIR [--test-x DIR --test-y DIR] --out DIR [--maxcount 1000]

`--root` accepts the reference layout (trainA/ trainB/ testA/ testB/). Images are optionally resized to
load_size x load_size (so training decodes small JPEGs and never resizes), re-encoded as JPEG or PNG, and written
`--maxcount` per shard as `<split>-%06d.tar`. `--extra hist` stores each image's colour histogram (hist.npy);
`--labels-x/--labels-y` store label maps (label.png) found under those folders with the image's relative stem.
Finished shards are recorded in `.progress.json`: re-running skips them, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.encoding import colour_histogram, npy_bytes, png_bytes
from shards.manifest import split_entry, write_manifest
from shards.writer import write_shards

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
PROGRESS = ".progress.json"


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    files: tuple[str, ...]
    source: str  # the folder the files are relative to
    labels: str | None  # folder of label maps with the same relative stems, or None


def list_images(folder: Path) -> list[str]:
    """Relative paths of the images under `folder`, sorted.

    Raises:
        ValueError: the folder does not exist or holds no images.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def sample_key(relative: str) -> str:
    """A webdataset key from a relative path: no dots (webdataset splits keys from extensions at the first dot)."""
    stem = os.path.splitext(relative)[0]
    return stem.replace(".", "_")


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_sample(job: ShardJob, relative: str, load_size: int | None, fmt: str, quality: int, hist: bool) -> dict:
    """One webdataset sample: the (resized, re-encoded) image and its extras."""
    with Image.open(Path(job.source) / relative) as image:
        image = image.convert("RGB")
        if load_size:
            image = image.resize((load_size, load_size), Image.Resampling.BICUBIC)
        sample = {"__key__": sample_key(relative), fmt: encode(image, fmt, quality)}
        if hist:
            sample["hist.npy"] = npy_bytes(colour_histogram(np.asarray(image)))
    if job.labels is not None:
        label_path = Path(job.labels) / (os.path.splitext(relative)[0] + ".png")
        if not label_path.is_file():
            raise ValueError(f"label map {label_path} for {relative} not found")
        with Image.open(label_path) as label:
            label = label.convert("L")
            if load_size:
                label = label.resize((load_size, load_size), Image.Resampling.NEAREST)
            sample["label.png"] = png_bytes(np.asarray(label))
    return sample


def write_job(job: ShardJob, out: str, load_size: int | None, fmt: str, quality: int, hist: bool) -> dict:
    """Write one shard; returns its manifest record (plus the split and the image size)."""
    samples = (build_sample(job, f, load_size, fmt, quality, hist) for f in job.files)
    (entry,) = write_shards(out, job.split, samples, maxcount=len(job.files), first_index=job.index)
    with Image.open(Path(job.source) / job.files[0]) as first:
        size = (load_size, load_size) if load_size else (first.height, first.width)
    return {**entry, "split": job.split, "index": job.index, "image_size": list(size)}


def plan_jobs(splits: dict[str, tuple[Path, Path | None]], maxcount: int) -> list[ShardJob]:
    """One job per shard of each split: `maxcount` consecutive files of the sorted listing."""
    jobs = []
    for split, (folder, labels) in splits.items():
        files = list_images(folder)
        for index, start in enumerate(range(0, len(files), maxcount)):
            jobs.append(
                ShardJob(
                    split,
                    index,
                    tuple(files[start : start + maxcount]),
                    str(folder),
                    None if labels is None else str(labels),
                )
            )
    return jobs


def write_dataset(
    splits: dict[str, tuple[Path, Path | None]],
    out: Path,
    load_size: int | None = None,
    maxcount: int = 1000,
    workers: int = 1,
    fmt: str = "jpg",
    quality: int = 95,
    hist: bool = False,
) -> Path:
    """Pack every split, skipping shards finished by an earlier run, then write manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / PROGRESS
    done: dict[str, dict] = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    jobs = plan_jobs(splits, maxcount)

    def finished(job: ShardJob) -> bool:
        record = done.get(f"{job.split}-{job.index:06d}")
        return record is not None and (out / record["name"]).is_file()

    todo = [job for job in jobs if not finished(job)]
    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="shard", disable=None) as bar,
    ):
        futures = [pool.submit(write_job, j, str(out), load_size, fmt, quality, hist) for j in todo]
        for future in futures:
            record = future.result()
            done[f"{record['split']}-{record['index']:06d}"] = record
            progress_path.write_text(json.dumps(done))
            bar.update(1)
    manifest_splits = {}
    for split in splits:
        records = sorted((r for r in done.values() if r["split"] == split), key=lambda r: r["index"])
        shards = [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in records]
        manifest_splits[split] = split_entry(shards, tuple(records[0]["image_size"]))
    path = write_manifest(out, manifest_splits)
    progress_path.unlink()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pack unpaired image folders into tar shards + manifest.json.")
    parser.add_argument("--root", type=Path, help="folder with trainA/ trainB/ [testA/ testB/] (the reference layout)")
    parser.add_argument("--x", type=Path, help="folder of X training images")
    parser.add_argument("--y", type=Path, help="folder of Y training images")
    parser.add_argument("--test-x", type=Path, help="folder of X test images")
    parser.add_argument("--test-y", type=Path, help="folder of Y test images")
    parser.add_argument("--labels-x", type=Path, help="label maps of X (training and test), same relative stems")
    parser.add_argument("--labels-y", type=Path, help="label maps of Y")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load-size", type=int, help="resize every image to N x N (pre-resized shards)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--extra", choices=["none", "hist"], default="none", help="hist: store colour histograms")
    args = parser.parse_args(argv)
    if args.root:
        args.x, args.y = args.x or args.root / "trainA", args.y or args.root / "trainB"
        if (args.root / "testA").is_dir() and (args.root / "testB").is_dir():
            args.test_x, args.test_y = args.test_x or args.root / "testA", args.test_y or args.root / "testB"
    if not (args.x and args.y):
        parser.error("give --root, or both --x and --y")
    if bool(args.test_x) != bool(args.test_y):
        parser.error("give both --test-x and --test-y, or neither")
    if args.maxcount < 1 or args.workers < 1 or (args.load_size is not None and args.load_size < 1):
        parser.error("--maxcount, --workers and --load-size must be >= 1")
    splits = {"x-train": (args.x, args.labels_x), "y-train": (args.y, args.labels_y)}
    if args.test_x:
        splits.update({"x-test": (args.test_x, args.labels_x), "y-test": (args.test_y, args.labels_y)})
    try:
        path = write_dataset(
            splits,
            args.out,
            args.load_size,
            args.maxcount,
            args.workers,
            args.format,
            args.quality,
            args.extra == "hist",
        )
    except ValueError as err:
        raise SystemExit(f"shards.write: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
