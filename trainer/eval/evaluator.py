"""Translation quality, the library part: PSNR and SSIM of G(x) against the known answer T(x) and of F(y) against x
(synthetic data) beside the identity baseline, cycle reconstruction L1 for any data, and FID and KID of G(x)
against real y and of F(y) against real x when a local Inception network is given. Each rank evaluates its share
of the test set and the metric states are reduced over ranks, so N ranks give the numbers of one: PSNR, SSIM and
L1 are our own (trainer/eval/image_metrics.py, one all_reduce for all of them); FID/KID are torchmetrics'
(trainer/eval/inception_metrics.py), imported only when an Inception network is given, so that processes without it
skip torchmetrics' import time. Training evaluates through `Evaluator`; `python -m trainer.evaluate` is the
command line around it.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn as nn

from trainer.algorithms.shared import with_extra
from trainer.config.checks import ConfigError
from trainer.config.sections import EvalConfig
from trainer.data.test_sets import TestSet
from trainer.eval.image_metrics import PSNR, SSIM, MeanAbsoluteError, MeanMetric, match_channels, reduce_means

if TYPE_CHECKING:
    from torchmetrics import Metric

NO_INCEPTION = (
    "FID/KID skipped: set eval.inception_weights (CLI: --inception-weights) to a local TorchScript Inception-v3 "
    "such as inception-2015-12-05.pt; nothing is downloaded"
)
NO_RGB = "FID/KID skipped: the Inception network takes RGB (grey is repeated to RGB); these images have {} channels"
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
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grey as RGB
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
    """Evaluates a generator pair (or CUT's one generator) on one rank's share of a fixed test set; call it after
    each training interval.

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
        self.metrics: dict[str, MeanMetric] = {}
        self.inception_metrics: dict[str, Metric] = {}
        self.two_way: bool | None = None  # whether the metrics were built for F too (at the first call)
        self.real_done = False

    def _build_metrics(self, two_way: bool) -> None:
        """The metrics of G alone, or of G and F (`two_way`): cycle L1 needs both, FID of domain X needs F."""
        device, test = self.device, self.test
        domains = ("x", "y") if two_way else ("y",)  # the domains fakes are made in
        self.metrics = {f"cycle_l1_{d}": MeanAbsoluteError(device) for d in ("x", "y") if two_way}
        if test.paired:
            for name in ("identity", "g_xy", "g_yx")[: 3 if two_way else 2]:  # images in [-1, 1]: a data range of 2
                self.metrics[f"psnr_{name}"] = PSNR(2.0, device)
                self.metrics[f"ssim_{name}"] = SSIM(2.0, device)
        if self.inception is not None:
            from trainer.eval.inception_metrics import build_inception_metrics  # imports torchmetrics (~1.7 s)

            subset = min(self.cfg.kid_subset_size, test.total_x, test.total_y)
            self.inception_metrics = build_inception_metrics(self.inception, subset, self.device, domains)
        self.two_way = two_way

    def __call__(
        self,
        g_xy: nn.Module,
        g_yx: nn.Module | None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> dict[str, float]:
        """eval/ metrics of G = g_xy and F = g_yx (in eval mode: see `eval_mode`), equal on every rank. Without F
        (CUT/FastCUT): G's translation of the X test images only - PSNR/SSIM of G, FID/KID of domain Y."""
        if self.two_way is None:
            self._build_metrics(g_yx is not None)
        elif self.two_way != (g_yx is not None):
            raise ValueError("an Evaluator measures either a generator pair or one generator, not both")
        autocast = autocast or contextlib.nullcontext
        for metric in [*self.metrics.values(), *self.inception_metrics.values()]:
            metric.reset()  # FID/KID keep their real features (reset_real_features=False)
        test = self.test
        directions = [("x", test.x, test.extra_x, test.total_x, g_xy, g_yx, test.y)]
        if g_yx is not None:
            directions.append(("y", test.y, test.extra_y, test.total_y, g_yx, g_xy, test.x))
        with torch.no_grad():
            for domain, images, extra, total, forward, backward, partner in directions:
                for start, rows, batch, batch_extra in self._batches(images, extra, total):
                    with autocast():
                        fake = forward(with_extra(batch, batch_extra))
                        rec = None if backward is None else backward(with_extra(fake, batch_extra)).float()[:rows]
                    if rows:
                        target = partner[start : start + rows].to(self.device) if test.paired else None
                        self._update(domain, batch[:rows], fake[:rows].float(), rec, target)
            if g_yx is None and "fid_y" in self.inception_metrics and not self.real_done:
                self._real_features("y", test.y, test.extra_y, test.total_y)
        self.real_done = True
        values = reduce_means(self.metrics)  # one all_reduce, then FID/KID's syncs in a fixed order
        if self.inception_metrics:
            from trainer.eval.inception_metrics import compute_inception_metrics

            values.update(compute_inception_metrics(self.inception_metrics))
        out = {"eval/images_x": float(test.total_x), "eval/images_y": float(test.total_y)}
        out.update({f"eval/{name}": value for name, value in values.items()})
        if test.paired:
            out["eval/psnr_gain_xy"] = out["eval/psnr_g_xy"] - out["eval/psnr_identity"]
            if g_yx is not None:
                out["eval/psnr_gain_yx"] = out["eval/psnr_g_yx"] - out["eval/psnr_identity"]
        return out

    def _real_features(self, domain: str, images: torch.Tensor, extra: torch.Tensor | None, total: int) -> None:
        """Feed the real images of `domain` to its FID/KID (once: they keep them), where no generator of this
        evaluation translates that domain's images."""
        for _, rows, batch, _ in self._batches(images, extra, total):
            if rows:
                self._add_real(domain, batch[:rows])

    def _add_real(self, domain: str, real: torch.Tensor) -> None:
        """Real images of `domain` for its FID/KID (where there are such metrics)."""
        for kind in ("fid", "kid"):
            if f"{kind}_{domain}" in self.inception_metrics:
                self.inception_metrics[f"{kind}_{domain}"].update(real, real=True)

    def _batches(
        self, images: torch.Tensor, extra: torch.Tensor | None, total: int
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(start, valid rows, images, extras) on the device, as many batches as the largest share needs."""
        size = self.cfg.batch_size
        for start in range(0, math.ceil(total / self.world_size), size):
            chunk = images[start : start + size]
            if len(chunk) == 0:  # padding: this rank's share is shorter than the largest
                side, extra_nc = images.shape[-1], self.input_nc - self.test.x.shape[1]
                pad = torch.zeros(1, images.shape[1], side, side, device=self.device)
                yield start, 0, pad, (torch.zeros(1, extra_nc, side, side, device=self.device) if extra_nc else None)
                continue
            chunk_extra = None if extra is None else extra[start : start + size].to(self.device)
            yield start, len(chunk), chunk.to(self.device), chunk_extra

    def _update(
        self,
        domain: str,
        real: torch.Tensor,
        fake: torch.Tensor,
        rec: torch.Tensor | None,
        target: torch.Tensor | None,
    ) -> None:
        """Update with real images of `domain`, their translation, reconstruction (None without F) and (paired
        data) the known answer of the translation."""
        m = self.metrics
        if rec is not None:
            m[f"cycle_l1_{domain}"].update(rec, real)
        if target is not None:
            direction = "g_xy" if domain == "x" else "g_yx"
            m[f"psnr_{direction}"].update(fake, target)
            m[f"ssim_{direction}"].update(fake, target)
            if domain == "x":  # the identity: x itself, in Y's channel count where they differ
                m["psnr_identity"].update(match_channels(real, target.shape[1]), target)
                m["ssim_identity"].update(match_channels(real, target.shape[1]), target)
        inception = self.inception_metrics
        other = "y" if domain == "x" else "x"
        for kind in ("fid", "kid"):
            if f"{kind}_{other}" in inception:
                inception[f"{kind}_{other}"].update(fake, real=False)
        if not self.real_done:
            self._add_real(domain, real)


def selection_score(metrics: dict[str, float], select: str) -> float:
    """The eval.select score of an evaluation, higher is better (FID and cycle L1 are negated).

    Raises:
        ConfigError: the evaluation lacks the metrics (psnr without a known answer, fid without Inception).
    """
    keys, sign = SELECT_KEYS[select]
    present = [k for k in keys if k in metrics]  # one direction only for CUT/FastCUT (G: psnr_g_xy, fid_y)
    if not present:
        why = "a test split with a known answer (synthetic data)" if select == "psnr" else "eval.inception_weights"
        raise ConfigError(f"eval.select={select} needs {keys[0]}, which needs {why}")
    return sign * sum(metrics[k] for k in present) / len(present)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:>12.4f}" for k, v in metrics.items())
