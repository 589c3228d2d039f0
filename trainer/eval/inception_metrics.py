"""FID and KID of generated images against real ones with torchmetrics and a local Inception feature network.

trainer/eval/evaluator.py imports this module only when eval.inception_weights is set, so processes without FID/KID
never import torchmetrics (~1.7 s of startup per process). Loading the Inception network stays in evaluation.py.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance  # not re-exported without torch-fidelity, not needed
from torchmetrics.image.kid import KernelInceptionDistance  # with our own feature network

if TYPE_CHECKING:
    from trainer.eval.evaluator import InceptionFeatures


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


def build_inception_metrics(
    inception: InceptionFeatures,
    kid_subset_size: int,
    device: torch.device,
    domains: tuple[str, ...] = ("x", "y"),
) -> dict[str, FrechetInceptionDistance | SplitFreeKID]:
    """fid_x, kid_x, fid_y, kid_y on `device` for the `domains` fakes are made in, in that order (the order every
    rank computes them in); KID only when `kid_subset_size` >= 2. Real features are kept over resets
    (reset_real_features=False).

    Args:
        inception: the feature network (`load_inception`).
        kid_subset_size: KID's subset size, at most the smaller test set's image count.
        device: where the metric states live.
        domains: ("x", "y") for a generator pair; ("y",) for CUT's one generator X -> Y.
    """
    metrics: dict[str, FrechetInceptionDistance | SplitFreeKID] = {}
    for domain in domains:
        metrics[f"fid_{domain}"] = FrechetInceptionDistance(inception, reset_real_features=False)
        if kid_subset_size >= 2:
            with warnings.catch_warnings():  # "saves all features": intended, test sets are small
                warnings.simplefilter("ignore", UserWarning)
                metrics[f"kid_{domain}"] = SplitFreeKID(inception, kid_subset_size)
    for metric in metrics.values():
        metric.to(device)
    return metrics


def compute_inception_metrics(metrics: dict[str, Metric]) -> dict[str, float]:
    """Each metric's value over all ranks (torchmetrics syncs its states inside `compute`, one metric after the
    other in dict order, so every rank makes the same collectives); KID gives `kid_D` and `kid_D_std`."""
    for metric in metrics.values():
        if isinstance(metric, SplitFreeKID):
            metric.pack()
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # KID draws random subsets: the same ones on every rank and every call
        for name, metric in metrics.items():
            value = metric.compute()
            if name.startswith("kid_"):
                out[name], out[f"{name}_std"] = float(value[0]), float(value[1])
            else:
                out[name] = float(value)
    return out
