"""Run a benchmark step as its own process group and, on timeout, kill the whole group: the step together with its
children (compile workers, launcher ranks), which killing the step alone would leave running; and the launcher
prefix of a training step. Standard library only: gpu_check.py imports it before anything is installed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys


def run_group(cmd: list[str], timeout_s: float, **popen_kwargs) -> tuple[int | None, str | None, str | None]:
    """Run `cmd` in a new session with Popen's `popen_kwargs` (cwd, env, stdout, stderr, text, ...).

    Returns:
        (its exit status, or None when it ran past `timeout_s` and was killed; its captured stdout and stderr, or
        None where they were not piped).
    """
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, None, None
    except BaseException:  # Ctrl-C: the group is in a session of its own and would not get the SIGINT
        _kill_group(proc)
        raise
    return proc.returncode, stdout, stderr


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended just before
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(launch_config: str | None, nproc: int) -> list[str]:
    """The command prefix of a training step: this interpreter, or `accelerate launch` with launch/LAUNCH.yaml on
    nproc processes and a fresh port."""
    if launch_config is None:
        return [sys.executable]
    return ["accelerate", "launch", "--config_file", f"launch/{launch_config}.yaml", "--num_processes", str(nproc),
            "--main_process_port", str(free_port())]  # fmt: skip
