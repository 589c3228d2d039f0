"""The code base passes ruff's checks and is ruff-formatted (settings in ruff.toml); the shell scripts pass
shellcheck at warning level."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

PATHS = ["trainer", "shards", "tests", "benchmarks"]
SHELL_SCRIPTS = [*sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").rglob("*.sh")),
                 *sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").rglob("*.sbatch")), ".ci/run"]  # fmt: skip

# One worker for the tests that read the source tree: test_layout writes a probe module into trainer/config/ for a
# moment, which lint-imports and ruff in a parallel worker would see (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("source-tree")


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_code_is_ruff_formatted():
    cmd = [sys.executable, "-m", "ruff", "format", "--check", *PATHS]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_shell_scripts_pass_shellcheck():
    assert len(SHELL_SCRIPTS) >= 6
    result = subprocess.run(
        ["shellcheck", "--severity=warning", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
