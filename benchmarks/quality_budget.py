"""Translation quality after a fixed wall-clock budget, on a synthetic task with a known answer: ResNet-6 vs the
article's U-Net vs ResNet-6 with the H/H' discriminator and feature-level cycle loss; or the model families,
CycleGAN vs CUT vs FastCUT, each with its demo config (configs/demo-cpu.yaml, cut-demo.yaml, fastcut-demo.yaml).

    python benchmarks/quality_budget.py [--task stripes] [--seconds 900 | --steps N] [--models resnet6 hnet ...]
    python benchmarks/quality_budget.py --task colour --models cyclegan cut fastcut --out FILE

Each model trains with its config (the demo's: 32 px, batch 4, bf16; constant LR) until the budget is spent; then
it is preempted with SIGUSR1 (so it saves a checkpoint, as on a cluster), and `trainer.evaluate` measures PSNR/SSIM
of G(x) against T(x) and (CycleGAN) of F(y) against x on 64 test pairs, beside the identity baseline. Also per
model: the median time per update and the largest host RSS the run logged. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shards.synthetic import write_synthetic  # noqa: E402

MODELS = {  # name -> (config, overrides)
    "resnet6": ("demo-cpu", ["model.generator=resnet", "model.n_blocks=6"]),
    "unet_article": ("demo-cpu", [  # the article's model (configs/unet-article.yaml) at the demo's width
        "model.generator=unet_article", "model.n_skip=2", "model.norm_g=batch", "model.norm_d=batch",
        "loss.lambda_identity=0", "loss.lambda_preserve=0.5",
    ]),
    "hnet": ("demo-cpu", [  # the article's improved variant (configs/cyclegan-hnet.yaml) on the ResNet-6 generator
        "model.generator=resnet", "model.n_blocks=6", "model.discriminator=hnet", "loss.lambda_feature=1.0",
    ]),
    "cyclegan": ("demo-cpu", []),
    "cut": ("cut-demo", []),
    "fastcut": ("fastcut-demo", []),
}  # fmt: skip
BUDGET_RUN = ["train.steps=100000000", "schedule.kind=constant", "checkpoint.every_steps=0", "logging.every_steps=10"]


def run_model(name: str, data: Path, run_dir: Path, seconds: float, steps: int | None, test_images: int) -> dict:
    """Train `name` for `seconds` of wall clock and preempt it (or for `steps` updates), then evaluate the
    checkpoint it saved; a budget that allowed no update is recorded as such."""
    config, overrides = MODELS[name]
    budget = [f"train.steps={steps}"] if steps else []
    cmd = [sys.executable, "trainer/main.py", "--config", f"configs/{config}.yaml", f"data.root={data}",
           f"train.run_dir={run_dir}", *BUDGET_RUN, *budget, *overrides]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not steps:
        time.sleep(seconds)
        proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=None if steps else 600)
    wall = time.monotonic() - start
    # 75: preempted and saved; -SIGUSR1: the budget ended before Python could install the handler
    if proc.returncode not in ((0,) if steps else (75, -signal.SIGUSR1)):
        raise RuntimeError(f"{name}: training exited with {proc.returncode}, not 0 or 75 (preempted):\n{err[-3000:]}")
    marker = run_dir / "PREEMPTED"
    done = steps or (int(marker.read_text()) if marker.is_file() else 0)
    result = {"model": name, "config": config, "overrides": overrides, "steps": done, "wall_s": round(wall, 1)}
    if done == 0:
        return {**result, "error": f"no update finished within the {seconds:g} s budget; raise --seconds"}
    out = run_dir / "eval.json"
    evaluate = [sys.executable, "-m", "trainer.evaluate", "--weights", str(run_dir), "--data", str(data),
                "--images", str(test_images), "--json", str(out)]  # fmt: skip
    subprocess.run(evaluate, cwd=REPO, check=True, capture_output=True, text=True)
    metrics = json.loads(out.read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["perf/step_time_s"] for r in logged if "perf/step_time_s" in r]
    costs = {
        "step_time_s": statistics.median(step_times[1:] or step_times) if step_times else None,  # [0]: start-up
        "host_rss_gb_max": max((r["mem/host_rss_gb"] for r in logged if "mem/host_rss_gb" in r), default=None),
    }
    return {**result, **costs, **metrics}


def report(r: dict) -> str:
    """One line of a model's result."""
    if "error" in r:
        return f"{r['model']:>13}: {r['error']}"
    gain_f = f", F {r['eval/psnr_gain_yx']:+.2f} dB" if "eval/psnr_gain_yx" in r else ""
    step_ms = f"{1000 * r['step_time_s']:.0f} ms per step" if r["step_time_s"] else "no step time logged"
    rss = f", RSS {r['host_rss_gb_max']:.2f} GB" if r["host_rss_gb_max"] else ""
    return (
        f"{r['model']:>13}: {r['steps']:>6} steps in {r['wall_s']:.0f} s ({step_ms}{rss}); PSNR gain G "
        f"{r['eval/psnr_gain_xy']:+.2f} dB{gain_f}; SSIM G {r['eval/ssim_g_xy']:.3f} (identity "
        f"{r['eval/ssim_identity']:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="stripes", choices=["stripes", "colour", "photos"])
    parser.add_argument("--seconds", type=float, default=900.0, help="wall-clock budget per model")
    parser.add_argument("--steps", type=int, help="a budget of this many updates per model instead of --seconds")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train", type=int, default=2048, help="training images per domain")
    parser.add_argument("--test", type=int, default=64, help="test pairs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/quality_budget.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.task
        write_synthetic(data, args.task, size=32, train=args.train, test=args.test)
        results = [run_model(m, data, Path(tmp) / f"run-{m}", args.seconds, args.steps, args.test) for m in args.models]
    figures = {
        "benchmark": "quality_budget",
        "task": args.task,
        "budget_s_per_model": None if args.steps else args.seconds,
        "budget_steps_per_model": args.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for r in results:
        print(report(r))


if __name__ == "__main__":
    main()
