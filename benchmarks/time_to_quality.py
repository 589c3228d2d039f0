"""Time to quality: how CycleGAN's quality per image and per second changes with the global batch, under each
learning-rate scaling rule, with and without the generators' moving average (EMA).

    python benchmarks/time_to_quality.py [--task colour] [--images 4096] [--eval-every 512] [--batches 1 4 16 64]
        [--rules none linear sqrt] [--out benchmarks/results/time_to_quality.json]

Every setting trains the demo model (configs/demo-cpu.yaml: 32 px ResNet, bf16) with trainer/main.py on the task's
synthetic shards for the same number of images: global batch 1 in one process, larger ones on 2 CPU ranks
(launch/cpu-ddp-2.yaml) with half the batch each, the LR scaled by the rule from optimizer.base_batch (1) with a
linear warm-up over the first --warmup-images. EMA is on with ema.eval_raw, so each run gives both curves: the PSNR
gain of G(x) against the known answer T(x) over the identity, every --eval-every images. Training time is the sum of
the logged step times (evaluation excluded). A last run is the reference implementation's recipe: fp32, batch 1,
no EMA. Writes JSON (every curve; per setting the images, optimizer steps and seconds to reach the target gain, the
reference recipe's final gain unless --target-gain; and the images to reach the batch-1 run's gain after half the
images, its sample efficiency) and a PNG plot (quality vs images, quality vs seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.process_group import launcher, run_group  # noqa: E402
from shards.synthetic import write_synthetic  # noqa: E402

REFERENCE = ["train.precision=fp32", "train.batch_size=1", "ema.enabled=false", "ema.eval_raw=false"]


def train(args: argparse.Namespace, data: Path, run_dir: Path, batch: int, overrides: list[str]) -> list[dict]:
    """Train one setting for args.images images at global batch `batch`; its metrics.jsonl records."""
    ranks = 2 if batch >= 2 else 1
    steps = args.images // batch
    every = max(1, args.eval_every // batch)
    cmd = launcher("cpu-ddp-2" if ranks == 2 else None, ranks) + [
        "trainer/main.py", "--config", "configs/demo-cpu.yaml", f"data.root={data}", f"train.run_dir={run_dir}",
        f"train.batch_size={batch // ranks}", f"train.steps={steps}", f"eval.every_steps={every}",
        f"logging.every_steps={every}", f"eval.images={args.test}", "checkpoint.every_steps=0",
        "logging.image_every_steps=0", "ema.enabled=true", "ema.eval_raw=true", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as log:
        returncode, _, _ = run_group(cmd, args.run_timeout, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited with {returncode}:\n{log.read()[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curves(records: list[dict], batch: int) -> dict[str, list]:
    """Per evaluation: images seen, optimizer steps, training seconds so far, and the PSNR gain of G (EMA and raw;
    without EMA only `gain`)."""
    seconds, last_step, out = 0.0, 0, {"images": [], "steps": [], "seconds": [], "gain": [], "gain_raw": []}
    for record in records:
        if "perf/step_time_s" in record:
            seconds += record["perf/step_time_s"] * (record["step"] - last_step)
            last_step = record["step"]
        if "eval/psnr_gain_xy" in record:
            out["images"].append(record["step"] * batch)
            out["steps"].append(record["step"])
            out["seconds"].append(round(seconds, 2))
            out["gain"].append(record["eval/psnr_gain_xy"])
            out["gain_raw"].append(record.get("eval_raw/psnr_gain_xy", record["eval/psnr_gain_xy"]))
    return out


def first_reaching(curve: dict[str, list], key: str, target: float) -> dict | None:
    """Images, steps and seconds at the first evaluation whose `key` gain reaches `target` (None if none does)."""
    for i, gain in enumerate(curve[key]):
        if gain >= target:
            return {"images": curve["images"][i], "steps": curve["steps"][i], "seconds": curve["seconds"][i]}
    return None


def summarize(results: list[dict], target: float) -> None:
    """Add to each result the images, steps and seconds to reach `target` (EMA and raw curves), and, against the
    batch-1 run (the reference recipe when there is no other), the images to reach its gain after half the images."""
    batch1 = next((r for r in results if r["global_batch"] == 1 and r["ema"]), results[0])
    half = batch1["curve"]["images"][len(batch1["curve"]["images"]) // 2 - 1]
    quality = batch1["curve"]["gain_raw"][batch1["curve"]["images"].index(half)]
    for result in results:
        result["target_gain_db"] = target
        result["to_target"] = first_reaching(result["curve"], "gain", target)
        result["to_target_raw"] = first_reaching(result["curve"], "gain_raw", target)
        reached = first_reaching(result["curve"], "gain_raw", quality)
        result["sample_efficiency"] = {
            "batch1_images": half,
            "batch1_gain_raw_db": quality,
            "images_raw": reached and reached["images"],
            "ratio_raw": reached and reached["images"] / half,
        }


def plot(results: list[dict], path: Path) -> None:
    """Quality vs images and vs training seconds, one curve per setting (EMA solid, raw dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.cm.tab20(range(len(results)))
    for result, colour in zip(results, colours):
        curve = result["curve"]
        for key, style in (("gain", "-"), ("gain_raw", "--")):
            if key == "gain_raw" and result["ema"] is False:
                continue
            label = result["name"] if key == "gain" else None
            axes[0].plot(curve["images"], curve[key], style, color=colour, label=label)
            axes[1].plot(curve["seconds"], curve[key], style, color=colour)
    for axis, xlabel in zip(axes, ("images seen (per domain)", "training seconds (this CPU)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("PSNR gain of G over identity (dB)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("time to quality (solid: EMA generators, dashed: raw)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="colour", choices=["colour", "stripes", "photos"])
    parser.add_argument("--images", type=int, default=4096, help="training images per domain of every setting")
    parser.add_argument("--eval-every", type=int, default=512, help="images between evaluations")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rules", nargs="+", default=["none", "linear", "sqrt"])
    parser.add_argument("--warmup-images", type=int, default=512, help="LR warm-up of the settings with batch > 1")
    parser.add_argument("--train", type=int, default=2048, help="training images per domain in the shards")
    parser.add_argument("--test", type=int, default=64, help="test pairs")
    parser.add_argument("--target-gain", type=float, help="default: the reference recipe's final gain")
    parser.add_argument("--run-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/time_to_quality.json")
    args = parser.parse_args()
    settings = [("reference: fp32, batch 1, no EMA", 1, REFERENCE)]
    for batch in args.batches:
        for rule in args.rules if batch > 1 else ["none"]:
            warmup = [f"schedule.warmup_steps={math.ceil(args.warmup_images / batch)}"] if batch > 1 else []
            settings.append((f"batch {batch}, {rule}", batch, [f"optimizer.lr_scaling={rule}", *warmup]))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.task
        write_synthetic(data, args.task, size=32, train=args.train, test=args.test)
        for index, (name, batch, overrides) in enumerate(settings):
            records = train(args, data, Path(tmp) / f"run{index}", batch, overrides)
            ema = "ema.enabled=false" not in overrides
            results.append({"name": name, "global_batch": batch, "overrides": overrides, "ema": ema,
                            "curve": curves(records, batch)})  # fmt: skip
            final = results[-1]["curve"]
            print(f"{name:>32}: gain {final['gain'][-1]:+.2f} dB (raw {final['gain_raw'][-1]:+.2f}) after "
                  f"{final['images'][-1]} images, {final['seconds'][-1]:.0f} s", flush=True)  # fmt: skip
    summarize(results, args.target_gain if args.target_gain is not None else results[0]["curve"]["gain"][-1])
    target = results[0]["target_gain_db"]
    figures = {
        "benchmark": "time_to_quality",
        "task": args.task,
        "images": args.images,
        "eval_every_images": args.eval_every,
        "warmup_images": args.warmup_images,
        "target_gain_db": target,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
