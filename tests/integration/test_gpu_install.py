"""The offline install path of the GPU machines, end to end on this machine: benchmarks/gpu_wheels.sh downloads
(from PyPI, for this interpreter's Python version) what the project needs beyond the GPU image, then
benchmarks/gpu_install.sh installs it with --no-index into a stand-in for the image; the project then imports and
trains two steps with W&B offline, and a second install is quick. Before that, the same download goes through the
script's target mode (GPU_INSTALL_TARGET=1, for an image whose site-packages is read-only) into a folder under the
test's tmp_path (GPU_SITE, so that the checkout gets no .gpu-site/): nothing is installed into the venv, and the
packages import, and the project trains, only with the PYTHONPATH that the script names.

The stand-in for the image is a fresh venv (no system site-packages) whose only extra entry on sys.path is a
folder of symbolic links to the files of those of the image's distributions (benchmarks/gpu_image_packages.txt)
that this interpreter has installed: their packages, modules and .dist-info folders, and nothing of any other
distribution (a namespace folder shared with one, such as google/, is linked file by file). pip in the venv
therefore sees the image's set as installed, as it would there, so the test proves that the download holds
everything the image lacks and that the install needs no index. Installing the image's packages from PyPI instead
would take minutes (torch alone is hundreds of MiB) and still not be the image. The linked folder lies outside
the venv, so pip treats it as outside the environment and never removes or changes what it points to.

Where this machine's version of an image package needs a distribution that the image list lacks (its
huggingface_hub needs httpx2, say, where the image's older one uses httpx), that distribution is linked too, as a
stand-in for the image's own version; a stand-in the download carries is not linked, so the install must bring
it. The venv has none of the image's packages that this machine lacks (JAX, CUDA's libraries, `wheel`, ...); the
project needs none of them. pip runs with no configuration files and no PIP_* variables, as there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO, run_bounded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE_LIST = REPO / "benchmarks" / "gpu_image_packages.txt"


def norm(name: str) -> str:
    """A distribution name in PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    return {norm(line) for line in IMAGE_LIST.read_text().split() if line and not line.startswith("#")}


def link_image_distributions(view: Path, carried: set[str]) -> tuple[set[str], set[str]]:
    """Fill `view` with symbolic links to the files of the image's distributions installed here, and of the
    distributions that this machine's (newer) versions of them need beyond the image, except the carried ones.
    A top-level entry that belongs to one distribution is linked whole, one shared with others (a namespace folder,
    a __pycache__) file by file. Returns the names linked: the image's, then the stand-ins."""
    image = image_packages()
    dists = {}
    for dist in metadata.distributions():  # the first of a name on sys.path is the one imports see
        dists.setdefault(norm(dist.metadata["Name"]), dist)
    linked = {name for name in dists if name in image and dists[name].files}
    stand_ins, todo = set(), list(linked)
    while todo:  # the installed dependencies of what is linked, with this interpreter's markers
        for req in map(Requirement, dists[todo.pop()].requires or []):
            name = norm(req.name)
            if name in dists and name not in linked | stand_ins | carried and (not req.marker or req.marker.evaluate()):
                stand_ins.add(name)
                todo.append(name)
    owners = defaultdict(set)  # (site folder, top-level entry) -> distributions with files in it
    for name, dist in dists.items():
        for file in dist.files or []:
            if file.parts[0] != "..":  # scripts in bin/
                owners[(dist.locate_file(""), file.parts[0])].add(name)
    for name in linked | stand_ins:
        dist = dists[name]
        site = Path(dist.locate_file(""))
        for file in dist.files or []:
            if file.parts[0] == "..":
                continue
            whole = len(owners[(dist.locate_file(""), file.parts[0])]) == 1
            rel = Path(file.parts[0]) if whole else Path(*file.parts)
            if (view / rel).is_symlink() or not (site / rel).exists():
                continue
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            (view / rel).symlink_to(site / rel)
    return linked, stand_ins


def make_image_venv(root: Path, carried: set[str]) -> tuple[Path, set[str], set[str]]:
    """A fresh venv at root/venv that sees only the image's distributions (linked in root/image) and their
    stand-ins; returns its bin folder and the names linked (the image's, the stand-ins)."""
    venv, view = root / "venv", root / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    linked, stand_ins = link_image_distributions(view, carried)
    (site,) = venv.glob("lib/python*/site-packages")
    # addsitedir, not a plain path line, so that the image's own .pth files (setuptools') take effect too.
    (site / "gpu_image.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return venv / "bin", linked, stand_ins


def run(cmd: list[str], env: dict[str, str], timeout_s: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run cmd from the repo root (or cwd) with exactly `env`, bounded like every test command."""
    return run_bounded(cmd, timeout_s, env=env, cwd=cwd, inherit_env=False)


def train_two_steps(run_dir: Path, shards: Path, env: dict[str, str]) -> None:
    """The demo config for 2 steps with W&B offline, in `env`: it must train and write its metrics and W&B run."""
    train = run(["python", "trainer/main.py", "--config", "configs/demo-cpu.yaml", "train.steps=2",
                 f"train.run_dir={run_dir}", "logging.wandb=offline", f"data.root={shards}"], env)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "wandb").glob("offline-run-*"))


def installed(bin_dir: Path, env: dict[str, str]) -> set[str]:
    result = run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json"], env, timeout_s=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {norm(d["name"]) for d in json.loads(result.stdout)}


def downloaded(wheels: Path) -> set[str]:
    """The distribution names of the wheels and sdists in `wheels`."""
    return {norm(f.name.split("-")[0] if f.suffix == ".whl" else f.name.removesuffix(".tar.gz").rsplit("-", 1)[0])
            for f in wheels.iterdir() if f.name != "requirements.txt"}  # fmt: skip


def test_offline_install_into_an_emulated_image(tmp_path, colour_shards):
    version = "%d.%d" % sys.version_info[:2]
    wheels = tmp_path / "wheels"
    result = run(["bash", "benchmarks/gpu_wheels.sh", str(wheels), version], dict(os.environ), timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    carried = downloaded(wheels)
    assert {"webdataset", "wandb", "deepspeed", "pydantic"} <= carried
    assert not carried & image_packages()
    assert len(list(wheels.glob("deepspeed-*.tar.gz"))) == 1
    assert f"# python-version: {version}" in (wheels / "requirements.txt").read_text()

    bin_dir, linked, stand_ins = make_image_venv(tmp_path, carried)
    assert {"torch", "accelerate", "transformers", "pip", "setuptools"} <= linked and not stand_ins & image_packages()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PIP_CONFIG_FILE=os.devnull, WANDB_SILENT="true",
               HOME=str(tmp_path))  # fmt: skip
    before = installed(bin_dir, env)
    assert before == linked | stand_ins

    # Target mode first: into GPU_SITE, nothing into the venv, the project used from the checkout.
    site, site_in_repo = tmp_path / "gpu-site", (REPO / ".gpu-site").exists()
    target_env = {**env, "GPU_INSTALL_TARGET": "1", "GPU_SITE": str(site)}
    target = run(["bash", "benchmarks/gpu_install.sh", str(wheels)], target_env, timeout_s=400)
    assert target.returncode == 0, target.stdout[-2000:] + target.stderr[-3000:]
    ready, exported = target.stdout.splitlines()
    assert ready.startswith("gpu_install: ready: webdataset ") and "cyclegan-dist 0.1.0" in ready
    pythonpath = f"{site}{os.pathsep}{REPO}"
    assert exported.startswith(f"gpu_install: PYTHONPATH={pythonpath} ") and "export" in exported
    assert installed(bin_dir, env) == before
    assert (REPO / ".gpu-site").exists() == site_in_repo
    imports = "import webdataset, wandb, deepspeed; import trainer.train; print(webdataset.__file__, trainer.__file__)"
    bare = run(["python", "-c", imports], env, timeout_s=120, cwd=Path("/"))
    assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr, bare.stderr[-2000:]
    path_env = {**env, "PYTHONPATH": pythonpath}
    found = run(["python", "-c", imports], path_env, timeout_s=120, cwd=Path("/"))
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.split()[-2:] == [str(site / "webdataset/__init__.py"), str(REPO / "trainer/__init__.py")]

    train_two_steps(tmp_path / "run-target", colour_shards, path_env)

    started = time.monotonic()
    again = run(["bash", "benchmarks/gpu_install.sh", str(wheels)], target_env, timeout_s=120)
    again_s = time.monotonic() - started
    assert again.returncode == 0 and again.stdout == target.stdout, again.stderr[-3000:]
    assert again_s < 60, f"a second install in target mode took {again_s:.0f} s"
    assert installed(bin_dir, env) == before

    # Then the normal mode into the same venv.
    first = run(["bash", "benchmarks/gpu_install.sh", str(wheels)], env, timeout_s=400)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert first.stdout.startswith("gpu_install: ready: webdataset ") and "cyclegan-dist 0.1.0" in first.stdout
    assert installed(bin_dir, env) - before == carried | {"cyclegan-dist"}

    train_two_steps(tmp_path / "run", colour_shards, env)

    started = time.monotonic()
    again = run(["bash", "benchmarks/gpu_install.sh", str(wheels)], env, timeout_s=120)
    again_s = time.monotonic() - started
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-3000:]
    assert again_s < 60, f"a second install took {again_s:.0f} s"
