"""Translation quality with torchmetrics, the library part: PSNR and SSIM of G(x) against the known answer T(x)
and of F(y) against x (synthetic data) beside the identity baseline, cycle reconstruction L1 for any data, and FID
and KID of G(x) against real y and of F(y) against real x when a local Inception network is given. Each rank
evaluates its share of the test set; torchmetrics reduces the states over ranks, so N ranks give the numbers of one.
Training evaluates through `Evaluator`; `python -m trainer.evaluate` is the command line around it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torchmetrics import MeanAbsoluteError, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # not re-exported without torch-fidelity, not needed
from torchmetrics.image.kid import KernelInceptionDistance  # with our own feature network

from trainer.config import ConfigError, EvalConfig
from trainer.cyclegan import with_extra
from trainer.data import TestSet

NO_INCEPTION = (
    "FID/KID skipped: set eval.inception_weights (CLI: --inception-weights) to a local TorchScript Inception-v3 "
    "such as inception-2015-12-05.pt; nothing is downloaded"
)
NO_KNOWN_ANSWER = (
    "PSNR/SSIM skipped: they need test images with a known answer (paired synthetic shards); these test images are "
    "unpaired, so cycle L1 and FID/KID are computed"
)
SELECT_KEYS = {  # eval.select -> (metrics averaged into the score, sign that makes higher better)
    "psnr": (("eval/psnr_g_xy", "eval/psnr_g_yx"), 1.0),
    "fid": (("eval/fid_x", "eval/fid_y"), -1.0),
    "cycle": (("eval/cycle_l1_x", "eval/cycle_l1_y"), -1.0),
}


class InceptionFeatures(nn.Module):
    """A TorchScript Inception feature network (uint8 [N, 3, H, W] in, `return_features=True`) behind images in
    [-1, 1]; `num_features` tells torchmetrics the feature size."""

    def __init__(self, scripted: torch.jit.ScriptModule, num_features: int) -> None:
        super().__init__()
        self.net = scripted
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        with torch.autocast(images.device.type, enabled=False):
            return self.net(pixels, return_features=True).float()


def load_inception(path: str, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Load `path` (eval.inception_weights) and check it on one image.

    Raises:
        ConfigError: a missing file, or one that is not such a TorchScript network.
    """
    if not Path(path).is_file():
        raise ConfigError(f"eval.inception_weights={path} does not exist")
    expected = "a TorchScript Inception-v3 taking uint8 images and return_features=True (inception-2015-12-05.pt)"
    try:
        scripted = torch.jit.load(path, map_location=device).eval()
        with torch.no_grad():
            probe = scripted(torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=device), return_features=True)
    except Exception as err:  # torch.jit raises RuntimeError, ValueError or TorchScript's own errors
        raise ConfigError(f"eval.inception_weights={path} is not {expected}: {str(err).splitlines()[0]}") from None
    if probe.ndim != 2 or probe.shape[0] != 2:
        raise ConfigError(f"eval.inception_weights={path} gave features of shape {tuple(probe.shape)}; expected [N, D]")
    return InceptionFeatures(scripted, int(probe.shape[1]))


class SplitFreeKID(KernelInceptionDistance):
    """torchmetrics' KID, made independent of how the images were split over ranks.

    Its feature states are lists that torchmetrics gathers element by element (dist_reduce_fx=None), so ranks that
    ran different numbers of updates (uneven shares) would pair up the wrong collectives: `pack` leaves one tensor
    per state on each rank first. The gathered rows come in rank order, and KID draws seeded random subsets of
    rows, so `compute` sorts them into an order of their own; it also caps the subset size at the rows there are
    (unreadable test images are skipped after the size was chosen from the image counts).
    """

    def __init__(self, inception: InceptionFeatures, subset_size: int) -> None:
        super().__init__(inception, subset_size=subset_size, reset_real_features=False)
        self.num_features = inception.num_features
        self.max_subset_size = subset_size

    def pack(self) -> None:
        """One feature tensor per state on this rank ([0, D] without images); call before `compute`."""
        for state in ("real_features", "fake_features"):
            rows = getattr(self, state)
            empty = torch.empty(0, self.num_features, device=self.device)
            setattr(self, state, [torch.cat(rows) if rows else empty])

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = []
        for state in ("real_features", "fake_features"):  # all ranks' rows here: compute runs on synced states
            rows = torch.cat(getattr(self, state))
            setattr(self, state, [rows[rows[:, 0].argsort(stable=True)]])
            counts.append(len(rows))
        self.subset_size = min(self.max_subset_size, *counts)
        if self.subset_size < 2:
            nan = torch.tensor(float("nan"), device=self.device)
            return nan, nan
        return super().compute()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, batch-norm running stats) and no autograd for the block, then back as it was."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class Evaluator:
    """Evaluates generator pairs on one rank's share of a fixed test set; call it after each training interval.

    Every rank runs the same number of generator forwards (shorter shares run a padding batch whose outputs are
    ignored), because under ZeRO-3 each forward is a collective. The real images' Inception features are computed
    on the first call only.
    """

    def __init__(
        self,
        test: TestSet,
        cfg: EvalConfig,
        input_nc: int,
        device: torch.device,
        world_size: int = 1,
        inception: InceptionFeatures | None = None,
    ) -> None:
        self.test, self.cfg, self.input_nc, self.device, self.world_size = test, cfg, input_nc, device, world_size
        self.inception = inception
        self.metrics: dict[str, Metric] = {
            "cycle_l1_x": MeanAbsoluteError(),
            "cycle_l1_y": MeanAbsoluteError(),
        }
        if test.paired:
            for name in ("identity", "g_xy", "g_yx"):
                self.metrics[f"psnr_{name}"] = PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3))
                self.metrics[f"ssim_{name}"] = StructuralSimilarityIndexMeasure(data_range=2.0)
        if inception is not None:
            subset = min(cfg.kid_subset_size, test.total_x, test.total_y)
            for domain in ("x", "y"):
                self.metrics[f"fid_{domain}"] = FrechetInceptionDistance(inception, reset_real_features=False)
                if subset >= 2:
                    with warnings.catch_warnings():  # "saves all features": intended, test sets are small
                        warnings.simplefilter("ignore", UserWarning)
                        self.metrics[f"kid_{domain}"] = SplitFreeKID(inception, subset)
        for metric in self.metrics.values():
            metric.to(device)
        self.real_done = False

    def __call__(
        self, g_xy: nn.Module, g_yx: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
    ) -> dict[str, float]:
        """eval/ metrics of G = g_xy and F = g_yx (in eval mode: see `eval_mode`), equal on every rank."""
        autocast = autocast or contextlib.nullcontext
        for metric in self.metrics.values():
            metric.reset()  # FID/KID keep their real features (reset_real_features=False)
        test = self.test
        directions = (
            ("x", test.x, test.extra_x, test.total_x, g_xy, g_yx, test.y),
            ("y", test.y, test.extra_y, test.total_y, g_yx, g_xy, test.x),
        )
        with torch.no_grad():
            for domain, images, extra, total, forward, backward, partner in directions:
                for start, rows, batch, batch_extra in self._batches(images, extra, total):
                    with autocast():
                        fake = forward(with_extra(batch, batch_extra))
                        rec = backward(with_extra(fake, batch_extra))
                    if rows:
                        target = partner[start : start + rows].to(self.device) if test.paired else None
                        self._update(domain, batch[:rows], fake[:rows].float(), rec[:rows].float(), target)
        self.real_done = True
        for metric in self.metrics.values():
            if isinstance(metric, SplitFreeKID):
                metric.pack()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # KID draws random subsets: the same ones on every rank and every call
            values = {name: metric.compute() for name, metric in self.metrics.items()}
        out = {"eval/images_x": float(test.total_x), "eval/images_y": float(test.total_y)}
        for name, value in values.items():
            if name.startswith("kid_"):
                out[f"eval/{name}"], out[f"eval/{name}_std"] = float(value[0]), float(value[1])
            else:
                out[f"eval/{name}"] = float(value)
        if test.paired:
            out["eval/psnr_gain_xy"] = out["eval/psnr_g_xy"] - out["eval/psnr_identity"]
            out["eval/psnr_gain_yx"] = out["eval/psnr_g_yx"] - out["eval/psnr_identity"]
        return out

    def _batches(
        self, images: torch.Tensor, extra: torch.Tensor | None, total: int
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(start, valid rows, images, extras) on the device, as many batches as the largest share needs."""
        size = self.cfg.batch_size
        for start in range(0, math.ceil(total / self.world_size), size):
            chunk = images[start : start + size]
            if len(chunk) == 0:  # padding: this rank's share is shorter than the largest
                side = images.shape[-1]
                pad = torch.zeros(1, self.input_nc, side, side, device=self.device)
                yield start, 0, pad[:, :3], (pad[:, 3:] if self.input_nc > 3 else None)
                continue
            chunk_extra = None if extra is None else extra[start : start + size].to(self.device)
            yield start, len(chunk), chunk.to(self.device), chunk_extra

    def _update(
        self, domain: str, real: torch.Tensor, fake: torch.Tensor, rec: torch.Tensor, target: torch.Tensor | None
    ) -> None:
        """Update with real images of `domain`, their translation, reconstruction and (paired data) the known
        answer of the translation."""
        m = self.metrics
        m[f"cycle_l1_{domain}"].update(rec, real)
        if target is not None:
            direction = "g_xy" if domain == "x" else "g_yx"
            m[f"psnr_{direction}"].update(fake, target)
            m[f"ssim_{direction}"].update(fake, target)
            if domain == "x":
                m["psnr_identity"].update(real, target)
                m["ssim_identity"].update(real, target)
        if self.inception is not None:
            other = "y" if domain == "x" else "x"
            for kind in ("fid", "kid"):
                if f"{kind}_{other}" in m:
                    m[f"{kind}_{other}"].update(fake, real=False)
                if f"{kind}_{domain}" in m and not self.real_done:
                    m[f"{kind}_{domain}"].update(real, real=True)


def selection_score(metrics: dict[str, float], select: str) -> float:
    """The eval.select score of an evaluation, higher is better (FID and cycle L1 are negated).

    Raises:
        ConfigError: the evaluation lacks the metrics (psnr without a known answer, fid without Inception).
    """
    keys, sign = SELECT_KEYS[select]
    missing = [k for k in keys if k not in metrics]
    if missing:
        why = "a test split with a known answer (synthetic data)" if select == "psnr" else "eval.inception_weights"
        raise ConfigError(f"eval.select={select} needs {missing[0]}, which needs {why}")
    return sign * sum(metrics[k] for k in keys) / len(keys)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:>12.4f}" for k, v in metrics.items())
