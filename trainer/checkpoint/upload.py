"""Uploading published checkpoints to the store (trainer.checkpoint.store) in background threads: the loop never
waits. One upload is in flight per rank; a checkpoint published meanwhile waits, and a newer one replaces it
(only the newest waiting checkpoint matters). The main rank sends the checkpoint's files in its run directory,
waits for the files of the ranks whose run directories are elsewhere (other nodes' local disks: each of them
uploads its own rank file with a record of its sha256 and the launch's attempt id), then writes the COMPLETE
marker listing every file, then `latest` (and best.json), then rotates the store like the run directory
(checkpoint.keep, keep_every_steps, the best one). A failed transfer (the store down, a timeout) is retried with
backoff until it succeeds or a newer checkpoint replaces it: training goes on, the lag is logged and the console
says when uploads fall behind by more than checkpoint.remote_max_behind checkpoints, and when they catch up. A kill
at any moment leaves the store's previous complete checkpoint the newest complete one: COMPLETE is written after
every file it lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from shards.bounded_read import BoundedReadError, read_json
from trainer.checkpoint.format import BEST, CHECKPOINTS, COMPLETE, LATEST, CheckpointError, rank_file, read_best
from trainer.checkpoint.store import CheckpointStore

RETRY_S = 1.0  # the first retry's wait; doubled after each failure up to MAX_RETRY_S
MAX_RETRY_S = 30.0


@dataclasses.dataclass(frozen=True)
class Upload:
    """What one upload sends: a published checkpoint directory (the main rank), or `files` ({store name: local
    path}): a rank's own files of checkpoint `step` (`rank_files`: a newer checkpoint replaces them, and they are
    deleted here once sent or replaced), or the run's final files (the export, metrics.jsonl, config.yaml)."""

    step: int
    checkpoint: Path | None = None
    files: tuple[tuple[str, Path], ...] = ()
    rank_files: bool = False

    @property
    def replaceable(self) -> bool:
        return self.checkpoint is not None or self.rank_files

    @property
    def label(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint step_{self.step:08d}"
        return f"this rank's files of checkpoint step_{self.step:08d}" if self.rank_files else "the run's final files"


def rank_record(digest: str, attempt: str) -> bytes:
    """The record a rank uploads beside its rank file: its sha256 and the launch's attempt id."""
    return f"{digest} {attempt}\n".encode()


def record_name(name: str) -> str:
    """The store name of the record of rank file `name`."""
    return f"{name}.sha256"


class CheckpointUploader:
    """A rank's upload thread. `confirmed` is the newest checkpoint step complete in the store (on a rank that
    uploads only its own files: the newest whose files it uploaded)."""

    def __init__(
        self,
        store: CheckpointStore,
        keep: int,
        keep_every_steps: int,
        max_behind: int,
        report: Callable[[str], None],
        confirmed: int | None = None,
        elsewhere: Sequence[int] = (),
        attempt: str = "",
    ):
        """`report`: one-line messages (Console.message); `confirmed`: the store's newest complete step at start;
        `elsewhere`: the ranks whose files are not in the main rank's run directory (they upload their own, marked
        with `attempt`, this launch's id)."""
        self.store, self.keep, self.keep_every_steps, self.max_behind = store, keep, keep_every_steps, max_behind
        self.report = report
        self.confirmed = confirmed
        self.elsewhere, self.attempt = tuple(elsewhere), attempt
        self.submitted: list[int] = []  # checkpoint steps handed over, in order
        self.in_flight: Upload | None = None
        self.waiting: list[Upload] = []  # at most one checkpoint, then the final files
        self.warned_behind = False
        self.best_step: int | None = None  # the step of the best.json uploaded last
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, upload: Upload) -> None:
        """Queue `upload` (a newer checkpoint replaces a waiting one) and return at once."""
        with self._cond:
            if upload.replaceable:
                self.submitted.append(upload.step)
                for replaced in [u for u in self.waiting if u.replaceable]:
                    self.waiting.remove(replaced)
                    _discard(replaced)
                self.waiting.insert(0, upload)
            else:
                self.waiting.append(upload)
            self._cond.notify_all()
        self._check_behind()

    def pending_steps(self) -> set[int]:
        """The checkpoints being uploaded or waiting (the run directory's rotation keeps them until they are sent)."""
        with self._cond:
            pending = [self.in_flight, *self.waiting]
            return {u.step for u in pending if u is not None and u.checkpoint is not None}

    def lag_steps(self, step: int) -> int:
        """Updates between checkpoint `step` (just published) and the store's newest complete checkpoint."""
        return step - (self.confirmed if self.confirmed is not None else 0)

    def behind(self) -> int:
        """Checkpoints handed over and not yet complete in the store."""
        with self._cond:
            return sum(1 for step in self.submitted if self.confirmed is None or step > self.confirmed)

    def close(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the uploads handed over; whether all of them finished."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self.waiting or self.in_flight is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def _check_behind(self) -> None:
        with self._cond:  # called from the loop's thread and the upload thread
            self._say_behind()

    def _say_behind(self) -> None:
        behind = self.behind()
        if behind > self.max_behind and not self.warned_behind:
            self.warned_behind = True
            self.report(
                f"warning: checkpoint uploads to {self.store.url} are {behind} checkpoints behind (newest complete "
                f"there: {_name(self.confirmed)}); training goes on, uploads keep retrying"
            )
        elif behind <= 1 and self.warned_behind:
            self.warned_behind = False
            self.report(f"checkpoint uploads to {self.store.url} caught up: {_name(self.confirmed)} is there")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self._closing:
                    self._cond.wait()
                if not self.waiting:
                    return
                self.in_flight = self.waiting.pop(0)
            try:
                self._with_retries(self.in_flight)
                _discard(self.in_flight)
            finally:
                with self._cond:
                    self.in_flight = None
                    self._cond.notify_all()

    def _with_retries(self, upload: Upload) -> None:
        wait, failures, sent = RETRY_S, 0, set()
        while True:
            try:
                self._send(upload, sent)
                return
            except Exception as err:  # the thread must live on: anything is reported and retried
                if upload.checkpoint is not None and not upload.checkpoint.is_dir():
                    return  # the run directory rotated it away: a newer checkpoint replaced it
                failures += 1
                if failures == 1:
                    self.report(f"warning: uploading {upload.label} failed ({err}); retrying, training goes on")
            if self._replaced(upload, wait):
                return
            wait = min(2 * wait, MAX_RETRY_S)

    def _replaced(self, upload: Upload, wait_s: float) -> bool:
        """Wait up to `wait_s` (less if something new comes); whether a newer checkpoint replaces `upload`."""
        with self._cond:
            if upload.replaceable and any(u.replaceable for u in self.waiting):
                return True
            self._cond.wait(wait_s)
            return upload.replaceable and any(u.replaceable for u in self.waiting)

    def _send(self, upload: Upload, sent: set[str]) -> None:
        """Send what `upload` holds that is not in `sent` yet (the names an earlier try sent), adding to it."""
        if upload.checkpoint is None:
            for name, local in upload.files:
                self._once(sent, name, lambda: self.store.put_file(local, name))  # noqa: B023
            if upload.rank_files:  # this rank's part of the checkpoint is there
                self.confirmed = max(upload.step, self.confirmed or 0)
                self._check_behind()
            return
        local, remote = upload.checkpoint, self.store.checkpoint(upload.step)
        hashes = _complete(local)
        self._once(sent, "old marker", lambda: self.store.remove_marker(upload.step))  # of an earlier save
        for name in hashes:
            self._once(sent, name, lambda: self.store.put_file(local / name, f"{remote}/{name}"))  # noqa: B023
        others = self._files_elsewhere(upload)
        if others is None:
            return  # replaced while the other nodes' ranks were still uploading
        self._once(sent, COMPLETE, lambda: self.store.put_bytes(f"{remote}/{COMPLETE}",
                                                                json.dumps({**hashes, **others}).encode()))  # fmt: skip
        self.store.put_bytes(f"{CHECKPOINTS}/{LATEST}", f"{local.name}\n".encode())
        self.confirmed = max(upload.step, self.confirmed or 0)
        best_step = _best_step(local.parent.parent)
        if best_step is not None and best_step <= upload.step and best_step in self.store.complete_steps():
            self.store.put_file(local.parent / BEST, f"{CHECKPOINTS}/{BEST}")
            self.best_step = best_step
        self._rotate()
        self._check_behind()

    @staticmethod
    def _once(sent: set[str], name: str, action: Callable[[], object]) -> None:
        if name not in sent:
            action()
            sent.add(name)

    def _files_elsewhere(self, upload: Upload) -> dict[str, str] | None:
        """{rank file: sha256} of the ranks elsewhere, once each has uploaded its file of this attempt; None when a
        newer checkpoint replaces `upload` first."""
        remote, found, wait = self.store.checkpoint(upload.step), {}, RETRY_S
        while len(found) < len(self.elsewhere):
            for rank in self.elsewhere:
                name = rank_file(rank)
                record = self.store.read_small(f"{remote}/{record_name(name)}")
                fields = record.decode("ascii", "replace").split() if record else []
                if len(fields) == 2 and fields[1] == self.attempt and len(fields[0]) == 64:
                    found[name] = fields[0]
            if len(found) < len(self.elsewhere) and self._replaced(upload, wait):
                return None
            wait = min(2 * wait, MAX_RETRY_S)
        return found

    def _rotate(self) -> None:
        """Delete the store's checkpoints the run directory would not keep, and unfinished ones older than the
        newest complete one (uploads that a newer checkpoint replaced or a kill interrupted)."""
        steps, complete = self.store.steps(), self.store.complete_steps()
        if not complete:
            return
        newest = complete[-1]
        for step in steps:
            kept = step in complete[-self.keep :] or step == self.best_step
            kept |= bool(self.keep_every_steps) and step % self.keep_every_steps == 0 and step in complete
            if step > newest or kept:
                continue
            self.store.remove_checkpoint(step)


def _complete(checkpoint: Path) -> dict[str, str]:
    """A published checkpoint's COMPLETE record (our own file, read within bounds)."""
    try:
        hashes = read_json(checkpoint / COMPLETE, "checkpoint file")
    except BoundedReadError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{checkpoint / COMPLETE} is not a {{file: sha256}} record")
    return hashes


def _best_step(run_dir: Path) -> int | None:
    """The step of the run directory's best.json (format.read_best), None without one or with an unreadable one."""
    try:
        record = read_best(run_dir)
    except CheckpointError:
        return None
    return record["step"] if record is not None else None


def _name(step: int | None) -> str:
    return f"step_{step:08d}" if step is not None else "none yet"


def _discard(upload: Upload) -> None:
    """Delete a rank's own files once sent or replaced (and their directory, when the node's last rank empties it)."""
    if not upload.rank_files:
        return
    for _, local in upload.files:
        local.unlink(missing_ok=True)
    for directory in {local.parent for _, local in upload.files}:
        with contextlib.suppress(OSError):
            directory.rmdir()
