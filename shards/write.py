"""Pack unpaired image folders into tar shards plus manifest.json.

    python -m shards.write --root PATH/horse2zebra --out data/horse2zebra --load-size 286 --workers 2
    python -m shards.write --x DIR --y DIR [--test-x DIR --test-y DIR] --out DIR [--maxcount 1000] [--strict]

`--root` accepts the reference layout (trainA/ trainB/ testA/ testB/). Images keep what they are: their channels
(grey, RGB, RGBA, or the N bands of a multi-page or multi-band TIFF) and bit depth (8 or 16), recorded per split in
the manifest with the range of their sizes (shards.pixels). A split mixing formats stops the run in one line naming
two example files, unless `--channels N` / `--bits 8|16` convert every image. Images are optionally resized to
load_size x load_size (so training decodes small files and never resizes), re-encoded (JPEG or PNG for 8-bit grey
and RGB, losslessly otherwise), and written `--maxcount` per shard as `<split>-%06d.tar`. A sample's key is its
relative path without the suffix, dots made underscores; two files of a split that would share a key (`s.png` and
`s.jpg`, `d.b.png` and `d_b.png`) stop the run before anything is written, naming both (rename one). `--extra
hist` stores each image's colour histogram (hist.npy, 8-bit RGB only); `--labels-x/--labels-y` store label maps
(label.png) found under those folders with the image's relative stem.

Unreadable inputs. Only regular files (or symlinks to them) are opened, so a FIFO, socket, device, directory or
dangling symlink with an image suffix never blocks the run. It is skipped like a zero-byte, non-image, corrupt or
truncated file, a decompression bomb (over PIL's `Image.MAX_IMAGE_PIXELS`) or an image without its label map, and
the end of the run lists every skipped input with its reason (exit 0). `--strict` stops at the first one instead,
with one line naming it. A split without a single readable input is an error.

Shards are planned from the file listings (`--maxcount` consecutive files each), written in parallel under
`.tar.tmp` names, and renamed by the main process in plan order to dense numbers: a planned shard whose inputs are
all unreadable produces no tar, and the next one takes its number. Finished shards (with their skipped inputs) are
recorded in `.progress.json`: re-running skips them, so an interrupted run resumes. No `.tar.tmp` outlives a run:
a shard that fails removes its own; those of the splits being written are removed at the start (a killed run's)
and after a failure (shards that finished while another one failed are not published).

Checking written shards is shards.verify's job; the manifest format is shards.manifest's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.cpu_budget import cpu_budget
from shards.encoding import colour_histogram, npy_bytes, png_bytes
from shards.input_files import IMAGE_SUFFIXES, Unreadable, read_image
from shards.manifest import sha256_file, split_entry, write_manifest
from shards.pixels import (
    MAX_CHANNELS,
    RGB8,
    PixelFormat,
    convert_pixels,
    encode_pixels,
    format_of,
    resize_pixels,
)
from shards.tar_shards import write_tar

PROGRESS = ".progress.json"


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    """The shard's place in the split's plan; its file name's number unless an earlier planned shard is empty."""
    files: tuple[str, ...]
    source: str  # the folder the files are relative to
    labels: str | None  # folder of label maps with the same relative stems, or None

    @property
    def key(self) -> str:
        """The job's key in .progress.json."""
        return f"{self.split}-{self.index:06d}"

    @property
    def tmp_name(self) -> str:
        """The file the job writes; the main process renames it."""
        return f"{self.key}.tar.tmp"


@dataclass(frozen=True)
class Encoding:
    load_size: int | None
    """Resize every image to load_size x load_size; None keeps its size."""
    fmt: str
    """Image format of the samples: jpg or png."""
    quality: int
    """JPEG quality."""
    hist: bool
    """Also store each image's colour histogram (hist.npy)."""
    channels: int | None = None
    """Convert every image to this many channels (shards.pixels.convert_pixels); None keeps each image's."""
    bits: int | None = None
    """Convert every image to this bit depth; None keeps each image's."""


def list_images(folder: Path) -> list[str]:
    """Relative paths of the entries under `folder` with an image suffix, sorted (readable or not).

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


def check_unique_keys(folder: Path, files: list[str]) -> None:
    """Stop when two of `folder`'s files (relative paths) would get the same sample key: one of them would be
    lost, and the manifest would count both.

    Raises:
        ValueError: one line naming both files.
    """
    seen: dict[str, str] = {}
    for relative in files:
        key = sample_key(relative)
        first = seen.setdefault(key, relative)
        if first != relative:
            raise ValueError(
                f"{folder}: {first} and {relative} would both be sample {key!r} (keys drop the suffix and turn dots "
                "into underscores); rename one of them"
            )


class Built(NamedTuple):
    sample: dict
    size: tuple[int, int]
    """(height, width) as stored."""
    pixel_format: PixelFormat
    original: tuple[int, int]
    """(height, width) as read."""


def build_sample(job: ShardJob, relative: str, encoding: Encoding) -> Built:
    """One webdataset sample (the image converted and resized as asked, re-encoded, and its extras) with its
    image's size and format.

    Raises:
        Unreadable: the image, or its label map when the job has label maps.
        ValueError: --extra hist for an image that is not 8-bit RGB.
    """
    path = Path(job.source) / relative
    pixels = read_image(path)
    label = None
    if job.labels is not None:
        label_path = Path(job.labels) / (os.path.splitext(relative)[0] + ".png")
        try:
            label = read_image(label_path, label=True)
        except Unreadable as err:
            raise Unreadable(f"label map {label_path}: {err}") from None
    own, original = format_of(pixels), pixels.shape[:2]
    target = PixelFormat(encoding.channels or own.channels, encoding.bits or own.bits)
    if target != own:
        pixels = convert_pixels(pixels, target)
    if encoding.load_size:
        pixels = resize_pixels(pixels, encoding.load_size, encoding.load_size)
    part, data = encode_pixels(pixels, encoding.fmt, encoding.quality)
    sample = {"__key__": sample_key(relative), part: data}
    if encoding.hist:
        if target != RGB8:
            raise ValueError(f"{path} is {target.describe()}: --extra hist stores colour histograms of 8-bit RGB")
        sample["hist.npy"] = npy_bytes(colour_histogram(pixels))
    if label is not None:
        if encoding.load_size:
            size = (encoding.load_size, encoding.load_size)
            label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
        sample["label.png"] = png_bytes(label)
    return Built(sample, pixels.shape[:2], target, original)


def write_job(job: ShardJob, out: str, encoding: Encoding, strict: bool) -> dict:
    """Write the readable samples of one planned shard to out/<job.tmp_name>; no file when none is readable.

    Returns:
        Its progress record without a name: split, index, samples, skipped ([relative path, reason] pairs) and,
        when it has samples, bytes, sha256, sizes (smallest, largest, all square), formats ({"CxB": first file})
        and reshaped ([count, first file, "WxH"] of non-square images --load-size made square).

    Raises:
        ValueError: with `strict`, "PATH: reason" of the shard's first unreadable input.
    """
    skipped: list[list[str]] = []
    sizes: list[tuple[int, int]] = []
    formats: dict[str, str] = {}  # "CHANNELSxBITS" -> the first file of that format
    reshaped: list = [0, None, None]

    def readable_samples() -> Iterator[dict]:
        for relative in job.files:
            try:
                built = build_sample(job, relative, encoding)
            except Unreadable as err:
                if strict:
                    raise ValueError(f"{Path(job.source) / relative}: {err}") from None
                skipped.append([relative, str(err)])
                continue
            sizes.append(built.size)
            formats.setdefault(f"{built.pixel_format.channels}x{built.pixel_format.bits}", relative)
            height, width = built.original
            if encoding.load_size and height != width:
                reshaped[:] = [reshaped[0] + 1, reshaped[1] or relative, reshaped[2] or f"{width}x{height}"]
            yield built.sample

    tmp = Path(out) / job.tmp_name
    samples = write_tar(tmp, readable_samples())
    record = {"split": job.split, "index": job.index, "samples": samples, "skipped": skipped}
    if samples:
        heights, widths = zip(*sizes)
        sizes_record = [[min(heights), min(widths)], [max(heights), max(widths)], heights == widths]
        record.update(bytes=tmp.stat().st_size, sha256=sha256_file(tmp), sizes=sizes_record, formats=formats,
                      reshaped=reshaped)  # fmt: skip
    return record


def plan_jobs(splits: dict[str, tuple[Path, Path | None]], maxcount: int) -> list[ShardJob]:
    """One job per planned shard of each split: `maxcount` consecutive files of the sorted listing."""
    jobs = []
    for split, (folder, labels) in splits.items():
        files = list_images(folder)
        check_unique_keys(folder, files)
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


def finished(record: dict | None, out: Path) -> bool:
    """Whether an earlier run completed a planned shard: recorded, and its tar still there if it has samples."""
    return record is not None and (not record["samples"] or (out / record["name"]).is_file())


def shard_number(done: dict[str, dict], job: ShardJob) -> int:
    """The job's shard file number: how many of its split's earlier planned shards have samples. Results are
    published in plan order, so all of those are in `done`."""
    return sum(1 for r in done.values() if r["split"] == job.split and r["index"] < job.index and r["samples"])


def publish(job: ShardJob, record: dict, out: Path, number: int) -> dict:
    """Rename a written shard from its temporary name to <split>-<number>.tar; returns the record with that name
    (None for a shard without samples, which has no file)."""
    if not record["samples"]:
        return {**record, "name": None}
    name = f"{job.split}-{number:06d}.tar"
    os.replace(out / job.tmp_name, out / name)
    return {**record, "name": name}


def remove_temporaries(out: Path, splits: Iterable[str]) -> None:
    """Remove the <split>-NNNNNN.tar.tmp files of these splits."""
    for split in splits:
        for tmp in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar.tmp"):
            tmp.unlink()


def save_progress(path: Path, done: dict[str, dict]) -> None:
    """Replace .progress.json atomically: a run killed while saving leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(done))
    os.replace(tmp, path)


def write_all(
    todo: list[ShardJob], done: dict[str, dict], out: Path, encoding: Encoding, workers: int, strict: bool, total: int
) -> None:
    """Write the `todo` shards in parallel, publishing each (in plan order) into `done` and .progress.json.

    Raises:
        ValueError: with `strict`, the first unreadable input (shards finished meanwhile stay unpublished).
    """
    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        tqdm(total=total, initial=total - len(todo), unit="shard", disable=None) as bar,
    ):
        futures = [pool.submit(write_job, job, str(out), encoding, strict) for job in todo]
        try:
            for job, future in zip(todo, futures):
                done[job.key] = publish(job, future.result(), out, shard_number(done, job))
                save_progress(out / PROGRESS, done)
                bar.update(1)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure: start no more shards, wait for the running ones


def manifest_split(folder: Path, records: list[dict]) -> dict:
    """The manifest entry of a split from its planned shards' records, in plan order.

    Raises:
        ValueError: none of the split's inputs was readable.
    """
    written = [r for r in records if r["samples"]]
    if not written:
        relative, reason = records[0]["skipped"][0]
        count = sum(len(r["skipped"]) for r in records)
        raise ValueError(f"{folder}: none of its {count} images is readable (first: {relative}: {reason})")
    shards = [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in written]
    formats: dict[str, str] = {}
    for record in written:
        for key, relative in record["formats"].items():
            formats.setdefault(key, relative)
    if len(formats) > 1:
        (first, a), (second, b) = list(formats.items())[:2]
        raise ValueError(
            f"{folder} mixes image formats: {a} is {describe(first)}, {b} is {describe(second)}; convert them with "
            "--channels N and/or --bits 8|16"
        )
    channels, bits = map(int, next(iter(formats)).split("x"))
    smallest = tuple(min(r["sizes"][0][i] for r in written) for i in (0, 1))
    largest = tuple(max(r["sizes"][1][i] for r in written) for i in (0, 1))
    square = all(r["sizes"][2] for r in written)
    return split_entry(shards, smallest, largest, PixelFormat(channels, bits), square)


def describe(format_key: str) -> str:
    """The words for a "CHANNELSxBITS" key of write_job's record."""
    channels, bits = map(int, format_key.split("x"))
    return PixelFormat(channels, bits).describe()


def write_dataset(
    splits: dict[str, tuple[Path, Path | None]],
    out: Path,
    load_size: int | None = None,
    maxcount: int = 1000,
    workers: int = 1,
    fmt: str = "jpg",
    quality: int = 95,
    hist: bool = False,
    strict: bool = False,
    channels: int | None = None,
    bits: int | None = None,
) -> tuple[Path, list[tuple[str, str, str]]]:
    """Pack every split, skipping shards finished by an earlier run, then write manifest.json.

    Returns:
        The manifest's path and the skipped inputs as (split, relative path, reason), in plan order.

    Raises:
        ValueError: a folder is missing or holds no images, two of its files would share a sample key, a split
            has no readable input, or (with `strict`) the first unreadable input.
    """
    jobs = plan_jobs(splits, maxcount)  # before anything is written: it checks every folder
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / PROGRESS
    done: dict[str, dict] = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    todo = [job for job in jobs if not finished(done.get(job.key), out)]
    remove_temporaries(out, splits)  # a killed run's
    try:
        write_all(todo, done, out, Encoding(load_size, fmt, quality, hist, channels, bits), workers, strict, len(jobs))
    except BaseException:
        remove_temporaries(out, splits)  # of shards that finished after another one failed, never published
        raise
    manifest_splits = {}
    for split, (folder, _) in splits.items():
        split_jobs = [job for job in jobs if job.split == split]
        try:
            manifest_splits[split] = manifest_split(folder, [done[job.key] for job in split_jobs])
        except ValueError:
            for job in split_jobs:  # so that a rerun after fixing the folder reads it again
                del done[job.key]
            save_progress(progress_path, done)
            raise
    path = write_manifest(out, manifest_splits)
    progress_path.unlink()
    reshaped = [(job.split, done[job.key].get("reshaped", [0])) for job in jobs]
    count = sum(record[0] for _, record in reshaped)
    if count:
        split, (_, relative, size) = next((split, r) for split, r in reshaped if r[0])
        print(f"shards.write: --load-size {load_size} changed the aspect of {count} image(s) that are not square "
              f"(the first: {split}: {relative}, {size}); each is stored as {load_size}x{load_size}",
              file=sys.stderr)  # fmt: skip
    skipped = [(job.split, relative, reason) for job in jobs for relative, reason in done[job.key].get("skipped", [])]
    return path, skipped


def skip_report(skipped: list[tuple[str, str, str]]) -> str:
    """One line per skipped input under a count."""
    lines = [f"  {split}: {relative} ({reason})" for split, relative, reason in skipped]
    return "\n".join([f"skipped {len(skipped)} unreadable input(s) (--strict stops at the first):", *lines])


def workers_arg(text: str) -> int | str:
    """--workers: auto or a whole number."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked, with --root expanded into the folders and --workers auto resolved."""
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
    parser.add_argument(
        "--workers", type=workers_arg, default="auto", help="shards written in parallel (auto: this process's share "
        "of the CPUs: affinity, cgroup quota, CPUs busy elsewhere; shards.cpu_budget)"
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=["jpg", "png"], default="jpg", help="of 8-bit grey and RGB images; the others are "
        "stored losslessly (16-bit grey and 8-bit RGBA as PNG, the rest as .npy arrays)"
    )  # fmt: skip
    parser.add_argument("--channels", type=int, help="convert every image to N channels (1: luma; from 1: repeated)")
    parser.add_argument("--bits", type=int, choices=[8, 16], help="convert every image to this bit depth")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--extra", choices=["none", "hist"], default="none", help="hist: store colour histograms")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable input instead of skipping and listing it"
    )
    args = parser.parse_args(argv)
    if args.root:
        args.x, args.y = args.x or args.root / "trainA", args.y or args.root / "trainB"
        if (args.root / "testA").is_dir() and (args.root / "testB").is_dir():
            args.test_x, args.test_y = args.test_x or args.root / "testA", args.test_y or args.root / "testB"
    if not (args.x and args.y):
        parser.error("give --root, or both --x and --y")
    if bool(args.test_x) != bool(args.test_y):
        parser.error("give both --test-x and --test-y, or neither")
    args.workers = cpu_budget().per_process if args.workers == "auto" else args.workers
    if args.maxcount < 1 or args.workers < 1 or (args.load_size is not None and args.load_size < 1):
        parser.error("--maxcount, --workers and --load-size must be >= 1")
    if args.channels is not None and not 1 <= args.channels <= MAX_CHANNELS:
        parser.error(f"--channels must be in [1, {MAX_CHANNELS}]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = {"x-train": (args.x, args.labels_x), "y-train": (args.y, args.labels_y)}
    if args.test_x:
        splits.update({"x-test": (args.test_x, args.labels_x), "y-test": (args.test_y, args.labels_y)})
    try:
        path, skipped = write_dataset(
            splits,
            args.out,
            args.load_size,
            args.maxcount,
            args.workers,
            args.format,
            args.quality,
            args.extra == "hist",
            args.strict,
            args.channels,
            args.bits,
        )
    except ValueError as err:
        raise SystemExit(f"shards.write: {err}") from None
    if skipped:
        print(skip_report(skipped), file=sys.stderr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
