#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, what cyclegan-dist needs at run time beyond the GPU machines' image
# (benchmarks/gpu_image_packages.txt), so that benchmarks/gpu_install.sh can install it there with no network.
#
#   bash benchmarks/gpu_wheels.sh .gpu-wheels          # here; .gpu-wheels/ is the default folder, ignored by git
#   bash benchmarks/gpu_install.sh .gpu-wheels         # on the GPU machine (the device run carries ".gpu-wheels")
#   bash benchmarks/gpu_wheels.sh --list [3.12]        # print what would be downloaded, download nothing
#
# usage: bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]   (PYTHON_VERSION: the image's CPython, default 3.12)
#
# How the list is made, so that it follows version changes instead of being written down:
#  1. The project's install_requires (pip's report on setup.py) less the image's packages are the top-level
#     packages: webdataset, wandb and deepspeed today. Each is pinned to the version installed here, so the GPU
#     machine runs what the CPU tests run; one not installed here is an error.
#  2. DeepSpeed travels as its source distribution and is built there against the image's torch (its build records
#     the accelerator and torch it saw); its requirements (this machine's metadata of the same version) join the
#     roots in its place.
#  3. pip resolves the roots for CPython PYTHON_VERSION on manylinux x86-64 (--dry-run --report: metadata only).
#  4. The dependency graph of that report is walked from the roots with markers evaluated for the target Python,
#     never entering an image package. What it reaches is downloaded (wheels only), nothing else: no torch, no
#     protobuf, no packaging; the image's own versions of those must do, and pip says so there if one does not.
#     A package the walk needs but pip's resolution lacks is an error.
# DIR then holds the wheels, the DeepSpeed sdist and requirements.txt (the pinned top-level packages). An earlier
# download in DIR is replaced; a DIR holding anything else is refused.
#
# Environment: PYTHON (default python3) runs pip here; it needs the project and its requirements installed.
set -euo pipefail

prog=gpu_wheels
die() {
  echo "$prog: $*" >&2
  exit 1
}
usage() {
  echo "usage: bash benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]   or   bash benchmarks/gpu_wheels.sh --list [PYTHON_VERSION]" >&2
  exit 2
}

[[ $# -ge 1 && $# -le 2 && -n $1 ]] || usage
out_dir=$1
py_version=${2:-3.12}
[[ $py_version =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || {
  echo "$prog: PYTHON_VERSION=$py_version must look like 3.12 or 3.12.3" >&2
  exit 2
}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
image_list=$here/gpu_image_packages.txt
python=${PYTHON:-python3}
sdist_packages=deepspeed   # built on the GPU machine from source; space-separated if ever more than one
budget_mib=50              # the device tool carries at most 64 MiB of working tree, the repository included

if [[ $out_dir != --list && -e $out_dir ]]; then
  [[ -d $out_dir ]] || die "DIR=$out_dir is not a directory"
  others=$(find "$out_dir" -mindepth 1 -maxdepth 1 ! -name '*.whl' ! -name '*.tar.gz' ! -name requirements.txt)
  [[ -z $others ]] || die "DIR=$out_dir holds more than an earlier download ($(echo "$others" | head -n 1)); name an empty or new folder"
fi
[[ -f $image_list ]] || die "$image_list does not exist"
command -v "$python" >/dev/null || die "PYTHON=$python is not a command"

# torch's own cu130 wheels need glibc 2.28, so every manylinux tag up to 2_28 runs on the image.
platform_opts=()
for n in $(seq 28 -1 5); do platform_opts+=(--platform "manylinux_2_${n}_x86_64"); done
platform_opts+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
target_opts=(--only-binary=:all: --python-version "$py_version" --implementation cp "${platform_opts[@]}")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip=("$python" -m pip --disable-pip-version-check)

# Run pip quietly; on failure show its last lines and stop with a one-line reason.
run_pip() {
  local what=$1
  shift
  if ! "${pip[@]}" "$@" >"$tmp/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$tmp/pip.log" | tail -n 15 >&2
    die "pip failed to $what (its output above)"
  fi
}

# The planning steps, in Python: requirement markers, name normalization and the graph walk. Subcommands:
#   roots PROJECT_REPORT   -> writes top-level.txt (name==version, installed here) and roots.txt (what pip resolves)
#   plan CLOSURE_REPORT    -> writes downloads.txt (name==version of every wheel to fetch)
#   check DOWNLOAD_DIR     -> checks the files against the plan and the image list
planner() {
  "$python" - "$@" <<'PY'
import json
import re
import sys
from importlib import metadata

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

step, arg, image_file, py_version, sdists, work = sys.argv[1:7]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fail(message: str) -> None:
    sys.exit(f"gpu_wheels: {message}")


image = {norm(line.strip()) for line in open(image_file) if line.strip() and not line.startswith("#")}
sdists = {norm(n) for n in sdists.split()}
env = default_environment()
env.update(python_version=".".join(py_version.split(".")[:2]),
           python_full_version=py_version if py_version.count(".") == 2 else py_version + ".0",
           implementation_name="cpython", platform_python_implementation="CPython", os_name="posix",
           sys_platform="linux", platform_system="Linux", platform_machine="x86_64")


def applies(req: Requirement, extras=()) -> bool:
    """Whether req is needed on the target Python when its owner was asked for with `extras`."""
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def write(name: str, lines) -> None:
    with open(f"{work}/{name}", "w") as f:
        f.writelines(f"{line}\n" for line in lines)


if step == "roots":
    project = json.load(open(arg))["install"][0]["metadata"]
    top, roots = [], []
    for text in project.get("requires_dist", []):
        req = Requirement(text)
        if norm(req.name) in image or not applies(req):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            fail(f"{req.name} is not installed here; install the project first (pip install -e .) so that the GPU "
                 "machine gets the versions tested here")
        if not req.specifier.contains(version, prereleases=True):
            fail(f"{req.name} {version} installed here does not satisfy the project's {req}; reinstall the project")
        top.append(f"{req.name}=={version}")
        if norm(req.name) in sdists:
            roots += [str(r) for r in map(Requirement, metadata.requires(req.name) or [])
                      if norm(r.name) not in image and applies(r)]
        else:
            roots.append(f"{req.name}=={version}")
    write("top-level.txt", top)
    write("roots.txt", roots)

elif step == "plan":
    resolved = {norm(item["metadata"]["name"]): item["metadata"] for item in json.load(open(arg))["install"]}
    queue = [(Requirement(line.strip()), "the roots") for line in open(f"{work}/roots.txt") if line.strip()]
    needed, seen = {}, set()
    while queue:
        req, parent = queue.pop()
        name = norm(req.name)
        if name in image or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        meta = resolved.get(name)
        if meta is None:
            fail(f"{req} (needed by {parent} on Python {py_version}) is missing from pip's resolution; pip ran on "
                 f"Python {sys.version.split()[0]} and may have judged its marker differently: run this script "
                 f"with a Python {py_version} (PYTHON=...)")
        if not req.specifier.contains(meta["version"], prereleases=True):
            fail(f"pip resolved {meta['name']} {meta['version']}, which does not satisfy {req} of {parent}")
        needed[name] = f"{meta['name']}=={meta['version']}"
        queue += [(dep, name) for dep in map(Requirement, meta.get("requires_dist") or []) if applies(dep, req.extras)]
    assert not image & set(needed), "the walk never enters an image package"
    write("downloads.txt", sorted(needed.values(), key=str.lower))

elif step == "check":
    import os

    planned = {norm(line.split("==")[0]) for line in open(f"{work}/downloads.txt")} | sdists
    got = {}
    for fname in os.listdir(arg):  # name-version-....whl, or name-version.tar.gz
        name = fname.split("-")[0] if fname.endswith(".whl") else fname.removesuffix(".tar.gz").rsplit("-", 1)[0]
        got.setdefault(norm(name), []).append(fname)
    bad = sorted(f for n, files in got.items() if n in image for f in files)
    if bad:
        fail(f"downloaded packages the image already has: {' '.join(bad)}")
    twice = sorted(f for files in got.values() if len(files) > 1 for f in files)
    if twice:
        fail(f"more than one file of a package: {' '.join(twice)}")
    if set(got) != planned:
        fail(f"the download differs from the plan: missing {sorted(planned - set(got))}, extra {sorted(set(got) - planned)}")
PY
}

echo "$prog: resolving for CPython $py_version, manylinux x86-64 (pip in $("$python" -c 'import sys; print(sys.prefix)'))" >&2
run_pip "read the project's requirements" install --dry-run --no-deps --no-index --no-build-isolation \
  --ignore-installed --quiet --report "$tmp/project.json" "$repo"
planner roots "$tmp/project.json" "$image_list" "$py_version" "$sdist_packages" "$tmp"
run_pip "resolve $(tr '\n' ' ' <"$tmp/roots.txt")for Python $py_version" install --dry-run --quiet \
  --report "$tmp/closure.json" --target "$tmp/target" "${target_opts[@]}" -r "$tmp/roots.txt"
planner plan "$tmp/closure.json" "$image_list" "$py_version" "$sdist_packages" "$tmp"

sdist_pins=()
for name in $sdist_packages; do
  pin=$(grep -i "^$name==" "$tmp/top-level.txt") || die "$name is not among the top-level packages"
  sdist_pins+=("$pin")
done

if [[ $out_dir == --list ]]; then
  cat "$tmp/downloads.txt"
  printf '%s (sdist)\n' "${sdist_pins[@]}"
  exit 0
fi

mkdir "$tmp/dl"
echo "$prog: downloading $(wc -l <"$tmp/downloads.txt") wheels and ${sdist_pins[*]} (sdist)" >&2
run_pip "download the wheels" download --no-deps "${target_opts[@]}" -d "$tmp/dl" -r "$tmp/downloads.txt"
run_pip "download ${sdist_pins[*]} as source" download --no-deps --no-binary :all: -d "$tmp/dl" "${sdist_pins[@]}"
planner check "$tmp/dl" "$image_list" "$py_version" "$sdist_packages" "$tmp"

{
  echo "# Written by benchmarks/gpu_wheels.sh on $(date -u +%F) from $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo "?"):"
  echo "# the packages cyclegan-dist needs beyond the GPU image. Install with: bash benchmarks/gpu_install.sh DIR"
  echo "# python-version: $py_version"
  cat "$tmp/top-level.txt"
} >"$tmp/dl/requirements.txt"

total_bytes=$(du -cb "$tmp"/dl/* | tail -n 1 | cut -f 1)
total_mib=$(awk -v b="$total_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
find "$tmp/dl" -type f -printf '%s %f\n' | sort -rn | awk '{ printf "%8.1f MiB  %s\n", $1 / 1048576, $2 }' >&2
if awk -v t="$total_mib" -v b="$budget_mib" 'BEGIN { exit !(t > b) }'; then
  die "the download is $total_mib MiB, over the $budget_mib MiB budget (the device tool carries at most 64 MiB with the repository); the largest files are listed above"
fi

mkdir -p "$out_dir"
find "$out_dir" -mindepth 1 -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' -o -name requirements.txt \) -delete
mv "$tmp"/dl/* "$out_dir"/
echo "$prog: $out_dir: $(find "$out_dir" -mindepth 1 | wc -l) files, $total_mib MiB in total, for CPython $py_version" >&2
