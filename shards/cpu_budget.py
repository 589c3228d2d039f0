"""The CPUs a process of this project may use: one policy for training ranks, loader workers, translate/evaluate
and the shards tools (standard library only; trainer.runtime.cpu_threads applies it to torch).

A process may use the CPUs of its affinity mask (taskset, Slurm's cgroup cpuset), capped by its cgroup's CPU quota
(v2 `cpu.max`, v1 `cpu.cfs_quota_us`: a Kubernetes CPU limit, `docker --cpus`), less the whole CPUs that other
processes keep busy when it starts; its local ranks share that, and OMP_NUM_THREADS caps it.

Why: torch's OpenMP threads wait for each other at the end of every parallel region, spinning. With more threads
than CPUs free for them (two threads beside two busy processes on 2 cores, or under a one-CPU quota that torch does
not see) each region waits for a descheduled peer: on 2 cores a demo step spent two thirds of its CPU time in
libgomp's spin loop (perf) and ran 4.5x slower than alone; one thread ran 1.5x slower. OMP_WAIT_POLICY=PASSIVE
halved the speed alone, so the thread count is the fix, not the wait policy.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_WINDOW_S = 0.25
"""How long the CPUs' use by other processes is measured at start-up."""
BUSY_FLOOR = 0.75
"""Other processes' use, in CPUs, from which a CPU counts as taken (brief activity during the window does not)."""


@dataclass(frozen=True)
class CpuBudget:
    """What a process may use, and what it was derived from (for the start line and the run's records)."""

    cores: int
    """CPUs of the machine (os.cpu_count)."""
    affinity: int
    """CPUs in this process's affinity mask."""
    quota: float | None
    """The cgroup's CPU quota in CPUs; None: no quota."""
    busy_elsewhere: float
    """CPUs (of the affinity mask) other processes used during the start-up window."""
    local_ranks: int
    """Processes of this launch on this node, sharing the budget."""
    thread_limit: int | None = None
    """OMP_NUM_THREADS where set (by the user or the launcher): a cap on the share."""

    @property
    def per_process(self) -> int:
        """This process's share of the CPUs: at least 1."""
        usable = min(self.affinity, math.floor(self.quota) if self.quota is not None else self.affinity)
        taken = math.floor(self.busy_elsewhere + 1 - BUSY_FLOOR)  # 0.75 -> 1, 1.74 -> 1, 1.75 -> 2
        share = max(1, max(1, usable - taken) // max(1, self.local_ranks))
        return share if self.thread_limit is None else max(1, min(share, self.thread_limit))

    def describe(self) -> str:
        quota = "no quota" if self.quota is None else f"quota {self.quota:g} CPUs"
        return (
            f"{self.cores} CPUs, {self.affinity} in affinity, {quota}, {self.busy_elsewhere:.1f} busy elsewhere, "
            f"{self.local_ranks} local rank(s)"
            + (f", OMP_NUM_THREADS={self.thread_limit}" if self.thread_limit else "")
        )


def cgroup_quota(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its parents, v2 or v1; None where none is set
    or nothing can be read."""
    quotas = []
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            quotas += _walk(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path", mounted under its controller names
            for mount in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (cgroup_root / mount).is_dir():
                    quotas += _walk(cgroup_root / mount, path, _v1_quota)
                    break
    return min(quotas, default=None)


def _walk(mount: Path, path: str, read) -> list[float]:
    """`read` of the cgroup directory at `path` and of each parent up to the mount (a container sees its own
    cgroup as the mount's root)."""
    found, parts = [], [part for part in path.strip("/").split("/") if part and part != ".."]
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(directory: Path) -> float | None:
    try:
        limit, period = (directory / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        limit = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period


def affinity() -> set[int]:
    """The CPUs this process may run on (all of them where the platform cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _busy_ticks(cpus: set[int], proc: Path) -> int:
    """Non-idle clock ticks of `cpus` since boot (/proc/stat's cpuN lines: all but idle and iowait)."""
    total = 0
    for line in (proc / "stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(field) for field in fields[:8]]
            total += sum(ticks) - ticks[3] - ticks[4]
    return total


def _process_ticks(pids: set[int], proc: Path) -> int:
    """User and system clock ticks of processes `pids` (those that have ended count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total


def siblings(proc: Path = Path("/proc")) -> set[int]:
    """This process and the other children of its parent (the launcher's other local ranks)."""
    parent, found = os.getppid(), {os.getpid()}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                found.add(int(entry.name))
    return found


def busy_elsewhere(
    cpus: set[int], ours: set[int], window_s: float = BUSY_WINDOW_S, proc: Path = Path("/proc")
) -> float:
    """CPUs' worth of `cpus` used by processes other than `ours` during `window_s` (0 where /proc cannot say)."""
    try:
        start_all, start_ours = _busy_ticks(cpus, proc), _process_ticks(ours, proc)
        time.sleep(window_s)
        used = (_busy_ticks(cpus, proc) - start_all) - (_process_ticks(ours, proc) - start_ours)
    except (OSError, ValueError):
        return 0.0
    return max(0.0, used / os.sysconf("SC_CLK_TCK") / window_s)


def thread_limit() -> int | None:
    """OMP_NUM_THREADS as a number (None where unset or not a positive integer)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def local_ranks() -> int:
    """Processes of this launch on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside a launch)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def cpu_budget(measure_load: bool = True) -> CpuBudget:
    """This process's budget now; `measure_load` False skips the start-up window (busy_elsewhere 0)."""
    cpus, ranks = affinity(), local_ranks()
    ours = siblings() if ranks > 1 else {os.getpid()}
    busy = busy_elsewhere(cpus, ours) if measure_load else 0.0
    return CpuBudget(os.cpu_count() or len(cpus), len(cpus), cgroup_quota(), busy, ranks, thread_limit())
