"""train.cpu_threads=auto and data.num_workers=auto: this process's share of the CPUs (shards.cpu_budget) as torch
threads and loader workers.

On a CPU the share goes to torch's threads, with one loader worker (decoding a batch costs little beside its
training step). On a GPU the rank's threads only feed the device, so its share goes to loader workers first (up to
8), and the rest to torch. Workers come from the affinity, quota and local ranks only, never from the load at
start-up: they decide the data order, which must not change between two runs of one command on one machine.
Threads do follow the load, and a CPU run's low bits follow its thread count: pin train.cpu_threads for runs that
must match bit for bit across loads and machines.
"""

from __future__ import annotations

import dataclasses

import torch

from shards.cpu_budget import CpuBudget, cpu_budget

MAX_AUTO_WORKERS = 8


def loader_workers(requested: int | str, on_cuda: bool, budget: CpuBudget | None = None) -> int:
    """data.num_workers resolved: `requested` if a number, else from the budget's load-free share."""
    if requested != "auto":
        return int(requested)
    if not on_cuda:
        return 1
    share = dataclasses.replace(budget or cpu_budget(measure_load=False), busy_elsewhere=0.0).per_process
    return min(MAX_AUTO_WORKERS, max(1, share - 1))


def torch_threads(requested: int | str, on_cuda: bool, workers: int, budget: CpuBudget) -> tuple[int, str]:
    """(train.cpu_threads resolved, why): `requested` if a number, else the budget's share, less the loader
    workers' on a GPU."""
    if requested != "auto":
        return int(requested), "as configured"
    share = budget.per_process
    threads = max(1, share - workers) if on_cuda else share
    return threads, f"auto: {budget.describe()}"


def apply_threads(threads: int) -> None:
    """Run this process's torch operators on `threads` threads (its loader workers take one each: torch sets it)."""
    torch.set_num_threads(threads)
