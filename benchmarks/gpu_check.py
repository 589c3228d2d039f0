"""The GPU check: everything this project wants measured on a GPU machine, in one command and one time budget.

    python benchmarks/gpu_check.py OUT_DIR [--wheels .gpu-wheels] [--budget-s 450]   # on a machine with CUDA
    python benchmarks/gpu_check.py OUT_DIR --dry                                      # anywhere: tiny sizes

Sections, in order of importance, each a subprocess with its own time cap inside the overall budget (a section
that would start after the budget is recorded as skipped, a failing one as failed, and the check goes on):

  environment     GPU, driver, torch / CUDA / cuDNN / NCCL and package versions
  install         `benchmarks/gpu_install.sh WHEELS` when --wheels is given (the machine has no internet); where
                  REPO/.gpu-site exists (its target mode), every section runs with it and REPO first on PYTHONPATH
  ladder          benchmarks/train_throughput.py at 256 px, ResNet-9 + PatchGAN: the reference's step, then fp32
                  batch 1, bf16, channels_last, fused passes, torch.compile, CUDA graphs, batch 4/8/16 and
                  activation checkpointing; img/s, MFU and peak memory per row
  demo_ddp        the demo config for 200 steps, DDP backend, one process
  demo_zero2      the same under DeepSpeed ZeRO-2, one process
  tests           tests/gpu
  activation_mem  benchmarks/activation_memory.py at 512 and 1024 px, checkpointing off and on

OUT_DIR receives gpu_check.json (everything, with each section's status and seconds), gpu_check.log (each
section's output), train_throughput.json, activation_memory.json and gpu_tests.xml. The dry mode (no CUDA needed)
runs every section at tiny sizes and is executed by the tests, so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.process_group import run_group  # noqa: E402

SITE = REPO / ".gpu-site"  # gpu_install.sh's target mode installs there when the interpreter's site is read-only
PACKAGES = ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "wandb", "torchmetrics", "safetensors")


@dataclass
class Plan:
    """What each section runs: full sizes on a GPU, tiny ones in the dry mode."""

    ladder: list[str]
    demo_steps: int
    activation: list[str]
    caps: dict[str, float] = field(default_factory=dict)


def plan(dry: bool) -> Plan:
    if dry:
        return Plan(
            ladder="--config configs/demo-cpu.yaml --size 32 --steps 1 --warmup 1 --batches 2 model.ngf=8 "
            "model.ndf=8".split(),
            demo_steps=4,
            activation=["--dry"],
            caps={
                "install": 300,
                "ladder": 300,
                "demo_ddp": 120,
                "demo_zero2": 180,
                "tests": 300,
                "activation_mem": 120,
            },
        )
    return Plan(
        ladder="--config configs/horse2zebra.yaml --size 256 --steps 8 --warmup 3 --compile --batches 4,8,16 "
        "--row-timeout 100".split(),
        demo_steps=200,
        activation="--sizes 512 1024 --precision bf16 --steps 3 --warmup 1".split(),
        caps={"install": 90, "ladder": 270, "demo_ddp": 60, "demo_zero2": 75, "tests": 90, "activation_mem": 60},
    )


class Check:
    """Runs the sections under one deadline and collects their results into gpu_check.json."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.log = (out / "gpu_check.log").open("w")
        self.results: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], cap_s: float, env: dict[str, str] | None = None) -> dict:
        """Run one section's command with min(cap_s, time left); record status, seconds and the output's tail."""
        left = self.deadline - time.monotonic()
        if left < 5:
            result = {"status": "skipped", "reason": "time budget spent"}
        else:
            result = self._run(cmd, min(cap_s, left), env)
        self.results[name] = result
        print(f"[gpu_check] {name}: {result['status']} ({result.get('seconds', 0):.0f} s)", flush=True)
        return result

    def _run(self, cmd: list[str], timeout_s: float, env: dict[str, str] | None) -> dict:
        self.log.write(f"\n=== {' '.join(cmd)}\n")
        self.log.flush()
        start = time.monotonic()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
        if SITE.exists():
            paths = [str(SITE), str(REPO), full_env.get("PYTHONPATH", "")]
            full_env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        returncode, _, _ = run_group(cmd, timeout_s, cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        status = "timed out" if returncode is None else "ok" if returncode == 0 else "failed"
        result = {"status": status, "seconds": time.monotonic() - start, "returncode": returncode}
        if status != "ok":
            result["cmd"] = cmd
        return result

    def write(self, report: dict) -> Path:
        """gpu_check.json: `report` with the sections' results."""
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps({**report, "sections": self.results}, indent=2) + "\n")
        self.log.close()
        return path


def environment() -> dict:
    """The machine and the software versions the figures belong to."""
    import importlib.metadata

    import torch

    if SITE.exists():
        sys.path.insert(0, str(SITE))  # the versions of what the sections import

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}  # fmt: skip
    for package in PACKAGES:
        try:
            info[f"version/{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[f"version/{package}"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            {
                "gpu": torch.cuda.get_device_name(0),
                "gpu_count": torch.cuda.device_count(),
                "gpu_memory_gb": props.total_memory / 2**30,
                "gpu_capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            }
        )
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)  # fmt: skip
        info["driver"] = smi.stdout.strip() or None
    return info


def demo_command(launch_config: str, steps: int, run_dir: Path, port: int) -> list[str]:
    """The demo config under `accelerate launch` with one process."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{launch_config}.yaml",
            "--num_processes", "1", "--main_process_port", str(port), "trainer/main.py", "--config",
            "configs/demo-cpu.yaml", f"train.steps={steps}", f"train.run_dir={run_dir}", "logging.wandb=disabled",
            f"logging.every_steps={max(steps // 4, 1)}"]  # fmt: skip


def demo_figures(run_dir: Path) -> dict:
    """The last throughput and loss record and the last evaluation of a demo run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = ("perf/images_per_s", "perf/step_time_s", "loss/g_total", "loss/d_total", "mem/peak_allocated_gb")
    perf = next((r for r in reversed(records) if "perf/images_per_s" in r), {})
    evaluation = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
    figures = {key: perf[key] for key in keep if key in perf}
    figures.update({k: v for k, v in evaluation.items() if k.startswith("eval/psnr")})
    return figures


def junit_summary(path: Path) -> dict:
    """Counts of a pytest junit XML report, with the names of failed tests."""
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    return {
        "tests": int(suite.get("tests", 0)),
        "skipped": int(suite.get("skipped", 0)),
        "failed": failed,
    }


def summary_lines(report: dict) -> list[str]:
    """A few lines of the figures that matter, for the end of the output."""
    env = report["environment"]
    lines = [f"{env.get('gpu', 'no GPU')} | torch {env['torch']} | CUDA {env.get('cuda')} | {env['platform']}"]
    for row in report.get("ladder", {}).get("rows", []):
        if "error" in row:
            lines.append(f"  {row['row']:<42} failed: {row['error'].strip().splitlines()[-1][:80]}")
            continue
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        mem = row.get("mem/peak_allocated_gb")
        mem_text = f"  peak {mem:.2f} GB" if mem is not None else ""
        lines.append(f"  {row['row']:<42} {row['images_per_s']:9.2f} img/s{mfu}{mem_text}")
    for name in ("demo_ddp", "demo_zero2"):
        figures = report["sections"].get(name, {}).get("figures", {})
        if figures:
            lines.append(f"  {name}: {json.dumps(figures)}")
    tests = report["sections"].get("tests", {}).get("summary")
    if tests:
        lines.append(f"  tests/gpu: {tests['tests']} run, {tests['skipped']} skipped, failed: {tests['failed']}")
    for name, section in report["sections"].items():
        if section["status"] != "ok":
            lines.append(f"  section {name}: {section['status']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the JSON, the log and the test report")
    parser.add_argument("--dry", action="store_true", help="tiny sizes, no CUDA needed (the tests run this)")
    parser.add_argument("--wheels", type=Path, help="install missing packages offline from this directory first")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting sections after this many seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.dry)
    check = Check(args.out, args.budget_s)
    if args.wheels is not None:
        check.run("install", ["bash", "benchmarks/gpu_install.sh", str(args.wheels)], steps.caps["install"])
    report: dict = {"dry": args.dry, "environment": environment()}
    print(f"[gpu_check] {json.dumps(report['environment'])}", flush=True)
    if not args.dry and not report["environment"]["cuda_available"]:
        raise SystemExit("gpu_check: CUDA is not available here; use --dry to check the script without a GPU")

    ladder_json = args.out / "train_throughput.json"
    ladder_cmd = [sys.executable, "benchmarks/train_throughput.py", *steps.ladder, "--keep-going", "--out",
                  str(ladder_json)]  # fmt: skip
    check.run("ladder", ladder_cmd, steps.caps["ladder"])
    if ladder_json.exists():
        report["ladder"] = json.loads(ladder_json.read_text())

    with tempfile.TemporaryDirectory() as tmp:
        for port, (name, launch_config) in enumerate((("demo_ddp", "gpu-ddp"), ("demo_zero2", "zero2")), 29611):
            run_dir = Path(tmp) / name
            result = check.run(name, demo_command(launch_config, steps.demo_steps, run_dir, port), steps.caps[name])
            result["figures"] = demo_figures(run_dir)

    junit = args.out / "gpu_tests.xml"
    tests_cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                 # the ladder section above measures what this test checks, at full size
                 "--deselect", "tests/gpu/test_cuda.py::test_throughput_benchmark_reports_mfu_on_cuda"]  # fmt: skip
    result = check.run("tests", tests_cmd, steps.caps["tests"])
    result["summary"] = junit_summary(junit)

    activation_json = args.out / "activation_memory.json"
    activation_cmd = [sys.executable, "benchmarks/activation_memory.py", *steps.activation, "--out",
                      str(activation_json)]  # fmt: skip
    check.run("activation_mem", activation_cmd, steps.caps["activation_mem"])
    if activation_json.exists():
        report["activation_memory"] = json.loads(activation_json.read_text())

    path = check.write(report)
    print("\n".join(summary_lines({**report, "sections": check.results})))
    print(f"[gpu_check] wrote {path}")


if __name__ == "__main__":
    main()
