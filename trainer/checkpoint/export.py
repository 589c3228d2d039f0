"""Exported generators: writing them (the end of training, `python -m trainer.export`) and loading them (translate,
evaluate), with the command-line options those share.

An export is written whole or not at all: into DIR.tmp, made fresh, with COMPLETE (the sha256 of each file) in
it and in DIR/raw, then renamed to DIR (an existing DIR is renamed to DIR.old first and deleted after; debris of
an interrupted export is removed by the next). Loading checks model.json's bounds, each file against COMPLETE
(an export of an earlier version has none: loaded with a warning) and that every weight is finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from shards.bounded_read import BoundedReadError, parse_json, read_json, read_limited
from shards.cpu_budget import cpu_budget
from shards.pixels import PixelFormat
from trainer.algorithms.bounds import check_model_bounds, unit_parameters
from trainer.checkpoint.format import (
    CHECKPOINTS,
    COMPLETE,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    read_best,
    read_train_state,
    verify_checkpoint,
)
from trainer.checkpoint.resume import find_resume
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.model import CONTRASTIVE_FAMILIES, ModelConfig
from trainer.config.schema import Config
from trainer.config.sections import EXTRA_CHANNELS, DataConfig
from trainer.models import build_generator
from trainer.runtime.cpu_threads import apply_threads, torch_threads
from trainer.runtime.engine import EMA_UNIT
from trainer.runtime.run_files import fsync_dir, remove, write_file

MODEL_JSON = "model.json"

MAX_SMALL_JSON = 1 << 20
"""Bytes read at most from an export's model.json or COMPLETE."""

HEADER_BYTES = 16 << 20
"""Allowance for a safetensors file's header: a generator file may hold 8 bytes per parameter of the model plus this."""


def generator_names(model_cfg: ModelConfig) -> tuple[str, ...]:
    """The generators of model.family: g_xy and g_yx for CycleGAN, g_xy alone for CUT/FastCUT (whose PatchNCE
    head is for training only and not exported)."""
    return ("g_xy",) if model_cfg.family in CONTRASTIVE_FAMILIES else ("g_xy", "g_yx")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raises ConfigError naming `source` and the first tensor holding NaN or infinite values."""
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor.float()).all():
            raise ConfigError(f"{source}: {key} holds NaN or infinite values; refusing weights that are not finite")


def save_generators(
    out_dir: Path, gens_state: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig
) -> None:
    """An export directory of these generators alone (see `save_export`)."""
    save_export(out_dir, gens_state, None, model_cfg, data_cfg)


def save_export(
    out_dir: Path,
    raw: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
) -> None:
    """Publish an export directory of the generators evaluation used (see `_export_files`): the moving average when
    there is one, with the raw generators as an export of their own in out_dir/raw; else the raw ones.

    Raises:
        ConfigError: a weight is not finite, or out_dir is something other than an export, a link or empty.
    """
    out_dir = Path(out_dir)
    if ema is None:
        tree = {".": _export_files(raw, model_cfg, data_cfg, "raw", out_dir)}
    else:
        ema_files = _export_files(ema, model_cfg, data_cfg, "ema", out_dir)
        tree = {".": ema_files, "raw": _export_files(raw, model_cfg, data_cfg, "raw", out_dir / "raw")}
    _publish(out_dir, tree)


def _export_files(
    gens_state: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig, weights: str, out_dir: Path
) -> dict[str, bytes]:
    """The files of one export directory from the generator unit's full state dict (keys `g_xy.*`, `g_yx.*`):
    g_xy.safetensors and g_yx.safetensors (see `generator_names`) and model.json (architecture, training
    resolution, the extra input channels' kind, and which `weights` these are: "raw" or "ema").

    Raises:
        ConfigError: a weight is NaN or infinite (naming out_dir and the tensor).
    """
    files = {}
    for name in generator_names(model_cfg):
        prefix = f"{name}."
        tensors = {k[len(prefix) :]: v.contiguous() for k, v in gens_state.items() if k.startswith(prefix)}
        check_finite(tensors, f"export {out_dir}: {name}")
        files[f"{name}.safetensors"] = save(tensors)
    bits = {"x": data_cfg.x_bits or 8, "y": data_cfg.y_bits or 8}
    meta = {"model": dataclasses.asdict(model_cfg), "image_size": data_cfg.crop_size, "extra": data_cfg.extra,
            "bits": bits, "weights": weights}  # fmt: skip
    files[MODEL_JSON] = json.dumps(meta, indent=2).encode()
    return files


def _publish(out_dir: Path, tree: dict[str, dict[str, bytes]]) -> None:
    """Write each directory of `tree` (relative to out_dir) with its COMPLETE into a fresh out_dir.tmp, then rename
    it to out_dir. Files are created with O_EXCL | O_NOFOLLOW and links are replaced, never followed."""
    staging, aside = (out_dir.with_name(out_dir.name + suffix) for suffix in (".tmp", ".old"))
    if not os.path.lexists(out_dir) and stat.S_ISDIR(_lstat_mode(aside)):
        os.rename(aside, out_dir)  # the previous export, left aside by a save that died between its two renames
    _check_replaceable(out_dir)
    remove(staging)
    remove(aside)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(staging)
    for sub, files in tree.items():
        directory = staging / sub
        directory.mkdir(exist_ok=sub == ".")
        for name, data in files.items():
            write_file(directory / name, data)
        hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        write_file(directory / COMPLETE, json.dumps(hashes, indent=2))
        fsync_dir(directory)
    if os.path.lexists(out_dir):
        os.rename(out_dir, aside)
    os.rename(staging, out_dir)
    fsync_dir(out_dir.parent)
    remove(aside)


def _check_replaceable(out_dir: Path) -> None:
    """Raises ConfigError unless out_dir is missing, a link (replaced, never followed), empty or an export."""
    mode = _lstat_mode(out_dir)
    if not mode:
        return
    export_or_empty = stat.S_ISDIR(mode) and (os.path.lexists(out_dir / MODEL_JSON) or not os.listdir(out_dir))
    if stat.S_ISLNK(mode) or export_or_empty:
        return
    raise ConfigError(f"{out_dir} exists and is neither an export ({MODEL_JSON}) nor empty; refusing to replace it")


def _lstat_mode(path: Path) -> int:
    """The st_mode of `path` itself (a link is not followed); 0 when nothing is there."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


@dataclass
class ExportedGenerators:
    g_xy: nn.Module  # the paper's G: X -> Y, in eval mode
    g_yx: nn.Module | None  # the paper's F: Y -> X (None for CUT/FastCUT)
    model: ModelConfig
    image_size: int  # the training resolution
    extra: str  # data.extra of the training run
    bits: dict[str, int] = dataclasses.field(default_factory=lambda: {"x": 8, "y": 8})  # each domain's bit depth

    def pixel_format(self, domain: str) -> PixelFormat:
        """The format of `domain`'s images: what the generator from it takes, what the one to it writes."""
        return PixelFormat(self.model.channels(domain), self.bits[domain])

    def direction_formats(self, direction: str) -> tuple[PixelFormat, PixelFormat]:
        """(source, target) formats of `direction` ("x2y" or "y2x")."""
        return self.pixel_format(direction[0]), self.pixel_format(direction[2])


def generators_from_weights(
    weights: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    image_size: int,
    extra: str,
    source: str,
    bits: dict[str, int] | None = None,
) -> ExportedGenerators:
    """Build G and F (G alone for CUT/FastCUT) from full weights (keys `g_xy.*`, `g_yx.*`) in eval mode.

    Raises:
        ConfigError: the weights do not fit the architecture (one line naming `source` and the first mismatch).
    """
    nets: list[nn.Module | None] = [None, None]
    for index, name in enumerate(generator_names(model_cfg)):
        net = build_generator(model_cfg, *(("x", "y") if name == "g_xy" else ("y", "x")))
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
    return ExportedGenerators(nets[0], nets[1], model_cfg, image_size, extra, bits or {"x": 8, "y": 8})


def load_generators(path: str | Path) -> ExportedGenerators:
    """Load exported generators (safetensors: nothing is unpickled) in eval mode, after checking model.json's bounds
    (`check_model_bounds`), each file against COMPLETE and every weight for NaN and infinities. An export without
    COMPLETE (written by an earlier version) is loaded unchecked against hashes, with a warning on stderr.

    Raises:
        ConfigError: one line naming the export and the file that is missing, damaged, out of bounds or not finite.
    """
    path = Path(path)
    source = f"export {path}"
    hashes = _read_marker(path)
    meta_source = f"{source}: {MODEL_JSON}"
    try:
        meta = parse_json(_read_export_file(path, MODEL_JSON, hashes, MAX_SMALL_JSON), meta_source)
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict) and type(meta.get("image_size")) is int):
        raise ConfigError(f"{meta_source}: expected a JSON object with model (a mapping) and image_size (an integer)")
    extra = meta.get("extra", "none")
    if not isinstance(extra, str) or extra not in EXTRA_CHANNELS:
        raise ConfigError(f"{meta_source}: extra={extra!r:.40} is not one of {', '.join(EXTRA_CHANNELS)}")
    model_cfg = check_model_bounds(meta["model"], meta_source, meta["image_size"])
    if model_cfg.in_channels != model_cfg.channels("x") + EXTRA_CHANNELS[extra]:
        raise ConfigError(f"{meta_source}: model.input_nc={model_cfg.input_nc} does not fit extra={extra}")
    bits = meta.get("bits", {"x": 8, "y": 8})  # exports of earlier versions: 8-bit
    if not (isinstance(bits, dict) and set(bits) == {"x", "y"} and all(b in (8, 16) for b in bits.values())):
        raise ConfigError(f"{meta_source}: bits={bits!r:.60} is not {{x: 8 or 16, y: 8 or 16}}")
    limit = 8 * unit_parameters(model_cfg) + HEADER_BYTES
    weights = {}
    for name in generator_names(model_cfg):
        file = f"{name}.safetensors"
        try:
            tensors = load(_read_export_file(path, file, hashes, limit))
        except (SafetensorError, KeyError) as err:  # KeyError: a dtype torch does not have
            raise ConfigError(f"{source}: {file} is not a valid safetensors file ({err!s:.120})") from None
        check_finite(tensors, f"{source}: {file}")
        weights.update({f"{name}.{k}": v for k, v in tensors.items()})
    return generators_from_weights(weights, model_cfg, meta["image_size"], extra, source, bits)


def _read_marker(path: Path) -> dict[str, str] | None:
    """The sha256 of each file of the export `path` from its COMPLETE; None (with a warning) when it has none."""
    marker = path / COMPLETE
    if not os.path.lexists(marker):
        print(f"warning: export {path} has no {COMPLETE} (an export of an earlier version): its files are not "
              "checked against their sha256", file=sys.stderr)  # fmt: skip
        return None
    try:
        hashes = read_json(marker, "export marker", MAX_SMALL_JSON)
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise ConfigError(f"export {path}: {COMPLETE} is not a mapping of file names to sha256 digests")
    return hashes


def _read_export_file(path: Path, name: str, hashes: dict[str, str] | None, limit: int) -> bytes:
    """The bytes of the export's regular file `name` (at most `limit`), checked against `hashes` when given."""
    try:
        data = read_limited(path / name, limit, "export file")
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None
    if hashes is not None:
        if name not in hashes:
            raise ConfigError(f"export {path}: {COMPLETE} does not list {name}")
        if hashlib.sha256(data).hexdigest() != hashes[name]:
            raise ConfigError(f"export {path} is damaged: {name} does not match its sha256 in {COMPLETE}")
    return data


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
    saved_model = read_train_state(checkpoint)["model"]  # the architecture stored with the weights, if any
    source = f"checkpoint {checkpoint}: {TRAIN_STATE}" if saved_model is not None else str(run_dir / "config.yaml")
    model = check_model_bounds(cfg.model if saved_model is None else saved_model, source, cfg.data.crop_size)
    cfg = dataclasses.replace(cfg, model=model)
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
        return load_generators(path)
    if (path / "config.yaml").is_file():
        cfg, checkpoint, raw, ema = checkpoint_weights(path, step, best)
        weights = raw if ema is None else ema  # what the run's evaluation measured
        check_finite(weights, f"checkpoint {checkpoint}: {UNIVERSAL}")
        bits = {"x": cfg.data.x_bits or 8, "y": cfg.data.y_bits or 8}
        return generators_from_weights(weights, cfg.model, cfg.data.crop_size, cfg.data.extra, str(checkpoint), bits)
    raise ConfigError(f"--weights {path}: neither an export directory (model.json) nor a run directory (config.yaml)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options translate and evaluate share: --weights, --step, --best, --device, --bf16."""
    parser.add_argument("--weights", required=True, help="export directory, or run directory (newest checkpoint)")
    parser.add_argument("--step", type=int, help="with a run directory: this checkpoint step")
    parser.add_argument("--best", action="store_true", help="with a run directory: the eval.select best checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="run the generators under bf16 autocast")


def inference_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: `auto` is this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU; torch's threads
    are this process's share of the CPUs (trainer.runtime.cpu_threads)."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    apply_threads(torch_threads("auto", device.type == "cuda", 0, cpu_budget())[0])
    return device
