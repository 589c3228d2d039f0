"""Check shards as training reads them: every sample decoded as training decodes it (image within the pixel limit,
label map, colour histogram), and for a shard directory with manifest.json also every shard's hash, size and
sample count. Also owns what a TARGET of the shard tools (this module and shards.info) may be.

    python -m shards.verify TARGET... [--max-pixels N]

A TARGET is
  - a shard directory with manifest.json: all of its splits, checked against the manifest;
  - a directory without manifest.json: its *.tar files in name order (names starting with a dot are left out, as
    a shell's DIR/*.tar would; entries that are not regular files are skipped and named in the first line);
  - the URL of a shard directory on a store (`s3://bucket/prefix`, `http(s)://...`, as data.root takes it): its
    manifest and every shard are downloaded (one at a time, into a temporary file) and checked like a directory;
  - a shard URL spec as data.x_train takes it: a path or URL, a brace pattern (`'/data/x-{000000..000009}.tar'`)
    or several separated by spaces, expanded and checked by shards.urls.expand_shard_spec. `pipe:` commands are
    refused: the tools read files and stores only.
Without a manifest there is nothing to compare hashes or counts against, so only the samples are checked.

Prints, per target, a first line saying what it is, then one line per problem (`FILE:KEY: reason`,
`FILE: unreadable tar (...)`, `FILE: N of M samples bad`) and a summary line. Exit status: 0 when every target is
sound, 1 on any problem, 2 (one line on stderr) when a TARGET cannot be used (missing, a directory with neither a
manifest nor *.tar files, a pipe: command, an invalid manifest).

Nothing here writes a file; tar member names are only printed (control characters escaped), never used as paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shards.decode import DEFAULT_MAX_PIXELS, EXTRA_PARTS, BadSample, decode_extra, decode_image, image_extension
from shards.manifest import MANIFEST, read_manifest, sha256_file, split_format, split_urls
from shards.pixels import PixelFormat
from shards.remote import ShardUnavailable, is_remote
from shards.streams import Reading, file_samples, local_copy
from shards.urls import PIPE, ShardsError, check_url, expand_shard_spec


@dataclass(frozen=True)
class ShardGroup:
    """Shards reported together: a manifest split, or all shard files of one target without a manifest."""

    name: str
    """The split, or the target as the user wrote it."""
    urls: list[str]
    """URLs that passed shards.urls: absolute local paths or remote URLs."""
    labels: list[str]
    """How each shard is named in the output: its manifest name, else its path."""
    records: list[dict] | None
    """The manifest's record of each shard (samples, bytes, sha256); None without a manifest."""
    pixel_format: PixelFormat | None = None
    """The images' format the manifest records for the split; None (any format) without a manifest."""


@dataclass(frozen=True)
class Target:
    """One TARGET argument, resolved and checked before anything is read."""

    arg: str
    """As the user wrote it."""
    note: str
    """What the target turned out to be: the first output line about it."""
    groups: list[ShardGroup]
    directory: Path | None
    """The directory the target names (with or without manifest); None for a URL spec."""
    manifest: dict | None


def shown(text: str) -> str:
    """`text` safe to print on one line: a tar member or file name cannot forge output lines or terminal codes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _directory_shards(directory: Path, key: str) -> tuple[list[str], list[str]]:
    """Checked absolute paths of the *.tar files in `directory`, sorted by name, and the names skipped because
    they are not regular files."""
    root = os.path.abspath(directory)  # joined to an absolute root, no file name can read as a URL scheme
    urls, skipped = [], []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".tar") or name.startswith("."):
            continue
        try:
            urls.append(check_url(os.path.join(root, name), allow_pipe=False, key=key))
        except ShardsError:
            skipped.append(name)
    return urls, skipped


def manifest_groups(root: Path | str, manifest: dict) -> list[ShardGroup]:
    """One group per split of a checked manifest (see shards.manifest.read_manifest), in manifest order."""
    return [
        ShardGroup(
            split,
            split_urls(root, manifest, split),
            [s["name"] for s in entry["shards"]],
            entry["shards"],
            split_format(manifest, split),
        )
        for split, entry in manifest["splits"].items()
    ]


def resolve_target(arg: str, key: str) -> Target:
    """What the TARGET `arg` names (see the module docstring); `key` (the tool's name) prefixes its errors.

    Raises:
        ShardsError: one line saying why `arg` cannot be used and what to give instead.
    """
    if any(part.startswith(PIPE) for part in arg.split()):
        raise ShardsError(f"{key}: {arg!r:.200} is a pipe: command; the shard tools read local files only")
    if is_remote(arg) and not arg.endswith(".tar") and "{" not in arg and " " not in arg.strip():
        manifest = read_manifest(arg)
        groups = manifest_groups(arg, manifest)
        return Target(arg, f"{shown(arg)}: {MANIFEST}, {len(groups)} splits", groups, None, manifest)
    path = Path(arg)
    if arg.strip() and path.is_dir():  # Path("") is ".": an empty TARGET names nothing
        if (path / MANIFEST).is_file():
            manifest = read_manifest(path)
            groups = manifest_groups(path, manifest)
            note = f"{shown(arg)}: {MANIFEST}, {len(groups)} splits"
            return Target(arg, note, groups, path, manifest)
        urls, skipped = _directory_shards(path, key)
        if not urls:
            raise ShardsError(
                f"{key}: {arg} has no {MANIFEST} and no *.tar files; give its shard files, e.g. {arg}/*.tar"
            )
        note = f"{shown(arg)}: no {MANIFEST}; reading its {len(urls)} *.tar files in name order"
        if skipped:
            note += f" (skipped, not regular files: {shown(', '.join(skipped))})"
        return Target(arg, note, [ShardGroup(arg, urls, [shown(u) for u in urls], None)], path, None)
    urls = expand_shard_spec(arg, allow_pipe=False, key=key)
    note = f"{shown(arg)}: {len(urls)} shard file(s), no {MANIFEST}"
    return Target(arg, note, [ShardGroup(arg, urls, [shown(u) for u in urls], None)], None, None)


def resolve_targets(args: list[str], key: str) -> list[Target]:
    """Every TARGET resolved, so that an unusable one stops the tool before it reads anything."""
    return [resolve_target(arg, key) for arg in args]


def check_sample(
    sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS, pixel_format: PixelFormat | None = None
) -> str | None:
    """None when the sample's image (of `pixel_format`; None: any) and every extra it carries decode as training
    would decode them, else what is wrong (the first problem)."""
    try:
        decode_image(sample[image_extension(sample)], pixel_format, max_pixels)
        for kind, part in EXTRA_PARTS.items():
            if part in sample:
                decode_extra(sample, kind, max_pixels)
    except BadSample as err:
        return str(err)
    return None


def tar_error(err: Exception) -> str:
    """A tar-level error as one short line: webdataset appends ` @ <stream>` to the message and the stream and URL
    to the exception's args, which the output names already."""
    message = str(err.args[0]) if err.args else str(err)
    return f"{type(err).__name__}: {message.split(' @ <', 1)[0]}"


@dataclass
class Tally:
    """Samples read and bad samples found, over any number of shards."""

    samples: int = 0
    bad: int = 0


def check_shard(
    url: str, label: str, max_pixels: int, tally: Tally, pixel_format: PixelFormat | None = None
) -> tuple[int, list[str]]:
    """Decode every sample of one shard file, adding to `tally`.

    Returns:
        The number of samples read, and the problems: one line per bad sample, per tar-level error and, when a
        sample was bad, a count line.
    """
    errors: list[str] = []
    count, bad, problems = 0, 0, []
    samples = file_samples(url, handler=lambda e: errors.append(tar_error(e)) or True)
    for sample in samples:
        count += 1
        problem = check_sample(sample, max_pixels, pixel_format)
        if problem:
            bad += 1
            problems.append(f"{label}:{shown(sample['__key__'])}: {shown(problem)}")
    # One broken member is reported twice by webdataset (reading it, then moving to the next header): once here.
    problems += [f"{label}: unreadable tar ({shown(e):.200})" for e in dict.fromkeys(errors)]
    if bad:
        problems.append(f"{label}: {bad} of {count} samples bad")
    tally.samples += count
    tally.bad += bad
    return count, problems


def check_group(group: ShardGroup, max_pixels: int, tally: Tally | None = None) -> Iterator[str]:
    """The problems of one group of shards, shard by shard; with manifest records, also missing files and
    differing sizes, hashes and counts. Remote shards are downloaded one at a time (shards.streams.local_copy)."""
    for index, (url, label) in enumerate(zip(group.urls, group.labels)):
        record = group.records[index] if group.records is not None else None
        try:
            with local_copy(url, Reading()) as local:
                tally = tally if tally is not None else Tally()
                yield from _check_local(local, label, record, max_pixels, tally, group.pixel_format)
        except ShardUnavailable as err:
            yield f"{label}: unavailable ({shown(str(err)):.300})"


def _check_local(
    url: str, label: str, record: dict | None, max_pixels: int, tally: Tally, pixel_format: PixelFormat | None
) -> Iterator[str]:
    if record is not None:
        path = Path(url)
        if not path.is_file():
            yield f"{label}: missing"
            return
        if path.stat().st_size != record.get("bytes"):
            yield f"{label}: {path.stat().st_size} bytes, manifest says {record.get('bytes')}"
        if sha256_file(path) != record.get("sha256"):
            yield f"{label}: sha256 differs from the manifest"
    count, problems = check_shard(url, label, max_pixels, tally, pixel_format)
    yield from problems
    if record is not None and count != record["samples"]:
        yield f"{label}: {count} samples, manifest says {record['samples']}"


def verify(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """All problems found in the shard directory `root` (with manifest.json), one line each, and a line per shard
    with bad samples (empty when sound).

    Raises:
        ShardsError: an invalid manifest.
    """
    return [line for group in manifest_groups(root, read_manifest(root)) for line in check_group(group, max_pixels)]


def usage_error(tool: str, err: ShardsError) -> str:
    """The one stderr line for a TARGET that cannot be used, prefixed by the tool's name once."""
    message = shown(str(err))
    return message if message.startswith(f"{tool}: ") else f"{tool}: {message}"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_targets(parser: argparse.ArgumentParser) -> None:
    """The TARGET arguments shards.verify and shards.info share (see `resolve_targets`)."""
    parser.add_argument(
        "targets", nargs="+", metavar="TARGET", help="shard directory, shard file or brace pattern (quote it)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shards.verify",
        description="Decode every sample of tar shards; a directory's manifest.json is checked too.",
    )
    add_targets(parser)
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are bad (data.max_image_pixels)",
    )
    args = parser.parse_args(argv)
    try:
        targets = resolve_targets(args.targets, "shards.verify")
    except ShardsError as err:
        print(usage_error("shards.verify", err), file=sys.stderr)
        return 2
    total_problems = 0
    for target in targets:
        print(target.note, flush=True)
        problems, tally = 0, Tally()
        for group in target.groups:
            for line in check_group(group, args.max_pixels, tally):
                problems += 1
                print(line, flush=True)
        if target.manifest is not None:
            what = f"{len(target.groups)} splits"
        else:
            what = f"{len(target.groups[0].urls)} shard file(s)"
        print(f"{shown(target.arg)}: {what}, {tally.samples} samples, {tally.bad} bad, {problems} problem(s)")
        total_problems += problems
    if len(targets) > 1:
        print(f"all {len(targets)} targets: {total_problems} problem(s)")
    return 1 if total_problems else 0


if __name__ == "__main__":
    sys.exit(main())
