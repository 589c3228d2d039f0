"""Non-finite losses and gradients: the engine skips a unit's update whose gradient norm is NaN or infinite; this
module counts the skips (logged as loss/nonfinite_g and loss/nonfinite_d) and stops a run that keeps producing
them, before it wastes its allocation on NaN losses."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from trainer.checkpoint.format import complete_checkpoints


class TrainingDiverged(RuntimeError):
    """A unit skipped train.max_nonfinite_steps updates in a row: its loss or gradients stay NaN or infinite."""


class NonfiniteGuard:
    """Counts the updates each unit skipped for a NaN or infinite loss or gradient norm (the engine skips them) and
    the longest run of consecutive ones, on the device: no host sync per step. Under fp16 an infinite gradient norm
    is the loss scaler's business (it skips the step and lowers the scale); only a non-finite loss counts there."""

    def __init__(self, max_consecutive: int, fp16: bool):
        self.max_consecutive, self.fp16 = max_consecutive, fp16
        self.skipped: dict[str, torch.Tensor] = {}
        self.streak: dict[str, torch.Tensor] = {}
        self.worst: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Account one step's stats (loss/{g,d}_total and grad_norm/{g,d})."""
        for unit in ("g", "d"):
            bad = ~torch.isfinite(stats[f"loss/{unit}_total"])
            if not self.fp16:
                bad = bad | ~torch.isfinite(stats[f"grad_norm/{unit}"].to(bad.device))
            bad = bad.float()
            self.skipped[unit] = self.skipped.get(unit, 0) + bad
            self.streak[unit] = (self.streak.get(unit, 0) + 1) * bad
            self.worst[unit] = torch.maximum(self.worst.get(unit, bad), self.streak[unit])

    def take(self) -> dict[str, torch.Tensor]:
        """loss/nonfinite_g and loss/nonfinite_d: updates skipped since the last call."""
        counts = {f"loss/nonfinite_{unit}": value for unit, value in self.skipped.items()}
        self.skipped = {}
        return counts

    def check(self, any_rank: Callable[[bool], bool], step: int, run_dir: Path) -> None:
        """Stop the run (on every rank) once a unit skipped max_consecutive updates in a row; `any_rank` (a
        collective) makes the decision the same on every rank.

        Raises:
            TrainingDiverged: one line naming the unit, the step and the newest checkpoint.
        """
        worst = {unit: int(value.max().item()) for unit, value in self.worst.items()}
        self.worst = dict(self.streak)
        unit = max(worst, key=worst.get, default="g")
        if any_rank(worst.get(unit, 0) >= self.max_consecutive):
            newest = (complete_checkpoints(run_dir) or [None])[-1]
            names = {"g": "generators", "d": "discriminators"}
            raise TrainingDiverged(
                f"training diverged: the {names[unit]} skipped {worst.get(unit, 0)} consecutive updates with a NaN or "
                f"infinite loss or gradient norm by step {step} (train.max_nonfinite_steps={self.max_consecutive}); "
                f"the newest checkpoint, {newest or 'none'}, holds finite weights; lower optimizer.lr or check the data"
            )
