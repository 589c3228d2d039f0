"""Translation quality on the test split: PSNR of G(x) against the known answer T(x) (synthetic data) beside the
identity baseline, and cycle reconstruction error for any data.

    python -m trainer.evaluate --weights RUN/export --data DATA_DIR [--images 64]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from trainer.config import DataConfig
from trainer.cyclegan import with_extra
from trainer.data import TestSet, load_test_images


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1]."""
    value = peak_signal_noise_ratio(pred.float(), target.float(), data_range=2.0, dim=(1, 2, 3))
    return float(value)


@torch.no_grad()
def translation_metrics(g_xy: nn.Module, g_yx: nn.Module, test: TestSet, batch_size: int = 16) -> dict[str, float]:
    """eval/ metrics of the generators on the test images (in [-1, 1]).

    With paired data (y[k] = T(x[k])) PSNR of g_xy(x) vs y and g_yx(y) vs x, and the identity baseline PSNR(x, y).
    """
    x, y = test.x, test.y

    def apply(net: nn.Module, images: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        extras = [None] * len(images) if extra is None else extra.split(batch_size)
        return torch.cat([net(with_extra(c, e)) for c, e in zip(images.split(batch_size), extras)]).float()

    fake_y, fake_x = apply(g_xy, x, test.extra_x), apply(g_yx, y, test.extra_y)
    rec_x, rec_y = apply(g_yx, fake_y, test.extra_x), apply(g_xy, fake_x, test.extra_y)
    metrics = {
        "eval/cycle_l1_x": float((rec_x - x).abs().mean()),
        "eval/cycle_l1_y": float((rec_y - y).abs().mean()),
    }
    if test.paired:
        identity = psnr(x, y)
        metrics.update(
            {
                "eval/psnr_identity": identity,
                "eval/psnr_g_xy": psnr(fake_y, y),
                "eval/psnr_g_yx": psnr(fake_x, x),
            }
        )
        metrics["eval/psnr_gain_xy"] = metrics["eval/psnr_g_xy"] - identity
        metrics["eval/psnr_gain_yx"] = metrics["eval/psnr_g_yx"] - identity
    return metrics


def main(argv: list[str] | None = None) -> None:
    from trainer.checkpoint import load_generators

    parser = argparse.ArgumentParser(description="Evaluate exported generators on a shard directory's test split.")
    parser.add_argument("--weights", required=True, help="export directory (RUN/export) with g_xy/g_yx safetensors")
    parser.add_argument("--data", required=True, help="shard directory with x-test and y-test splits")
    parser.add_argument("--images", type=int, default=64, help="test images per domain")
    args = parser.parse_args(argv)
    exported = load_generators(args.weights)
    data_cfg = DataConfig(
        root=args.data, load_size=exported.image_size, crop_size=exported.image_size, extra=exported.extra
    )
    test = load_test_images(data_cfg, args.images)
    if test is None:
        raise SystemExit(f"{args.data}: no x-test/y-test splits to evaluate on")
    print(json.dumps(translation_metrics(exported.g_xy, exported.g_yx, test), indent=2))


if __name__ == "__main__":
    main()
