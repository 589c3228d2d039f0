"""The suite's prewarmed Python (tests/prewarm.py): a served run is the process the test asked for (argv, working
directory, environment, streams, exit status, a timeout that kills it), and what it cannot serve runs fresh."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.conftest import PREWARMED, kill_tree, run_bounded
from tests.prewarm import PrewarmedPython, Timeout, as_python, env_is_servable

PROBE = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("CYCLEGAN_PROBE"),
                  "stdin": sys.stdin.read(), "parent": os.getppid(), "session": os.getsid(0) == os.getpid(),
                  "torch": "torch" in sys.modules, "main": __name__}))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "code":
    sys.exit(3)
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise ValueError("boom")
if how == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
if how in ("sleep", "detach"):
    import time
    if how == "detach":  # its streams closed: only the status can say that it still runs
        os.close(1)
        os.close(2)
    time.sleep(60)
"""


@pytest.fixture
def probe(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import signal\n" + PROBE)
    return script


def served(script, how: str, cwd) -> tuple[object, dict]:
    """The probe run by the suite's server in its own environment (other tests may have left variables in this
    worker's environment that make run_bounded start a fresh process)."""
    import json

    argv = [sys.executable, str(script), how, "extra"]
    result = PREWARMED.run(argv, {**PREWARMED.env, "CYCLEGAN_PROBE": "yes"}, cwd, 60)
    return result, json.loads(result.stdout.splitlines()[0])


def test_a_served_run_is_the_process_asked_for(probe, tmp_path):
    result, seen = served(probe, "ok", tmp_path)
    assert result.returncode == 0 and result.stderr == "to stderr\n"
    assert seen["argv"] == [str(probe), "ok", "extra"] and seen["cwd"] == str(tmp_path) and seen["env"] == "yes"
    assert seen["stdin"] == "" and seen["session"] and seen["main"] == "__main__"
    assert seen["parent"] == PREWARMED.server.pid, "not served"
    assert seen["torch"]  # imported before it started


@pytest.mark.parametrize(
    ("how", "status", "stderr"),
    [("code", 3, ""), ("message", 1, "a message"), ("raise", 1, "ValueError: boom"), ("signal", -signal.SIGTERM, "")],
)
def test_exit_statuses_are_those_of_a_fresh_interpreter(probe, tmp_path, how, status, stderr):
    result, _ = served(probe, how, tmp_path)
    assert result.returncode == status and stderr in result.stderr


@pytest.mark.parametrize("how", ["sleep", "detach"])
def test_a_run_past_its_timeout_is_killed(probe, tmp_path, how):
    with pytest.raises(Timeout):
        PREWARMED.run([sys.executable, str(probe), how], PREWARMED.env, tmp_path, 2)


def test_a_client_gone_mid_request_leaves_the_server_serving(probe, tmp_path):
    import socket

    assert PREWARMED._ready()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(PREWARMED.path)
        conn.sendall(b"\x00\x00")  # half a header, then gone
    _, seen = served(probe, "ok", tmp_path)
    assert seen["parent"] == PREWARMED.server.pid


def test_what_cannot_be_served_runs_fresh(probe, tmp_path):
    import json

    fresh = run_bounded([sys.executable, str(probe), "ok"], env={"OMP_NUM_THREADS": "2"}, cwd=tmp_path)
    seen = json.loads(fresh.stdout.splitlines()[0])
    assert fresh.returncode == 0 and not seen["torch"] and seen["parent"] == os.getpid()
    assert as_python(["bash", "-c", "true"]) is None and as_python([sys.executable, "-c", "1"]) is None
    assert as_python(["accelerate", "launch", "x.py"])[:3] == [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
    ]
    assert env_is_servable(
        {"A": "1"}, {"A": "2", "WANDB_MODE": "offline", "MASTER_PORT": "1", "TORCH_FR_BUFFER_SIZE": "9"}
    )
    assert not env_is_servable({}, {"OMP_NUM_THREADS": "2"}) and not env_is_servable({"PYTHONPATH": "x"}, {})


def test_a_server_that_died_falls_back_to_fresh_processes(probe, tmp_path):
    client = PrewarmedPython(kill_tree, dict(os.environ))
    try:
        assert client._ready()
        client.server.kill()
        client.server.wait()
        assert client.run([sys.executable, str(probe), "ok"], dict(os.environ), tmp_path, 60) is None
    finally:
        client.stop()
