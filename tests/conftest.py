"""Shared fixtures: tiny synthetic shard sets built once per session in a temporary directory; how the suite
shares the machine between its parallel workers (pytest-xdist, pytest.ini)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shards.synthetic import write_synthetic
from tests.prewarm import PrewarmedPython, Timeout

REPO = Path(__file__).resolve().parent.parent

# The suite runs tests in parallel (pytest.ini: -n auto), most of them starting training processes. One thread per
# process: the CPU policy honours OMP_NUM_THREADS as a cap, so no process spins on threads its neighbours' work
# deschedules, and thread counts - which set the low bits of a CPU run that a test may compare with another run -
# never depend on what runs beside a test.
os.environ["OMP_NUM_THREADS"] = "1"
BASE_ENV = dict(os.environ)


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that share something run one after another in one worker (--dist loadgroup): the cluster tests share
    one local Slurm and the two namespace nodes; the tests of a module with a module-scoped fixture (most are
    training runs) share it, where two workers would each build it."""
    for item in items:
        if "tests/cluster/" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("cluster"))
        elif any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """The colour task at 32 px: 96 unpaired training images per domain in shards of 40, 16 test pairs."""
    root = tmp_path_factory.mktemp("colour")
    write_synthetic(root, "colour", size=32, train=96, test=16, seed=3, maxcount=40)
    return root


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(condition, timeout_s: float = 60) -> bool:
    """Whether `condition()` becomes true within `timeout_s` (polled every 50 ms)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """The endpoint URL of a moto S3 server on loopback (the server object as `.server`), with test credentials in
    the environment; each test makes its own bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in S3_CREDENTIALS.items():
            env.setenv(key, value)
        yield S3Server(f"http://127.0.0.1:{port}", server)
    server.stop()


class S3Server:
    """A running moto server: its endpoint and a way to make a bucket."""

    def __init__(self, endpoint: str, server) -> None:
        self.endpoint, self.server = endpoint, server

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        """A new bucket `name` (moto's buckets are shared by every server in the process: names must differ between
        test modules too); returns s3://name."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts each rank in a session of its own, so killing
    the launcher's process group would leave the ranks running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


# Serves run_bounded's `python SCRIPT`, `python -m MODULE` and `accelerate` commands without their start-up imports.
RUN_ENV = {"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}  # added to the environment of every run_bounded command
PREWARMED = PrewarmedPython(kill_tree, {**BASE_ENV, **RUN_ENV})


def pytest_unconfigure(config: pytest.Config) -> None:
    PREWARMED.stop()


def run_bounded(
    cmd: list[str], timeout_s: int = 300, env: dict | None = None, cwd: Path = REPO, inherit_env: bool = True
):
    """Run `cmd` (from the repo root unless `cwd`; through PREWARMED where it can serve it); on timeout kill it with
    all its descendants (a hung collective must fail one test, not the suite). `env` adds to this process's
    environment, or with inherit_env=False is the whole environment. Returns the CompletedProcess."""
    import os
    import subprocess

    base = {**os.environ, **RUN_ENV} if inherit_env else {}
    full_env = {**base, **(env or {})}
    try:
        served = PREWARMED.run(cmd, full_env, cwd, timeout_s)
    except Timeout as err:
        raise _did_not_finish(cmd, timeout_s, str(err)) from None
    if served is not None:
        return served
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise _did_not_finish(cmd, timeout_s, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _did_not_finish(cmd: list[str], timeout_s: int, stderr: str) -> AssertionError:
    return AssertionError(f"{' '.join(cmd)} did not finish in {timeout_s} s; stderr tail:\n{stderr[-3000:]}")


def accelerate_launch(launch_config: str, num_processes: int) -> list[str]:
    """The `accelerate launch` prefix for one of launch/*.yaml on a fresh port."""
    return [
        "accelerate",
        "launch",
        "--config_file",
        f"launch/{launch_config}.yaml",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
    ]


def train_command(
    data: Path | str, run_dir: Path, *overrides: str, config: str = "demo-cpu", launcher: list[str] | None = None
) -> list[str]:
    """The training CLI on `data` into `run_dir` with configs/<config>.yaml and the overrides (plain python unless
    a launcher prefix is given)."""
    import sys

    return (launcher or [sys.executable]) + [
        "trainer/main.py", "--config", f"configs/{config}.yaml", f"data.root={data}", f"train.run_dir={run_dir}",
        *overrides,
    ]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evaluate_cli(weights: Path, data: Path, images: int, *flags: str, launcher: list[str] | None = None):
    """`python -m trainer.evaluate` on weights (export or run directory) and a shard directory, bounded. Returns
    (CompletedProcess, the metrics of its --json file or None)."""
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        cmd = (launcher or [sys.executable]) + [
            "-m", "trainer.evaluate", "--weights", str(weights), "--data", str(data), "--images", str(images),
            "--json", str(out), *flags,
        ]  # fmt: skip
        result = run_bounded(cmd, timeout_s=300)
        return result, (json.loads(out.read_text()) if out.is_file() else None)


def untrained_export(cfg, out: Path) -> Path:
    """Freshly initialized generators of `cfg` (a Config), exported to `out` like a training run's export."""
    import torch

    from trainer.checkpoint.export import save_generators
    from trainer.models import build_generator

    torch.manual_seed(cfg.train.seed)
    weights = {f"{n}.{k}": v for n in ("g_xy", "g_yx") for k, v in build_generator(cfg.model).state_dict().items()}
    save_generators(out, weights, cfg.model, cfg.data)
    return out


def write_tiny_inception(path: Path) -> Path:
    """A TorchScript stand-in for inception-2015-12-05.pt (uint8 images in, 16 features out): exercises the FID/KID
    plumbing without the real weights, which the project never downloads."""
    import torch
    import torch.nn as nn

    class TinyInception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 16, 4, stride=4)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(img.float() / 255.0, size=(16, 16), mode="bilinear")
            return torch.tanh(self.proj(x)).mean(dim=(2, 3)) * 3

    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(path))
    return path


def rewrite_listed(directory: Path, name: str, data: bytes) -> None:
    """Replace one file of an export or checkpoint together with its sha256 in COMPLETE: a copy made elsewhere that
    is consistent, and possibly hostile."""
    import hashlib
    import json

    (directory / name).write_bytes(data)
    hashes = json.loads((directory / "COMPLETE").read_text())
    hashes[name] = hashlib.sha256(data).hexdigest()
    (directory / "COMPLETE").write_text(json.dumps(hashes))
