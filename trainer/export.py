"""Exported generators: writing and loading them (the end of training, translate, evaluate), and the CLI that
exports the generators of a checkpoint as safetensors, whatever backend and world size trained them.

    python -m trainer.export RUN [--step N | --best] [--out DIR]

Reads RUN/config.yaml and the checkpoint's backend-independent units.safetensors (the newest intact checkpoint,
step N, or the best one by eval.select) and writes DIR (default RUN/export-step_N) with g_xy.safetensors
(G: X->Y), g_yx.safetensors (F: Y->X; CUT/FastCUT have no F) and model.json. A run with ema.enabled exports
the generators' moving average there (what its evaluation measured) and the raw generators in DIR/raw. Nothing
is unpickled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from trainer.checkpoint import (
    CHECKPOINTS,
    UNIVERSAL,
    CheckpointError,
    find_resume,
    read_best,
    read_train_state,
    verify_checkpoint,
    write_atomic,
)
from trainer.config import CONTRASTIVE_FAMILIES, Config, ConfigError, DataConfig, ModelConfig, from_dict, load_config
from trainer.engine import EMA_UNIT
from trainer.models import build_generator


def generator_names(model_cfg: ModelConfig) -> tuple[str, ...]:
    """The generators of model.family: g_xy and g_yx for CycleGAN, g_xy alone for CUT/FastCUT (whose PatchNCE
    head is for training only and not exported)."""
    return ("g_xy",) if model_cfg.family in CONTRASTIVE_FAMILIES else ("g_xy", "g_yx")


def save_generators(
    out_dir: Path,
    gens_state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    weights: str = "raw",
) -> None:
    """Write g_xy.safetensors and g_yx.safetensors (see `generator_names`) from the generator unit's full state
    dict (keys `g_xy.*`, `g_yx.*`), plus model.json (architecture, training resolution, the extra input channels'
    kind, and which `weights` these are: "raw" or "ema")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in generator_names(model_cfg):
        prefix = f"{name}."
        tensors = {k[len(prefix) :]: v.contiguous() for k, v in gens_state.items() if k.startswith(prefix)}
        write_atomic(out_dir / f"{name}.safetensors", save(tensors))
    meta = {"model": dataclasses.asdict(model_cfg), "image_size": data_cfg.crop_size, "extra": data_cfg.extra,
            "weights": weights}  # fmt: skip
    write_atomic(out_dir / "model.json", json.dumps(meta, indent=2))


def save_export(
    out_dir: Path,
    raw: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
) -> None:
    """An export directory (see `save_generators`) of the generators evaluation used: the moving average when
    there is one, with the raw generators as an export of their own in out_dir/raw; else the raw ones."""
    if ema is None:
        save_generators(out_dir, raw, model_cfg, data_cfg)
        shutil.rmtree(out_dir / "raw", ignore_errors=True)  # of an earlier export with an average
        return
    save_generators(out_dir, ema, model_cfg, data_cfg, weights="ema")
    save_generators(out_dir / "raw", raw, model_cfg, data_cfg)


@dataclass
class ExportedGenerators:
    g_xy: nn.Module  # the paper's G: X -> Y, in eval mode
    g_yx: nn.Module | None  # the paper's F: Y -> X (None for CUT/FastCUT)
    model: ModelConfig
    image_size: int  # the training resolution
    extra: str  # data.extra of the training run


def generators_from_weights(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, image_size: int, extra: str, source: str
) -> ExportedGenerators:
    """Build G and F (G alone for CUT/FastCUT) from full weights (keys `g_xy.*`, `g_yx.*`) in eval mode.

    Raises:
        ConfigError: the weights do not fit the architecture (one line naming `source` and the first mismatch).
    """
    nets: list[nn.Module | None] = [None, None]
    for index, name in enumerate(generator_names(model_cfg)):
        net = build_generator(model_cfg)
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        expected = net.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            example = (
                f"{reshaped[0]} is {tuple(state[reshaped[0]].shape)}, expected {tuple(expected[reshaped[0]].shape)}"
                if reshaped
                else f"e.g. {(missing or unexpected)[0]}"
            )
            raise ConfigError(
                f"{source}: the {name} weights do not fit generator={model_cfg.generator} ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(reshaped)} of another shape; {example})"
            )
        net.load_state_dict(state)
        nets[index] = net.eval()
    return ExportedGenerators(nets[0], nets[1], model_cfg, image_size, extra)


def load_generators(path: str | Path) -> ExportedGenerators:
    """Load exported generators (safetensors: nothing is unpickled) in eval mode.

    Raises:
        ConfigError: a missing or unreadable export, or weights that do not fit its model.json.
    """
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found; expected a directory written by training's export")
    meta = json.loads(meta_path.read_text())
    model_cfg = from_dict(ModelConfig, meta["model"], "model.")
    weights = {}
    for name in generator_names(model_cfg):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ConfigError(f"{file} not found; the export is incomplete")
        weights.update({f"{name}.{k}": v for k, v in load_file(str(file)).items()})
    return generators_from_weights(weights, model_cfg, int(meta["image_size"]), meta.get("extra", "none"), str(path))


def checkpoint_weights(
    run_dir: Path, step: int | None = None, best: bool = False
) -> tuple[Config, Path, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The run's config, the chosen checkpoint (newest intact one, `step`, or the best), its raw generator weights
    and their moving average, or None without one (keys `g_xy.*`, `g_yx.*`).

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
    found = {}
    for unit in ("g", EMA_UNIT):
        prefix = f"{unit}/"
        found[unit] = {
            key[len(prefix) :]: value
            for key, value in units.items()
            if key.startswith(prefix) and not key.endswith((".exp_avg", ".exp_avg_sq", "__step__"))
        }
    return cfg, checkpoint, found["g"], found[EMA_UNIT] or None


def export(run_dir: Path, step: int | None = None, out: Path | None = None, best: bool = False) -> Path:
    """Write the generators of `run_dir`'s checkpoint (see `checkpoint_weights` and `save_export`); returns the
    directory."""
    cfg, checkpoint, raw, ema = checkpoint_weights(run_dir, step, best)
    out = out or run_dir / f"export-{checkpoint.name}"
    save_export(out, raw, ema, cfg.model, cfg.data)
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
        cfg, checkpoint, raw, ema = checkpoint_weights(path, step, best)
        weights = raw if ema is None else ema  # what the run's evaluation measured
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
