#!/usr/bin/env bash
# Install, with no network, what cyclegan-dist needs beyond the GPU machines' image: the wheels and DeepSpeed sdist
# that benchmarks/gpu_wheels.sh put in DIR, then this project itself (editable, no dependencies), then check that
# everything imports.
#
#   bash benchmarks/gpu_wheels.sh .gpu-wheels          # first, here; .gpu-wheels/ is the default folder
#   bash benchmarks/gpu_install.sh .gpu-wheels         # on the GPU machine (the device run carries ".gpu-wheels")
#
# usage: bash benchmarks/gpu_install.sh DIR
#
# pip runs with --no-index, so it installs only from DIR and never touches the image's own packages; one of those
# too old for a carried package stops the install with pip's reason. DeepSpeed is built there from source with
# DS_BUILD_OPS=0 (no compiled ops: they are built just in time if ever used) and --no-build-isolation (against
# the image's torch and setuptools). A second run finds everything installed and only repeats the import check.
#
# Target mode, when the interpreter's site-packages (sysconfig's purelib) is not writable (a read-only image) or
# GPU_INSTALL_TARGET=1: every file of DIR is installed with --no-deps --target GPU_SITE (default REPO/.gpu-site,
# ignored by git) and the project is not installed at all: it is used from the checkout. Nothing is then installed
# into the interpreter, and the packages import only with PYTHONPATH=GPU_SITE:REPO, which the last line of output
# names and the caller must export (benchmarks/gpu_check.py does so itself for REPO/.gpu-site). --no-deps skips
# pip's resolver, so the import check verifies the requirements of the project and of every carried distribution
# against what that PYTHONPATH imports. GPU_SITE holds a marker (.gpu_install) saying from what it was made: a
# second run with the same DIR and interpreter only repeats the check, a different one empties GPU_SITE and
# installs again; a GPU_SITE without the marker that is not empty is refused, never emptied.
#
# Environment: PYTHON (default python3, the image's /opt/torch/.venv/bin/python3) is the interpreter to install into.
# GPU_INSTALL_TARGET: 1 forces target mode; unset, empty or 0 chooses by whether purelib is writable.
# GPU_SITE: target mode's folder (default REPO/.gpu-site).
set -euo pipefail

prog=gpu_install
die() {
  echo "$prog: $*" >&2
  exit 1
}
[[ $# -eq 1 && -n $1 ]] || {
  echo "usage: bash benchmarks/gpu_install.sh DIR   (DIR made by: bash benchmarks/gpu_wheels.sh DIR)" >&2
  exit 2
}
[[ ${GPU_INSTALL_TARGET:-} =~ ^[01]?$ ]] ||
  die "GPU_INSTALL_TARGET=$GPU_INSTALL_TARGET must be 1 (install into GPU_SITE), 0 or unset (1 when purelib is not writable)"
[[ -f $1/requirements.txt ]] || die "$1/requirements.txt does not exist; make DIR here with: bash benchmarks/gpu_wheels.sh $1"
dir=$(cd "$1" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "PYTHON=$python is not a command"

made_for=$(sed -n 's/^# python-version: //p' "$dir/requirements.txt")
running=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
[[ $running == "$made_for" || $running == "$made_for".* ]] ||
  die "$1 holds wheels for Python ${made_for:-?} but $python is Python $running; make it with: bash benchmarks/gpu_wheels.sh $1 ${running%.*}"

site=${GPU_SITE:-$repo/.gpu-site}
[[ $site == /* ]] || site=$PWD/$site
marker=$site/.gpu_install
target=${GPU_INSTALL_TARGET:-0}
if [[ $target == 0 ]]; then
  target=$("$python" -c 'import os, sysconfig; print(int(not os.access(sysconfig.get_paths()["purelib"], os.W_OK)))')
fi

log=$(mktemp "${TMPDIR:-/tmp}/gpu_install.XXXXXX.log")
report=${log%.log}.project.json  # target mode: pip's report on the project
# Keep the log only when it says something (a failure names it), never the report.
trap '[[ -s $log ]] || rm -f "$log"; rm -f "$report"' EXIT
# The last line of the log that says what went wrong, else its last line.
reason() {
  local line
  line=$(grep -E '^(ERROR|error)|Error|unmet' "$log" | tail -n 1 || true)
  echo "${line:-$(tail -n 1 "$log")}"
}
# Run a step with its output in the log; on failure keep the log and stop with one line naming it.
step() {
  local what=$1
  shift
  "$@" >>"$log" 2>&1 || die "$what failed: $(reason) (whole output: $log)"
}

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
pip=("$python" -m pip install --no-index --no-build-isolation)
if [[ $target == 1 ]]; then
  # What GPU_SITE is made from: the interpreter, its torch (DeepSpeed's build records it) and DIR's files.
  stamp=$("$python" -c 'import sys
from importlib import metadata
try:
    torch = metadata.version("torch")
except metadata.PackageNotFoundError:
    torch = None
print(sys.executable, sys.version.split()[0], "torch", torch)'
    find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' \) -printf '%f %s\n' | sort)
  if [[ ! -f $marker || $(<"$marker") != "$stamp" ]]; then
    files=()
    for file in "$dir"/*.whl "$dir"/*.tar.gz; do
      if [[ -f $file ]]; then files+=("$file"); fi
    done
    ((${#files[@]})) || die "$1 holds no wheels and no sdist; make it with: bash benchmarks/gpu_wheels.sh $1"
    if [[ -e $site ]]; then
      [[ -d $site ]] || die "GPU_SITE=$site is not a directory"
      [[ -f $marker || -z $(find "$site" -mindepth 1 -maxdepth 1 -print -quit) ]] ||
        die "GPU_SITE=$site holds files but no $prog marker (.gpu_install), so it is not emptied; name an empty or new folder"
      step "emptying $site (made from another DIR or interpreter)" find "$site" -mindepth 1 -delete
    fi
    step "mkdir -p $site" mkdir -p "$site"
    echo "incomplete" >"$marker"  # so that the next run empties a failed install instead of refusing it
    step "pip install --no-deps --target $site (offline)" "${pip[@]}" --no-deps --no-cache-dir --upgrade \
      --target "$site" "${files[@]}"
    printf '%s\n' "$stamp" >"$marker"
  fi
  # The project is used from the checkout, not installed; its requirements come from pip's reading of setup.py.
  step "reading $repo's requirements (pip --dry-run --report)" "${pip[@]}" --dry-run --no-deps --ignore-installed \
    --quiet --report "$report" "$repo"
else
  if [[ -f $marker ]]; then
    echo "$prog: note: $site holds an earlier target-mode install, which shadows this one wherever it is on" \
      "PYTHONPATH (benchmarks/gpu_check.py puts REPO/.gpu-site there); remove it" >&2
  fi
  step "pip install -r $1/requirements.txt (offline)" "${pip[@]}" --find-links "$dir" -r "$dir/requirements.txt"

  # pip reinstalls an editable project every time, so skip it when this checkout is already the installed one.
  installed_at=$(cd / && "$python" -c 'import importlib.util as u; s = u.find_spec("trainer"); print(s.origin if s else "")')
  if [[ $installed_at != "$repo/trainer/__init__.py" ]]; then
    step "pip install -e $repo (no dependencies)" "${pip[@]}" --no-deps -e "$repo"
  fi
fi

# From /, so that the imports come from the installation (or PYTHONPATH) and not from the working directory. The
# requirements checked: the project's, every carried distribution's (those named by DIR's files) and those of any
# extras they ask for, with markers evaluated for the running Python, against the versions that import. In target
# mode every carried distribution must import from GPU_SITE and the project from the checkout.
check='
import json
import os
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

import deepspeed, torch, trainer.train, wandb, webdataset  # noqa: F401, E401

wheels, site, report, repo = sys.argv[1:5]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if report:
    project = json.load(open(report))["install"][0]["metadata"]
    project_version, project_requires = project["version"], project.get("requires_dist") or []
else:
    project_version, project_requires = metadata.version("cyclegan-dist"), metadata.requires("cyclegan-dist") or []

carried = {}
for fname in os.listdir(wheels):
    if fname.endswith(".whl"):
        name, ver = fname.split("-")[:2]
    elif fname.endswith(".tar.gz"):
        name, ver = fname.removesuffix(".tar.gz").rsplit("-", 1)
    else:
        continue
    carried[norm(name)] = ver

problems = []
if not os.path.samefile(os.path.dirname(trainer.__file__), os.path.join(repo, "trainer")):
    problems.append(f"error: trainer imports from {trainer.__file__}, not from {repo}")
if site:
    for name, ver in sorted(carried.items()):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"error: {name} is not installed in {site}")
            continue
        where = str(dist.locate_file(""))
        if not os.path.samefile(where, site) or Version(dist.version) != Version(ver):
            problems.append(f"error: {name} imports as {dist.version} from {where}, not as {ver} from {site}")

unmet, seen = [], set()
todo = [("cyclegan-dist", frozenset())] + [(name, frozenset()) for name in carried]
while todo:
    owner, extras = todo.pop()
    if (owner, extras) in seen:
        continue
    seen.add((owner, extras))
    if owner == "cyclegan-dist":
        requires = project_requires
    elif version(owner) is None:
        continue  # unmet for whoever asked for it, or a carried file not installed for this Python
    else:
        requires = metadata.requires(owner) or []
    for req in map(Requirement, requires):
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        have = version(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} of {owner} (have {have})")
        elif req.extras:
            todo.append((norm(req.name), frozenset(req.extras)))
if unmet:
    problems.append("unmet requirements: " + ", ".join(sorted(set(unmet))))
if problems:
    sys.exit("; ".join(problems))
versions = [f"{n} {metadata.version(n)}" for n in ("webdataset", "wandb", "deepspeed", "torch")]
print(", ".join(versions), f", cyclegan-dist {project_version} on Python {sys.version.split()[0]}", sep="")
'
if [[ $target == 1 ]]; then
  pythonpath=$site:$repo
  ready=$(cd / && PYTHONPATH=$pythonpath${PYTHONPATH:+:$PYTHONPATH} "$python" -c "$check" "$dir" "$site" "$report" "$repo" 2>>"$log") ||
    die "the import check (PYTHONPATH=$pythonpath) failed: $(reason) (whole output: $log)"
else
  ready=$(cd / && "$python" -c "$check" "$dir" "" "" "$repo" 2>>"$log") ||
    die "the import check failed: $(reason) (whole output: $log)"
fi
echo "$prog: ready: ${ready##*$'\n'}"  # the last line: DeepSpeed logs to stdout
if [[ $target == 1 ]]; then
  echo "$prog: PYTHONPATH=$pythonpath  (export it: the packages are in $site, nothing was installed into $python, and the project is used from $repo)"
fi
rm -f "$log"
