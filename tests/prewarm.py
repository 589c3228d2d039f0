"""A prewarmed Python for the suite's command-line runs: one server per pytest worker imports torch and the
project once, then forks a child for each `python SCRIPT ...`, `python -m MODULE ...` or `accelerate ...` that a
test runs through `tests.conftest.run_bounded`.

Most of the suite's CPU time went to start-up: every training, evaluation or translation process spends 2-3 s
importing torch, the project and torch._dynamo (which every optimizer imports on its first parameter group) before
doing a second of work, and an `accelerate launch` 2 s before it starts the ranks (which stay fresh processes). A
forked child skips that and is otherwise the process the test asked for: its own session, working directory,
environment, argv, stdin/stdout/stderr and exit status, run as `__main__` by runpy, ended like any interpreter.

A child gets the server's imports, so a run is served only when nothing read at start-up can differ:
`env_is_servable` refuses a difference in the variables Python, OpenMP, MKL, the loader and torch's compiler
configs read when they start (what tests and libraries leave in a worker's environment otherwise, such as
MASTER_PORT, TORCH_FR_BUFFER_SIZE or W&B's variables, is read when used); a refused run, or one while no server
runs, is a fresh process, as is every run under CYCLEGAN_TEST_FRESH_PROCESSES=1. Tests that need a fresh
interpreter (signals during imports, peak memory, a process they signal or inspect while it runs) start their own
processes.

Protocol, one Unix-socket connection per run: the client sends a 4-byte length, a JSON request {argv, env, cwd} and
three file descriptors (stdin, stdout, stderr); the server answers one line with the child's pid, then, when the
child ended, one line with its wait status.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
IMPORT_TIME_PREFIXES = (  # read while the interpreter, torch and its libraries start (threads, allocators, configs)
    "PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_", "CUDA_", "PYTORCH_",
    "TORCHDYNAMO_", "TORCHINDUCTOR_", "TORCH_COMPILE_", "TORCH_LOGS",
)  # fmt: skip
REAP_EVERY_S = 0.05


def env_is_servable(ours: dict[str, str], theirs: dict[str, str]) -> bool:
    """Whether `theirs` differs from the server's environment `ours` only in variables read when used: not in
    those read at start-up (IMPORT_TIME_PREFIXES; PYTHONUNBUFFERED is applied to the child's streams anyway)."""
    keys = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)} - {"PYTHONUNBUFFERED"}
    return not any(key.startswith(IMPORT_TIME_PREFIXES) for key in keys)


def as_python(argv: list[str]) -> list[str] | None:
    """argv as the `python ...` command the server can run, or None: `python SCRIPT ...` with a script of this
    repository, `python -m trainer.X|shards.X|benchmarks.X`, or `accelerate ...` (its command-line module; the
    launcher is served, the ranks it starts are fresh processes)."""
    if argv[:1] == ["accelerate"]:
        return [sys.executable, "-m", "accelerate.commands.accelerate_cli", *argv[1:]]
    if len(argv) < 2 or argv[0] != sys.executable:
        return None
    if argv[1] == "-m":
        return argv if len(argv) > 2 and argv[2].split(".")[0] in ("trainer", "shards", "benchmarks") else None
    return argv if argv[1].endswith(".py") else None


def preload() -> None:
    """What every served run would import first: torch, the project's entry points and torch._dynamo."""
    import accelerate.commands.accelerate_cli  # noqa: F401
    import torch

    import trainer.evaluate  # noqa: F401
    import trainer.train  # noqa: F401
    import trainer.translate  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo, as every optimizer does


def serve(path: str) -> None:
    """Accept runs on the Unix socket `path` until the parent (the pytest worker) is gone."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}.binding")
    listener.listen(16)
    os.rename(f"{path}.binding", path)  # the path appears when the server listens
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], REAP_EVERY_S)
        if ready:
            conn, _ = listener.accept()
            received = _receive(conn)
            if received is not None:
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in (conn, *children.values()):
                        other.close()
                    _run_child(*received)
                for fd in received[1]:
                    os.close(fd)
                with contextlib.suppress(OSError):  # a client gone by now learns nothing; the child is reaped
                    conn.sendall(f"{pid}\n".encode())
                children[pid] = conn
        _reap(children)


def _receive(conn: socket.socket) -> tuple[dict, list[int]] | None:
    """The request and the three descriptors sent on `conn`, or None (then `conn` is closed): a client that went
    away mid-request, or threads in this process (a fork of a threaded process may inherit a held lock)."""
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, 4, 3)
        (length,) = struct.unpack("!I", header)
        body = b""
        while len(body) < length and (data := conn.recv(length - len(body))):
            body += data
        if len(body) == length and len(fds) == 3 and len(os.listdir("/proc/self/task")) == 1:
            return json.loads(body), fds
        conn.sendall(b"refused\n")
    except (OSError, ValueError, struct.error):
        pass
    for fd in fds:
        os.close(fd)
    conn.close()
    return None


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = children.pop(pid)
        try:
            conn.sendall(f"{status}\n".encode())
        except OSError:  # the client gave up
            pass
        conn.close()


def _run_child(request: dict, fds: list[int]) -> NoReturn:
    """In the forked child: become the requested process and run it. It never returns: its SystemExit (or any
    exception) goes up through `serve` and ends the interpreter the way it ends a fresh one (threads joined,
    atexit handlers, finalization)."""
    os.setsid()
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's stdout until it exits)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    argv = request["argv"][1:]
    if argv[0] == "-m":
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        sys.modules.pop(argv[1], None)  # as in a fresh `python -m`: the module runs as __main__ only
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = argv, str(Path(argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)  # the end of the script: SystemExit or an exception, like any other, ends the interpreter as usual


class PrewarmedPython:
    """The client: starts the server on first use (in `env`) and runs commands through it."""

    def __init__(self, kill_tree: Callable[[int], None], env: dict[str, str]) -> None:
        self.kill_tree = kill_tree  # kills a process and its descendants
        self.env = env  # the server's environment: the worker's own, not one a test patched when it started
        self.server: subprocess.Popen | None = None
        self.path = ""

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> CompletedProcess | None:
        """Run argv like subprocess with a timeout (then the child and its descendants are killed: Timeout);
        None when it cannot be served (see the module docstring), for the caller to start a fresh process."""
        if (
            os.environ.get("CYCLEGAN_TEST_FRESH_PROCESSES")
            or (python := as_python(argv)) is None
            or not self._ready()
            or not env_is_servable(self.env, env)
        ):
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
        except OSError:
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with open(os.devnull, "rb") as stdin, conn:
            body = json.dumps({"argv": python, "env": env, "cwd": str(cwd)}).encode()
            socket.send_fds(conn, [struct.pack("!I", len(body))], [stdin.fileno(), out_w, err_w])
            conn.sendall(body)
            os.close(out_w)
            os.close(err_w)
            pid = _read_line(conn)
            if not pid.isdigit():  # refused, or the server is gone
                os.close(out_r)
                os.close(err_r)
                return None
            deadline = time.monotonic() + timeout_s
            pipes = {out_r: bytearray(), err_r: bytearray()}
            timed_out = not _read_until_closed(pipes, deadline)
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            try:  # the status comes when the child ended: it may have closed its streams and go on
                status = None if timed_out else _read_line(conn)
            except TimeoutError:
                status, timed_out = None, True
            if timed_out:
                self.kill_tree(int(pid))
                _read_until_closed(pipes, time.monotonic() + 5)
                conn.settimeout(60)
                status = _read_line(conn)
            for fd in pipes:
                os.close(fd)
            out, err = (pipes[fd].decode(errors="replace") for fd in (out_r, err_r))
        if timed_out:
            raise Timeout(err)
        return CompletedProcess(argv, os.waitstatus_to_exitcode(int(status)), out, err)

    def _ready(self) -> bool:
        """Start the server if it is not running; whether it accepts runs (its imports take a few seconds)."""
        if self.server is None:
            self.path = tempfile.mktemp(prefix="prewarm-", suffix=".sock")  # noqa: S306 (bound by the server)
            self.server = subprocess.Popen([sys.executable, "-m", "tests.prewarm", self.path], cwd=REPO, env=self.env)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path) and self.server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.server.poll() is None and os.path.exists(self.path)

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.server = None


class Timeout(Exception):
    """A served run outlived its timeout and was killed; carries the stderr it wrote."""


def _read_line(conn: socket.socket) -> str:
    """One line from `conn` without its newline ("" when the peer closed first), under the socket's timeout."""
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            break
        line += data
    return line.decode().strip()


def _read_until_closed(pipes: dict[int, bytearray], deadline: float) -> bool:
    """Append what is written to each pipe until every writer closed it (True) or the deadline passed (False)."""
    open_fds = [fd for fd in pipes]
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if data:
                pipes[fd] += data
            else:
                open_fds.remove(fd)
    return True


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the pytest terminal is the worker's to handle
    preload()
    serve(sys.argv[1])
