"""Which ranks see the main rank's run directory. On a cluster with a shared filesystem every rank does; on one
whose nodes have only local disks the ranks of the other nodes each see a directory of their own node under the
same path. Found at start by a probe: the main rank writes RUN/.probe-ATTEMPT, every rank looks for it, one gather
collects the answers. Without checkpoint.remote such ranks could not save a checkpoint (their files would never
reach the main rank's directory), so the run is refused at start; with it, each of them uploads its own files to
the store, and the main rank completes the checkpoint there (trainer.checkpoint.upload)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import torch

from trainer.config.checks import ConfigError
from trainer.runtime.engine import Engine
from trainer.runtime.run_files import write_file


@dataclasses.dataclass(frozen=True)
class RunDirSharing:
    """The probe's answer."""

    attempt: str
    """This launch's id (hex, from the main rank): names the probe, and marks each rank's uploads in the store so
    that files of an earlier attempt are never taken for this one's."""
    sharing: tuple[bool, ...]
    """Per rank: whether it sees the main rank's run directory."""

    @property
    def elsewhere(self) -> list[int]:
        """The ranks with a run directory of their own (on another node's local disk)."""
        return [rank for rank, shares in enumerate(self.sharing) if not shares]

    @property
    def here(self) -> tuple[int, ...]:
        """The ranks whose checkpoint files land in the main rank's run directory."""
        return tuple(rank for rank, shares in enumerate(self.sharing) if shares)


def probe_run_dir(engine: Engine, run_dir: Path, remote: str) -> RunDirSharing:
    """Which ranks see the main rank's `run_dir` (collectives on several ranks).

    Raises:
        ConfigError: (on every rank) some ranks do not see it and checkpoint.remote (`remote`) is not set.
    """
    attempt = secrets.token_hex(8)
    if engine.world_size == 1:
        return RunDirSharing(attempt, (True,))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    probe = Path(run_dir) / f".probe-{attempt}"
    if engine.is_main:
        write_file(probe, attempt)
    attempt = engine.broadcast_json(attempt)  # after the main rank wrote it
    probe = Path(run_dir) / f".probe-{attempt}"
    seen = engine.gather_scalars({"sees_run_dir": torch.tensor(float(probe.is_file()))})["sees_run_dir"]
    if engine.is_main:
        probe.unlink(missing_ok=True)
    sharing = RunDirSharing(attempt, tuple(value > 0 for value in seen))
    if sharing.elsewhere and not remote:
        raise ConfigError(
            f"ranks {', '.join(map(str, sharing.elsewhere))} do not see the main rank's train.run_dir={run_dir} (a "
            "directory on each node's own disk): set checkpoint.remote to an object store (s3://, gs://), or put "
            "the run directory on a filesystem every node shares"
        )
    return sharing
