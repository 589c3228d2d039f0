"""The one way files inside a run directory are created and replaced. A run directory may come from elsewhere (a
colleague's copy, a directory shared on a cluster) and may hold planted symlinks, so:
  - `check_run_dir` refuses, before anything is written, a run directory holding a symlink, FIFO, socket or device
    anywhere below it (W&B's own folder excepted: it links its latest run itself, and the project never writes
    there);
  - every file is created with O_NOFOLLOW | O_EXCL after removing what was at its name (a link is removed, never
    written through), and replaced by rename, which replaces a link rather than following it;
  - `inside` checks a path against the run directory before it is written or deleted: under it lexically, with no
    symlink among its existing components.
The run directory itself (train.run_dir) is the user's to choose and may be a symlink; only what is below it is
checked.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from trainer.config.checks import ConfigError

WANDB_DIR = "wandb"
MAX_ENTRIES = 1_000_000
"""Entries `check_run_dir` examines at most (a run directory holds a few thousand)."""


class UnsafeRunDir(ConfigError):
    """A run directory (or a path in it) that holds a symlink or leads outside it."""


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory with a symlink or a special file below it (iteratively, without following any).

    Raises:
        UnsafeRunDir: one line naming the first such entry (and where a link points).
    """
    if not run_dir.is_dir():
        return
    pending, seen = [run_dir], 0
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_ENTRIES:
                    raise UnsafeRunDir(f"train.run_dir={run_dir} holds more than {MAX_ENTRIES} entries")
                if entry.is_symlink():
                    raise UnsafeRunDir(link_message(run_dir, Path(entry.path)))
                if entry.is_dir(follow_symlinks=False):
                    if Path(entry.path) != run_dir / WANDB_DIR:
                        pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise UnsafeRunDir(
                        f"{entry.path} is neither a file nor a directory (a FIFO, socket or device, on which reading "
                        f"could wait forever); train.run_dir={run_dir} must hold files and directories only"
                    )


def inside(run_dir: Path, path: Path) -> Path:
    """`path` itself, once checked to be lexically under `run_dir` with no symlink among its existing components
    below `run_dir`.

    Raises:
        UnsafeRunDir: it leads outside, or through a symlink.
    """
    try:
        parts = path.relative_to(run_dir).parts
    except ValueError:
        raise UnsafeRunDir(f"{path} is not inside train.run_dir={run_dir}") from None
    if ".." in parts:
        raise UnsafeRunDir(f"{path} is not inside train.run_dir={run_dir}")
    current = run_dir
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break
        if stat.S_ISLNK(mode):
            raise UnsafeRunDir(link_message(run_dir, current))
    return path


def link_message(run_dir: Path, link: Path) -> str:
    """The one line that refuses the symlink `link` found in `run_dir`."""
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return (
        f"{link} is a symlink (to {target!s:.120}); train.run_dir={run_dir} must not hold symlinks, which could "
        "redirect the run's writes and deletions outside it: remove the link, or use another train.run_dir"
    )


def create_file(path: Path) -> int:
    """A new, empty file at `path` opened for writing (whatever was there - a file, a link - is removed first;
    a link is never followed)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def write_file(path: Path, data: bytes | str) -> None:
    """Write and fsync a new file at `path` (a plain write: callers make it visible atomically by renaming it or its
    directory)."""
    with os.fdopen(create_file(path), "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` atomically: a crash leaves the old or the new content, never a mix (a link at `path` is
    replaced, not written through)."""
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def open_append(path: Path) -> int:
    """`path` opened for appending, created if missing; a symlink at `path` is refused (ELOOP)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Delete whatever is at `path`: a directory tree, a file, or a link (the link itself, never its target)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        os.unlink(path)
