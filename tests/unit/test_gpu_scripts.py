"""The offline install scripts of the GPU machines (benchmarks/gpu_wheels.sh here, benchmarks/gpu_install.sh there)
pass shellcheck, refuse bad input with a one-line reason before doing anything, and plan no download of a package
that the image already has (tests/integration/test_gpu_install.py runs the whole path)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO, run_bounded

SCRIPTS = ["benchmarks/gpu_wheels.sh", "benchmarks/gpu_install.sh"]
IMAGE_LIST = REPO / "benchmarks" / "gpu_image_packages.txt"


def image_packages() -> list[str]:
    return [line for line in IMAGE_LIST.read_text().splitlines() if line and not line.startswith("#")]


def test_gpu_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_image_list_holds_one_normalized_name_per_line():
    names = image_packages()
    assert len(names) == len(set(names)) > 150
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) for name in names), "PEP 503 names, one a line"
    assert {"torch", "accelerate", "transformers", "numpy", "protobuf", "pip", "setuptools"} <= set(names)


def test_download_list_names_no_package_of_the_image():
    # Resolves against PyPI (metadata only) for the image's Python; downloads nothing.
    result = run_bounded(["bash", "benchmarks/gpu_wheels.sh", "--list", "3.12"], timeout_s=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^ =]+( \(sdist\))?", line) for line in lines), lines
    names = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines}
    assert {"webdataset", "braceexpand", "wandb", "pydantic", "pydantic-core", "deepspeed", "hjson"} <= names
    assert not names & set(image_packages())
    (sdist,) = [line for line in lines if line.endswith(" (sdist)")]
    assert sdist.startswith("deepspeed==")


def one_line_refusal(cmd: list[str], code: int, message: str) -> None:
    result = run_bounded(cmd, timeout_s=60)
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == message


def test_gpu_wheels_refuses_bad_arguments(tmp_path):
    one_line_refusal(["bash", "benchmarks/gpu_wheels.sh"], 2,
                     "usage: bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]   or   "
                     "bash benchmarks/gpu_wheels.sh --list [PYTHON_VERSION]")  # fmt: skip
    one_line_refusal(["bash", "benchmarks/gpu_wheels.sh", str(tmp_path), "3"], 2,
                     "gpu_wheels: PYTHON_VERSION=3 must look like 3.12 or 3.12.3")  # fmt: skip
    (tmp_path / "notes.txt").write_text("mine\n")
    one_line_refusal(["bash", "benchmarks/gpu_wheels.sh", str(tmp_path)], 1,
                     f"gpu_wheels: DIR={tmp_path} holds more than an earlier download ({tmp_path}/notes.txt); "
                     "name an empty or new folder")  # fmt: skip


def test_gpu_install_refuses_a_missing_or_mismatched_download(tmp_path):
    one_line_refusal(["bash", "benchmarks/gpu_install.sh", str(tmp_path)], 1,
                     f"gpu_install: {tmp_path}/requirements.txt does not exist; make DIR here with: "
                     f"bash benchmarks/gpu_wheels.sh {tmp_path}")  # fmt: skip
    (tmp_path / "requirements.txt").write_text("# python-version: 3.2\nwandb==0.31.0\n")
    result = run_bounded(["bash", "benchmarks/gpu_install.sh", str(tmp_path)], timeout_s=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"gpu_install: {tmp_path} holds wheels for Python 3.2 but python3 is Python 3.")
    assert f"make it with: bash benchmarks/gpu_wheels.sh {tmp_path} 3." in result.stderr
