"""Quality on the known-answer tasks of other image formats, scored on the written outputs at their own depth.

    python benchmarks/format_quality.py [--tasks grey16,colour2grey] [--steps 600] [--out FILE]

For each task, configs/demo-cpu.yaml trains on `builtin:TASK` in a fresh process; `trainer.translate` writes G's
translation of the x-test split (16-bit PNGs for grey16, grey PNGs for colour2grey); each written file is read back
and scored against y-test's known answer at the target's bit depth (PSNR with peak 2^bits - 1), beside the identity
(x itself in Y's format: the luma where Y has one channel). Writes JSON (benchmarks/results/format_quality.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def psnr(a: np.ndarray, b: np.ndarray, peak: int) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak**2 / max(error, 1e-12)))


def test_pairs(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (x, known answer y) of a built-in set's test splits."""
    import webdataset as wds

    from shards.decode import image_extension
    from shards.pixels import read_pixels

    pairs: dict[str, list] = {}
    for domain in ("x", "y"):
        for url in sorted(root.glob(f"{domain}-test-*.tar")):
            for sample in wds.WebDataset(str(url), shardshuffle=False):
                pairs.setdefault(sample["__key__"], []).append(read_pixels(sample[image_extension(sample)], 1 << 26))
    return {key: (x, y) for key, (x, y) in pairs.items()}


def run_task(task: str, steps: int, work: Path) -> dict:
    from shards.pixels import convert_pixels, format_of, read_pixels
    from shards.synthetic import builtin_root

    run_dir, out = work / task, work / f"{task}-out"
    train = [sys.executable, "trainer/main.py", "--config", "configs/demo-cpu.yaml", f"data.root=builtin:{task}",
             f"train.run_dir={run_dir}", f"train.steps={steps}", "train.resume=none"]  # fmt: skip
    start = time.monotonic()
    subprocess.run(train, cwd=REPO, check=True, capture_output=True)
    seconds = time.monotonic() - start
    root = builtin_root(f"builtin:{task}")
    translate = [sys.executable, "-m", "trainer.translate", "--weights", str(run_dir / "export"), "--direction",
                 "x2y", "--input", str(root), "--out", str(out)]  # fmt: skip
    subprocess.run(translate, cwd=REPO, check=True, capture_output=True)
    scores, identity = [], []
    for key, (x, y) in test_pairs(root).items():
        written = read_pixels((out / f"{key}.png").read_bytes(), 1 << 26)
        target = format_of(y)
        assert format_of(written) == target, (key, format_of(written), target)
        scores.append(psnr(written, y, target.max_value))
        identity.append(psnr(convert_pixels(x, target), y, target.max_value))
    return {"task": task, "steps": steps, "train_s": round(seconds, 1), "images": len(scores),
            "format_x": format_of(x).describe(), "format_y": target.describe(),
            "psnr_written": round(float(np.mean(scores)), 2), "psnr_identity": round(float(np.mean(identity)), 2),
            "gain_db": round(float(np.mean(scores) - np.mean(identity)), 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="grey16,colour2grey")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/format_quality.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_task(task, args.steps, Path(tmp)) for task in args.tasks.split(",")]
    body = {"machine": platform.processor() or platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=2))
    print(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
