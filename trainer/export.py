"""Export the generators of a checkpoint as safetensors, whatever backend and world size trained them.

    python -m trainer.export RUN [--step N] [--out DIR]

Reads RUN/config.yaml and the checkpoint's backend-independent units.safetensors (the newest intact checkpoint,
or step N) and writes DIR (default RUN/export-step_N) with g_xy.safetensors (G: X->Y), g_yx.safetensors (F: Y->X)
and model.json. Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from trainer.checkpoint import CHECKPOINTS, UNIVERSAL, CheckpointError, find_resume, save_generators, verify_checkpoint
from trainer.config import ConfigError, load_config


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write the generators of `run_dir`'s checkpoint (newest intact one, or `step`); returns the directory.

    Raises:
        CheckpointError: no intact checkpoint (at that step).
        ConfigError: run_dir has no readable config.yaml.
    """
    cfg = load_config(run_dir / "config.yaml")
    if step is None:
        checkpoint = find_resume(run_dir, "auto")
        if checkpoint is None:
            raise CheckpointError(f"{run_dir / CHECKPOINTS} holds no intact checkpoint")
    else:
        checkpoint = run_dir / CHECKPOINTS / f"step_{step:08d}"
        verify_checkpoint(checkpoint)
    units = load_file(str(checkpoint / UNIVERSAL))
    weights = {
        key[len("g/") :]: value
        for key, value in units.items()
        if key.startswith("g/") and not key.endswith((".exp_avg", ".exp_avg_sq", "__step__"))
    }
    out = out or run_dir / f"export-{checkpoint.name}"
    save_generators(out, weights, cfg.model, cfg.data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export G and F of a training run's checkpoint as safetensors.")
    parser.add_argument("run", type=Path, help="run directory (train.run_dir)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest intact one)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/export-step_N)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.step, args.out)
    except (CheckpointError, ConfigError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
