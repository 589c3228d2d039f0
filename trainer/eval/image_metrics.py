"""PSNR, SSIM and mean absolute error of image batches in plain torch, accumulated on the device over any number of
batches and reduced over ranks with one all_reduce for all of them. They compute what torchmetrics'
PeakSignalNoiseRatio(dim=(1, 2, 3)), StructuralSimilarityIndexMeasure and MeanAbsoluteError compute (checked
against them in tests/unit/test_eval_metrics.py) without importing torchmetrics, which costs every process ~1.7 s
at startup. FID/KID are not here: they stay torchmetrics' (trainer/eval/inception_metrics.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class MeanMetric:
    """A running sum and count, float64 on the device; the value is sum / count (NaN before any update)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum, count]

    def reset(self) -> None:
        self.totals.zero_()

    def add(self, total: torch.Tensor, count: int) -> None:
        self.totals[0] += total.double()
        self.totals[1] += count

    def compute(self) -> float:
        """This rank's value; `reduce_means` gives the value over all ranks."""
        return (self.totals[0] / self.totals[1]).item()


class PSNR(MeanMetric):
    """Mean over images of 10 log10(data_range^2 / MSE of the image)."""

    def __init__(self, data_range: float, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.data_range = data_range

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add the images of `preds` [N, C, H, W] against `target` [N, C, H, W]."""
        mse = (preds.float() - target.float()).square().flatten(1).mean(1)  # [N]
        self.add((10 * torch.log10(self.data_range**2 / mse)).sum(), len(preds))


class SSIM(MeanMetric):
    """Mean over images of the SSIM map's mean (Wang et al. 2004, https://doi.org/10.1109/TIP.2003.819861).

    As torchmetrics (>= 1.4.2; earlier versions dropped the map's 5-pixel border) computes it: an 11x11 Gaussian
    window (sigma 1.5), images reflect-padded by 5 so the map has the image's size, local variances clamped at 0,
    C1 = (0.01 data_range)^2 and C2 = (0.03 data_range)^2.
    """

    def __init__(self, data_range: float, device: torch.device | str = "cpu", sigma: float = 1.5) -> None:
        super().__init__(device)
        self.c1, self.c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        size = int(3.5 * sigma + 0.5) * 2 + 1  # 11 for sigma 1.5
        offsets = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        gauss = torch.exp(-((offsets / sigma) ** 2) / 2)
        gauss = gauss / gauss.sum()
        self.window = torch.outer(gauss, gauss)  # [size, size], sums to 1

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add the images of `preds` [N, C, H, W] against `target` [N, C, H, W] (H, W > 5)."""
        n, channels = preds.shape[:2]
        pad = (len(self.window) - 1) // 2
        a = F.pad(preds.float(), (pad, pad, pad, pad), mode="reflect")
        b = F.pad(target.float(), (pad, pad, pad, pad), mode="reflect")
        window = self.window.expand(channels, 1, -1, -1)
        # Local means of a, b, a^2, b^2 and ab in one depthwise convolution.
        moments = F.conv2d(torch.cat((a, b, a * a, b * b, a * b)), window, groups=channels)
        mu_a, mu_b, mean_aa, mean_bb, mean_ab = moments.split(n)
        var_a = (mean_aa - mu_a**2).clamp(min=0)
        var_b = (mean_bb - mu_b**2).clamp(min=0)
        cov = mean_ab - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + self.c1) * (2 * cov + self.c2)) / (
            (mu_a**2 + mu_b**2 + self.c1) * (var_a + var_b + self.c2)
        )  # [N, C, H, W]
        self.add(ssim_map.flatten(1).mean(1).sum(), n)


class MeanAbsoluteError(MeanMetric):
    """Sum of |preds - target| over all elements seen, divided by their number."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.add((preds.float() - target.float()).abs().sum(), preds.numel())


def reduce_means(metrics: dict[str, MeanMetric]) -> dict[str, float]:
    """The value of each metric over all ranks: sums and counts added up in one all_reduce when torch.distributed
    runs more than one rank, so every rank must call this with the same metric names in the same order."""
    if not metrics:
        return {}
    totals = torch.stack([metric.totals for metric in metrics.values()])  # [M, 2]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)  # SUM
    return dict(zip(metrics, (totals[:, 0] / totals[:, 1]).tolist()))


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Images [N, C, H, W] in another channel count, as a plain conversion would make them (the identity baseline
    between domains of different channel counts): one channel from the luma of the first three (ITU-R 601) or the
    single one; from one channel by repeating it; otherwise the first `channels`, the last one repeated."""
    count = images.shape[1]
    if count == channels:
        return images
    if channels == 1 and count >= 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
        return (images[:, :3] * weights[None, :, None, None]).sum(1, keepdim=True)
    return images[:, [min(c, count - 1) for c in range(channels)]]
