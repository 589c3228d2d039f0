"""Tiled translation of large images (translate --tile): peak memory against the image's size, time, and the
difference to the untiled translation at seams.

    python benchmarks/tiled_translate.py [--sizes 2000,8000] [--whole 2000] [--tile 1024] [--halo 48] [--compare 1024]

Each size runs `python -m trainer.translate` in a fresh process on one synthetic grey 16-bit PNG (smooth shapes
and noise) of side N, with an export of configs/demo-cpu.yaml's generator built from its seed (the weights do not
change how tiling behaves): its peak RSS, wall time and the bytes of its input and output pixels (2 bytes each,
held whole); --whole sizes run untiled (--tile 0) for comparison. `--compare` translates one image of that side
both whole and tiled in this process and reports the largest difference of the 16-bit outputs, over the image and
within a halo of the core boundaries. Writes JSON (benchmarks/results/tiled_translate.json).
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


def scene(side: int, seed: int = 0) -> np.ndarray:
    """A 16-bit grey image [side, side, 1]: gradients, discs and noise."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0, 1, side, dtype=np.float32)
    image = 0.3 + 0.3 * np.sin(7 * axis)[:, None] * np.cos(5 * axis)[None, :]
    for _ in range(12):
        centre, radius = rng.uniform(0, side, 2).astype(np.float32), rng.uniform(0.02, 0.1) * side
        rows = (np.arange(side, dtype=np.float32) - centre[0])[:, None] ** 2
        image[rows + (np.arange(side, dtype=np.float32) - centre[1])[None, :] ** 2 < radius**2] += 0.3
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 65535).astype(np.uint16)[..., None]


def demo_export(out: Path) -> Path:
    """An export of the demo config's generators for 16-bit grey X and Y, initialized from its seed."""
    from trainer.checkpoint.export import save_generators
    from trainer.config.load import load_config
    from trainer.models import build_generator

    cfg = load_config(REPO / "configs/demo-cpu.yaml", ["model.x_channels=1", "model.y_channels=1", "data.x_bits=16",
                                                        "data.y_bits=16"])  # fmt: skip
    import torch

    torch.manual_seed(cfg.train.seed)
    state = {f"{name}.{k}": v for name, direction in (("g_xy", ("x", "y")), ("g_yx", ("y", "x")))
             for k, v in build_generator(cfg.model, *direction).state_dict().items()}  # fmt: skip
    save_generators(out, state, cfg.model, cfg.data)
    return out


def run_size(side: int, export: Path, work: Path, tile: int, halo: int) -> dict:
    """Translate one image of `side` px in a fresh process: peak RSS, wall time, pixel bytes."""
    from shards.pixels import encode_file

    source = work / f"in{side}"
    source.mkdir(parents=True)
    (source / "scene.png").write_bytes(encode_file(scene(side), ".png"))
    cmd = [sys.executable, "-m", "trainer.translate", "--weights", str(export), "--direction", "x2y", "--input",
           str(source), "--out", str(work / f"out{side}"), "--tile", str(tile), "--halo", str(halo)]  # fmt: skip
    measured = [sys.executable, "-c", MEASURE, *cmd]  # its own parent, so ru_maxrss is this translation's alone
    start = time.monotonic()
    result = subprocess.run(measured, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    if result.returncode:
        raise SystemExit(f"translate failed on {side} px: {result.stderr[-2000:]}")
    peak_kib = int(result.stdout.strip().splitlines()[-1])
    return {"side": side, "tile": tile, "halo": halo, "wall_s": round(wall, 1), "peak_rss_mib": round(peak_kib / 1024),
            "pixel_bytes_mib": round(2 * side * side * 2 / 2**20)}  # fmt: skip


MEASURE = (
    "import resource, subprocess, sys; status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(status)"
)
"""Runs a command and prints its peak RSS (KiB)."""


def compare(side: int, export: Path, tile: int, halo: int) -> dict:
    """The tiled translation of one image against the whole one, in 16-bit levels."""
    import torch

    from trainer.checkpoint.export import load_generators
    from trainer.models.tiling import tile_rows
    from trainer.translate import translate_batches

    gens = load_generators(export)
    image = torch.from_numpy(scene(side, seed=1).astype(np.int32)).permute(2, 0, 1)
    whole = list(translate_batches(gens, "x2y", [("a", image, None)]))[0][2].long()[0]
    tiled = list(translate_batches(gens, "x2y", [("a", image, None)], tiling=(tile, halo)))[0][2].long()[0]
    difference = (whole - tiled).abs()
    near = torch.zeros(side, side, dtype=torch.bool)  # within a halo of a boundary between two cores
    for row in tile_rows(side, side, tile, halo):
        for top, left, bottom, right in (t.core for t in row):
            for edge in (e for e in (top, bottom) if 0 < e < side):
                near[max(edge - halo, 0) : edge + halo] = True
            for edge in (e for e in (left, right) if 0 < e < side):
                near[:, max(edge - halo, 0) : edge + halo] = True
    return {"side": side, "tile": tile, "halo": halo, "max_abs_diff_16bit": int(difference.max()),
            "max_abs_diff_near_seams": int(difference[near].max()) if near.any() else 0,
            "max_abs_diff_away_from_seams": int(difference[~near].max()),
            "pixels_differing": int((difference > 0).sum()), "pixels": side * side}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000", help="image sides, comma-separated")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--halo", type=int, default=48, help="7/8 of it covers the demo ResNet's 34 px radius")
    parser.add_argument("--whole", default="2000", help="sides also translated untiled (--tile 0), comma-separated")
    parser.add_argument(
        "--compare", type=int, default=1024, help="side of the whole-vs-tiled comparison, in tiles of half --tile (0: "
        "none)"
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tiled_translate.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = demo_export(work / "export")
        rows = [run_size(int(side), export, work / "tiled", args.tile, args.halo) for side in args.sizes.split(",")]
        rows += [run_size(int(side), export, work / "whole", 0, args.halo) for side in args.whole.split(",") if side]
        seams = compare(args.compare, export, args.tile // 2, args.halo) if args.compare else None
    body = {"machine": platform.processor() or platform.machine(), "rows": rows, "seams": seams}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=2))
    print(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
