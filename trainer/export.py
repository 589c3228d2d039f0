"""Export the generators of a checkpoint as safetensors, whatever backend and world size trained them:

    python -m trainer.export RUN [--step N | --best] [--out DIR]

Reads RUN/config.yaml and the checkpoint's backend-independent units.safetensors (the newest intact checkpoint,
step N, or the best one by eval.select) and writes DIR (default RUN/export-step_N) with g_xy.safetensors
(G: X->Y), g_yx.safetensors (F: Y->X; CUT/FastCUT have no F) and model.json. A run with ema.enabled exports
the generators' moving average there (what its evaluation measured) and the raw generators in DIR/raw. Nothing
is unpickled. The format, and how an export is written whole or not at all, are trainer.checkpoint.export's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint.export import export
from trainer.checkpoint.format import CheckpointError
from trainer.config.checks import ConfigError
from trainer.runtime.process_exit import exit_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export G and F of a training run's checkpoint as safetensors.")
    parser.add_argument("run", type=Path, help="run directory (train.run_dir)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest intact one)")
    parser.add_argument("--best", action="store_true", help="the best checkpoint by eval.select (best.json)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/export-step_N)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.step, args.out, args.best)
    except (CheckpointError, ConfigError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    exit_process(main())  # without the interpreter teardown of torch (about 0.6 s)
