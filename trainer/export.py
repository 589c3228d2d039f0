"""CLIDOC"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.checkpoint.export import export
from trainer.checkpoint.format import (
    CheckpointError,
)
from trainer.config.checks import ConfigError


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options translate and evaluate share: --weights, --step, --best, --device, --bf16."""
    parser.add_argument("--weights", required=True, help="export directory, or run directory (newest checkpoint)")
    parser.add_argument("--step", type=int, help="with a run directory: this checkpoint step")
    parser.add_argument("--best", action="store_true", help="with a run directory: the eval.select best checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="run the generators under bf16 autocast")


def inference_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: `auto` is this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    sys.exit(main())
