"""One training per run directory: the main process holds a POSIX lock on RUN/.lock for the whole run.

POSIX record locks (fcntl) are what NFS (through its lock manager) and Lustre (mounted with flock) share between
hosts. The kernel, or the NFS server, releases the lock when its holder dies, SIGKILL included, so the lock of a
training that is gone never blocks the next one. The file names its holder (host, pid, start time) for the message
a second training gets, and is emptied on a clean exit: a new holder that finds a name in it knows the last
training ended without releasing it (killed, or its node lost) and says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from trainer.config.checks import ConfigError
from trainer.runtime.run_files import UnsafeRunDir, link_message

LOCK = ".lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunDirLocked(RuntimeError):
    """Another training holds the run directory."""


class RunLock:
    """The lock of one run directory; `acquire` once, `release` (or process exit) frees it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> str:
        """Take the lock (creating the run directory). Returns the previous holder's description when it ended
        without releasing the lock, else an empty string.

        Raises:
            RunDirLocked: another live process holds it (one line naming it).
            UnsafeRunDir: RUN/.lock is a symlink.
            ConfigError: the run directory cannot be created (it is a file, under one, or in a read-only place).
        """
        run_dir = self.path.parent
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            blocker = next((part for part in (run_dir, *run_dir.parents) if part.exists() and not part.is_dir()), None)
            reason = f"{blocker} is not a directory" if blocker else f"{err.strerror}: {err.filename}"
            raise ConfigError(
                f"train.run_dir={run_dir} cannot be created ({reason}); choose another train.run_dir"
            ) from None
        try:  # never through a link planted at RUN/.lock: that would truncate what it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise UnsafeRunDir(link_message(self.path.parent, self.path)) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read(fd)
            os.close(fd)
            if err.errno in UNSUPPORTED:
                print(f"warning: {self.path.parent} does not support file locks; a second training is not stopped")
                return ""
            raise RunDirLocked(
                f"train.run_dir={self.path.parent} is in use by another training ({holder or 'holder unknown'}); "
                "wait for it to end or stop it, or choose another train.run_dir"
            ) from None
        previous = _read(fd)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {started}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return previous

    def release(self) -> None:
        """Empty the holder record and free the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, is_main: bool, any_rank: Callable[[bool], bool]) -> Iterator[None]:
    """The run directory's lock, held by the main process for the block; every rank fails if it is taken
    (`any_rank`, a collective, shares the main process's outcome).

    Raises:
        RunDirLocked: another training holds the run directory.
        ConfigError: the run directory cannot be created, or RUN/.lock is a symlink (UnsafeRunDir).
    """
    lock, error = RunLock(run_dir), None
    if is_main:
        try:
            previous = lock.acquire()
            if previous:
                print(f"{run_dir}: the last training there ({previous}) ended without releasing it; taking over")
        except (RunDirLocked, ConfigError) as err:  # UnsafeRunDir is a ConfigError
            error = err
    if any_rank(error is not None):
        raise error or RunDirLocked(f"train.run_dir={run_dir} cannot be taken (see rank 0's message)")
    try:
        yield
    finally:
        lock.release()
