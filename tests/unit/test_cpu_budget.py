"""The CPU policy (shards.cpu_budget, trainer.runtime.cpu_threads): quotas read from fake cgroup v1/v2 files, the
share under affinity, quota, load, local ranks and OMP_NUM_THREADS, the load measured for real, the loader's
workers at one thread each, and the config's auto values."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from shards.cpu_budget import CpuBudget, busy_elsewhere, cgroup_quota, cpu_budget
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader, UnpairedShards
from trainer.runtime.cpu_threads import loader_workers, torch_threads


def fake_proc(tmp_path: Path, cgroup_lines: str) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup_lines)
    return tmp_path / "proc"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    root = tmp_path / "cg"
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(root / "kubepods/pod1/cpu.max", "150000 100000\n")
    write(root / "kubepods/cpu.max", "400000 100000\n")
    assert cgroup_quota(proc, root) == 1.5
    write(root / "kubepods/pod1/cpu.max", "max 100000\n")
    assert cgroup_quota(proc, root) == 4.0
    write(root / "kubepods/cpu.max", "max 100000\n")
    assert cgroup_quota(proc, root) is None


def test_cgroup_v1_quota_under_either_mount_name(tmp_path):
    proc = fake_proc(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(proc, root) == 0.5
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_quota(proc, root) is None
    proc = fake_proc(tmp_path / "other", "1:cpu:/\n")
    write(tmp_path / "other/cg/cpu/cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "other/cg/cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(proc, tmp_path / "other/cg") == 2.0


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_quota(tmp_path / "nothing", tmp_path / "cg") is None
    assert cgroup_quota(fake_proc(tmp_path, "0::/a/b\n"), tmp_path / "cg") is None
    assert cgroup_quota(fake_proc(tmp_path / "garbage", "0::/\nnot a cgroup line\n"), tmp_path / "cg") is None


@pytest.mark.parametrize(
    "affinity, quota, busy, ranks, limit, share",
    [
        (8, None, 0.0, 1, None, 8),
        (8, 2.5, 0.0, 1, None, 2),  # a quota of 2.5 CPUs: 2 threads that always run
        (8, None, 0.0, 4, None, 2),  # local ranks split the budget
        (4, None, 1.9, 1, None, 2),  # two busy processes elsewhere
        (4, None, 0.5, 1, None, 4),  # brief activity elsewhere is not a taken CPU
        (2, None, 2.0, 1, None, 1),
        (2, 0.5, 0.0, 4, None, 1),  # never below one thread
        (16, None, 0.0, 1, 3, 3),  # OMP_NUM_THREADS caps
    ],
)
def test_the_share(affinity, quota, busy, ranks, limit, share):
    budget = CpuBudget(cores=64, affinity=affinity, quota=quota, busy_elsewhere=busy, local_ranks=ranks,
                       thread_limit=limit)  # fmt: skip
    assert budget.per_process == share
    assert f"{affinity} in affinity" in budget.describe() and f"{ranks} local rank(s)" in budget.describe()


def fake_stat(proc: Path, cpu_user: list[int], pids: dict[int, int]) -> None:
    """/proc/stat with these user ticks per CPU (idle 10^6 each), and /proc/PID/stat with these utime ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{i} {user} 0 0 1000000 7 0 0 0 0 0" for i, user in enumerate(cpu_user)]
    write(proc / "stat", "\n".join(lines) + "\n")
    for pid, utime in pids.items():  # comm with spaces and parentheses, as a hostile process name may have
        write(proc / str(pid) / "stat", f"{pid} (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 1 0\n")


def test_busy_elsewhere_counts_other_processes_ticks_on_our_cpus_and_not_ours(tmp_path):
    """Fake /proc files rewritten during the window: exact, whatever else runs on this machine."""
    proc, tick = tmp_path / "proc", os.sysconf("SC_CLK_TCK")
    fake_stat(proc, [1000, 1000, 1000], {11: 50, 12: 0})
    window = 0.4  # CPUs 0 and 1 busy the whole window, CPU 2 (not ours) too; process 11 (ours) used 0.5 CPU
    busy = round(window * tick)
    rewrite = threading.Timer(0.1, fake_stat, (proc, [1000 + busy] * 3, {11: 50 + busy // 2, 12: 0}))
    rewrite.start()
    measured = busy_elsewhere({0, 1}, {11, 12, 99}, window_s=window, proc=proc)  # 99: ended meanwhile
    rewrite.join()
    assert measured == pytest.approx(1.5, abs=0.05)


def test_busy_elsewhere_reads_this_machine():
    cpus = set(os.sched_getaffinity(0))
    assert 0.0 <= busy_elsewhere(cpus, {os.getpid()}, window_s=0.1) <= len(cpus) + 0.5


def test_this_process_budget_follows_its_affinity():
    budget = cpu_budget(measure_load=False)
    assert budget.affinity == len(os.sched_getaffinity(0)) and budget.busy_elsewhere == 0.0
    assert 1 <= budget.per_process <= budget.affinity


def test_local_ranks_and_the_thread_cap_come_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS")
    budget = cpu_budget(measure_load=False)
    assert budget.local_ranks == 2 and budget.thread_limit is None
    assert budget.per_process == max(1, min(budget.affinity, int(budget.quota or budget.affinity)) // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_budget(measure_load=False).local_ranks == 1 and cpu_budget(measure_load=False).thread_limit == 3


def test_threads_and_workers_from_the_share():
    big = CpuBudget(cores=32, affinity=32, quota=None, busy_elsewhere=0.0, local_ranks=2)  # 16 each
    assert loader_workers("auto", on_cuda=False, budget=big) == 1
    assert torch_threads("auto", False, 1, big)[0] == 16
    assert loader_workers("auto", on_cuda=True, budget=big) == 8  # up to 8 workers feed a GPU
    assert torch_threads("auto", True, 8, big)[0] == 8
    small = CpuBudget(cores=16, affinity=16, quota=None, busy_elsewhere=0.0, local_ranks=8)  # 2 each
    assert loader_workers("auto", True, small) == 1 and torch_threads("auto", True, 1, small)[0] == 1
    busy = CpuBudget(cores=32, affinity=32, quota=None, busy_elsewhere=20.0, local_ranks=2)
    assert loader_workers("auto", True, busy) == 8  # the data order must not follow the load
    assert torch_threads(3, False, 1, big) == (3, "as configured") and loader_workers(0, True, big) == 0


def test_the_config_takes_auto_or_a_number():
    cfg = load_config(None, [])
    assert cfg.train.cpu_threads == "auto" and cfg.data.num_workers == "auto" and cfg.train.precision == "auto"
    assert load_config(None, ["train.cpu_threads=3", "data.num_workers=0"]).train.cpu_threads == 3
    with pytest.raises(ConfigError, match=r"^train.cpu_threads=0 is not allowed; expected auto or an integer >= 1$"):
        load_config(None, ["train.cpu_threads=0"])
    with pytest.raises(ConfigError, match=r"^data.num_workers='many' is not allowed; expected an integer or auto$"):
        load_config(None, ["data.num_workers=many"])


class ThreadCounts(UnpairedShards):
    """The loader's dataset, reporting the thread count of the process that makes each batch."""

    def __iter__(self):
        for batch in super().__iter__():
            batch["threads"] = torch.get_num_threads()
            batch["pid"] = os.getpid()
            yield batch


def test_loader_workers_run_one_thread_each(colour_shards, monkeypatch):
    monkeypatch.setattr("trainer.data.loader.UnpairedShards", ThreadCounts)
    torch.set_num_threads(2)
    loader = UnpairedLoader(DataConfig(root=str(colour_shards), load_size=32, crop_size=32, num_workers=2), 2, 0, 0, 1,
                            torch.device("cpu"))  # fmt: skip
    raw = loader._start()  # the DataLoader's own batches, before the loader keeps only the images
    batches = [next(raw) for _ in range(4)]
    assert {b["pid"] for b in batches} != {os.getpid()} and {b["threads"] for b in batches} == {1}
    assert UnpairedLoader(DataConfig(root=str(colour_shards)), 2, 0, 0, 1, torch.device("cpu")).cfg.num_workers == 1
