"""Evaluate exported or checkpointed generators on a test set (the library is trainer/eval/evaluator.py).

    python -m trainer.evaluate --weights RUN_or_EXPORT --data DATA_DIR [--images 64] [--inception-weights PATH]
    accelerate launch --config_file launch/cpu-ddp-2.yaml -m trainer.evaluate --weights ... --data ...

DATA_DIR is a shard directory with x-test and y-test splits, or image folders in the reference layout,
DATA_DIR/testA (X) and DATA_DIR/testB (Y) (trainer.data.image_folders): paired by name when both hold the same
names (testB/a.png the known answer of testA/a.png: PSNR/SSIM are scored), else unpaired.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from shards.pixels import PixelFormat
from shards.synthetic import BUILTIN_PREFIX
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig, EvalConfig
from trainer.data.image_folders import TEST_FOLDERS, has_test_folders, load_test_folders
from trainer.data.test_sets import TestSet, load_test_images
from trainer.eval.evaluator import NO_INCEPTION, NO_KNOWN_ANSWER, Evaluator, format_table, load_inception
from trainer.runtime.process_exit import exit_process


def load_test_data(
    root: str,
    image_size: int,
    extra: str,
    count: int,
    rank: int = 0,
    world_size: int = 1,
    formats: dict[str, PixelFormat] | None = None,
) -> TestSet:
    """This rank's share of the first `count` test images per domain of --data, in each domain's format: a shard
    directory's x-test and y-test splits, or the image folders root/testA and root/testB (paired when they hold
    the same names); resized to image_size either way.

    Raises:
        ConfigError: --data is neither, or holds no such test images.
    """
    data = DataConfig(root=root, load_size=image_size, crop_size=image_size, extra=extra)
    path = Path(root)
    if (path / "manifest.json").is_file():
        return shard_test_set(data, root, count, rank, world_size, formats)
    if has_test_folders(path):
        return load_test_folders(path, image_size, extra, count, data.max_image_pixels, rank, world_size, formats)
    expected = "expected a shard directory (manifest.json) or image folders testA/ (X) and testB/ (Y)"
    if root.startswith(BUILTIN_PREFIX):  # made on first use by trainer.data
        return shard_test_set(data, root, count, rank, world_size, formats)
    if not path.exists():
        raise ConfigError(f"--data {root} does not exist; {expected}")
    if not path.is_dir():
        raise ConfigError(f"--data {root} is not a directory; {expected}")
    present = [f"{name}/" for name in TEST_FOLDERS.values() if (path / name).is_dir()]
    has = f"has {present[0]} only" if present else "holds neither manifest.json nor testA/ and testB/"
    raise ConfigError(f"--data {root} {has}; {expected}")


def shard_test_set(
    data: DataConfig, root: str, count: int, rank: int, world_size: int, formats: dict[str, PixelFormat] | None
) -> TestSet:
    """`load_test_images`, which must find test splits.

    Raises:
        ConfigError: the shard directory has no x-test/y-test splits.
    """
    test = load_test_images(data, count, rank=rank, world_size=world_size, formats=formats)
    if test is None:
        raise ConfigError(f"--data {root}: no x-test/y-test splits to evaluate on")
    return test


def check_readable(test: TestSet, data: str, device: torch.device, world_size: int) -> None:
    """Each domain has at least one readable test image on some rank (a collective when world_size > 1).

    Raises:
        ConfigError: on every rank, naming the empty domain.
    """
    counts = torch.tensor([len(test.x), len(test.y)], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    for domain, count in zip("xy", counts.tolist()):
        if count == 0:
            raise ConfigError(f"--data {data}: none of the {domain.upper()} test images could be read")


def main(argv: list[str] | None = None) -> int:
    from trainer.checkpoint.export import add_inference_arguments, inference_device, load_inference_generators

    parser = argparse.ArgumentParser(
        description="Evaluate generators on a shard directory's test splits or on testA/ and testB/ image folders."
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--data", required=True, help="shard directory with x-test and y-test splits, or a folder with testA/ testB/"
    )
    parser.add_argument("--images", type=int, default=64, help="test images per domain")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--inception-weights", default="", help="local TorchScript Inception-v3 for FID/KID")
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)

    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = inference_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1:  # under accelerate launch / torchrun: each rank evaluates its share
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if args.images < 1:
            raise ConfigError(f"--images {args.images}: expected an integer >= 1 (test images per domain)")
        gens = load_inference_generators(args.weights, args.step, args.best)
        cfg = EvalConfig(images=args.images, batch_size=args.batch_size, inception_weights=args.inception_weights)
        formats = {d: gens.pixel_format(d) for d in "xy"}
        test = load_test_data(args.data, gens.image_size, gens.extra, cfg.images, rank, world_size, formats)
        check_readable(test, args.data, device, world_size)
        inception = load_inception(cfg.inception_weights, device) if cfg.inception_weights else None
    except (ConfigError, ValueError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    evaluator = Evaluator(test, cfg, gens.model.input_nc, device, world_size, inception)
    bf16 = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else None
    metrics = evaluator(gens.g_xy.to(device), None if gens.g_yx is None else gens.g_yx.to(device), bf16)
    if rank == 0:
        print(format_table(metrics))
        if not test.paired:
            print(NO_KNOWN_ANSWER)
        if inception is None:
            print(NO_INCEPTION)
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())
