"""Export the generators of a checkpoint as safetensors, whatever backend and world size trained them.

    python -m trainer.export RUN [--step N | --best] [--out DIR]

Reads RUN/config.yaml and the checkpoint's backend-independent units.safetensors (the newest intact checkpoint,
step N, or the best one by eval.select) and writes DIR (default RUN/export-step_N) with g_xy.safetensors
(G: X->Y), g_yx.safetensors (F: Y->X) and model.json. Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.checkpoint import (
    CHECKPOINTS,
    UNIVERSAL,
    CheckpointError,
    ExportedGenerators,
    find_resume,
    generators_from_weights,
    load_generators,
    read_best,
    read_train_state,
    save_generators,
    verify_checkpoint,
)
from trainer.config import Config, ConfigError, ModelConfig, from_dict, load_config


def checkpoint_weights(
    run_dir: Path, step: int | None = None, best: bool = False
) -> tuple[Config, Path, dict[str, torch.Tensor]]:
    """The run's config, the chosen checkpoint (newest intact one, `step`, or the best) and its generator weights
    (keys `g_xy.*`, `g_yx.*`).

    Raises:
        CheckpointError: no intact checkpoint (at that step), or no best one recorded.
        ConfigError: run_dir has no readable config.yaml.
    """
    cfg = load_config(run_dir / "config.yaml")
    if best:
        record = read_best(run_dir)
        if record is None:
            raise CheckpointError(f"{run_dir / CHECKPOINTS} has no best checkpoint (train with eval.select)")
        step = record["step"]
    if step is None:
        checkpoint = find_resume(run_dir, "auto")
        if checkpoint is None:
            raise CheckpointError(f"{run_dir / CHECKPOINTS} holds no intact checkpoint")
    else:
        checkpoint = run_dir / CHECKPOINTS / f"step_{step:08d}"
        verify_checkpoint(checkpoint)
    saved_model = read_train_state(checkpoint)["model"]
    if saved_model is not None:  # the architecture stored with the weights, whatever config.yaml says now
        cfg = dataclasses.replace(cfg, model=from_dict(ModelConfig, saved_model, "model."))
    try:
        units = load_file(str(checkpoint / UNIVERSAL))
    except Exception as err:  # safetensors' own error type for a malformed file
        raise CheckpointError(f"checkpoint {checkpoint}: {UNIVERSAL} is unreadable ({err!s:.120})") from None
    weights = {
        key[len("g/") :]: value
        for key, value in units.items()
        if key.startswith("g/") and not key.endswith((".exp_avg", ".exp_avg_sq", "__step__"))
    }
    return cfg, checkpoint, weights


def export(run_dir: Path, step: int | None = None, out: Path | None = None, best: bool = False) -> Path:
    """Write the generators of `run_dir`'s checkpoint (see `checkpoint_weights`); returns the directory."""
    cfg, checkpoint, weights = checkpoint_weights(run_dir, step, best)
    out = out or run_dir / f"export-{checkpoint.name}"
    save_generators(out, weights, cfg.model, cfg.data)
    return out


def load_inference_generators(path: str | Path, step: int | None = None, best: bool = False) -> ExportedGenerators:
    """G and F in eval mode from an export directory (model.json) or a run directory (config.yaml: its newest
    intact checkpoint, `step`, or the best one). `path` is what the user gave as --weights.

    Raises:
        ConfigError, CheckpointError: one line naming the path and what is wrong (a missing path, a file such as
            one of an export's .safetensors instead of its directory, an unreadable export).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--weights {path} does not exist")
    if not path.is_dir():
        what = "is a file" if path.is_file() else "is not a directory"
        if (path.parent / "model.json").is_file():
            raise ConfigError(f"--weights {path} {what}; give the export directory that holds it ({path.parent})")
        expected = "expected an export directory (model.json) or a run directory (config.yaml)"
        raise ConfigError(f"--weights {path} {what}; {expected}")
    if (path / "model.json").is_file():
        if step is not None or best:
            raise ConfigError(f"{path} is an export directory; --step and --best choose among a run's checkpoints")
        try:
            return load_generators(path)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, SafetensorError) as err:  # malformed model.json or safetensors
            raise ConfigError(f"--weights {path}: unreadable export ({type(err).__name__}: {err!s:.120})") from None
    if (path / "config.yaml").is_file():
        cfg, checkpoint, weights = checkpoint_weights(path, step, best)
        return generators_from_weights(weights, cfg.model, cfg.data.crop_size, cfg.data.extra, str(checkpoint))
    raise ConfigError(f"--weights {path}: neither an export directory (model.json) nor a run directory (config.yaml)")


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
