"""The shape of the code base: packages import one way (import-linter's contracts in .importlinter), trainer/ keeps
a short top level, no module or function grows past its bound, and every model family has the `Family`
interface with its signatures."""

import ast
import inspect
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from trainer.algorithms import cut, cyclegan
from trainer.algorithms.family import Family, family

# One worker for the tests that read the source tree: test_layout writes a probe module into trainer/config/ for a
# moment, which lint-imports and ruff in a parallel worker would see (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("source-tree")


MAX_TOP_LEVEL_MODULES = 8
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
PACKAGES = ("trainer", "shards")


def test_the_import_contracts_hold():
    contracts = (REPO / ".importlinter").read_text().count("[importlinter:contract:")
    assert contracts >= 3
    result = subprocess.run([shutil.which("lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Contracts: {contracts} kept, 0 broken." in result.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The contracts can fail: a config module importing the engine breaks the layers."""
    settings = (REPO / ".importlinter").read_text()
    probe = REPO / "trainer" / "config" / "_layer_probe.py"
    probe.write_text("import trainer.runtime.engine\n")
    try:
        config = tmp_path / "contracts.ini"
        config.write_text(settings)
        cmd = [shutil.which("lint-imports"), "--config", str(config), "--no-cache"]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "trainer.config._layer_probe -> trainer.runtime.engine" in result.stdout


def test_trainer_has_a_short_top_level():
    modules = sorted(p.name for p in (REPO / "trainer").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def source_files() -> list:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_no_module_or_function_is_too_long():
    too_long = []
    for path in source_files():
        text = path.read_text()
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - start + 1} lines")
    assert not too_long, too_long


def family_functions() -> list[str]:
    return [name for name, _ in inspect.getmembers(Family, inspect.isfunction) if not name.startswith("_")]


@pytest.mark.parametrize("module", [cyclegan, cut], ids=["cyclegan", "cut"])
def test_each_family_has_the_interface_with_its_signatures(module):
    assert family_functions() == ["build_units", "discriminator_step", "generator_step"]
    for name in family_functions():
        wanted = inspect.signature(getattr(Family, name)).parameters
        have = inspect.signature(getattr(module, name)).parameters
        assert list(have) == list(wanted)[1:], name  # without self
        assert [p.default for p in have.values()] == [p.default for p in list(wanted.values())[1:]], name


def test_the_family_of_each_model_family():
    assert family("cyclegan") is cyclegan
    assert family("cut") is cut and family("fastcut") is cut
