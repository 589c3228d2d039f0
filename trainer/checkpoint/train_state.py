"""TrainState: everything a resume needs and a checkpoint records about the training's progress - the update count,
the images seen, the best evaluation so far, the W&B run id, and (per rank) the data position and the two image
pools - with how it is built from a loaded checkpoint and turned into the checkpoint's `meta` and `rank_state`.

It does not save or load anything itself (trainer.checkpoint does, and owns the file format) and holds no weights,
optimizer or RNG state (the engine's, saved by checkpoint.save_checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from trainer.algorithms.pool import ImagePool
from trainer.config.model import ModelConfig
from trainer.data.loader import UnpairedLoader

POOL_KEYS = ("pool_x", "pool_y")  # rank_state keys of the pools of fakes for d_x and d_y


def comparable_best(record: dict[str, Any] | None, select: str) -> dict[str, Any] | None:
    """The best record from before a resume (best.json: {step, select, score, metrics}) when it was chosen by the
    same eval.select metric; a best by another metric does not compare, and eval.select=none keeps none."""
    return record if select != "none" and record and record["select"] == select else None


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """The progress of one run, current after every update (`step` is set by the loop)."""

    loader: UnpairedLoader
    """This rank's data loader: its position is saved per rank."""
    pools: tuple[ImagePool, ImagePool]
    """This rank's history pools of fake x and fake y images."""
    global_batch: int
    """Images per domain per update in this run (all ranks and micro-batches)."""
    step: int = 0
    """Optimizer updates done (of each unit)."""
    start_step: int = 0
    """The update this run began after: 0, or the step of the checkpoint it resumed."""
    images_before: int = 0
    """Images per domain seen before start_step, as counted by earlier runs (their global batch may differ)."""
    best: dict[str, Any] | None = None
    """The best evaluation so far under eval.select ({select, score, metrics}), or None."""
    wandb_run_id: str | None = None
    """The W&B run to continue (None without W&B)."""
    saved_world_size: int | None = None
    """The world size of the run that wrote the checkpoint this run resumed (None for a fresh run)."""

    @property
    def images_seen(self) -> int:
        """Images per domain seen by the end of update `step`, across resumes."""
        return self.images_before + (self.step - self.start_step) * self.global_batch

    def load(self, saved: dict[str, Any], rank_state: dict[str, Any], device: torch.device) -> str | None:
        """Continue after a loaded checkpoint; returns what of the data position was not continued, in words.

        Args:
            saved: its train_state.json.
            rank_state: this rank's state as load_checkpoint returns it (after a change of world size or backend
                only "data": the pools then start empty).
        """
        self.step = self.start_step = saved["step"]
        # Written before images were counted (or 0): the steps times this run's global batch
        self.images_before = saved.get("images_seen") or self.step * self.global_batch
        self.wandb_run_id = saved.get("wandb_run_id")
        self.saved_world_size = saved.get("world_size")
        note = self.loader.load_state_dict(rank_state["data"])
        for pool, key in zip(self.pools, POOL_KEYS):
            if key in rank_state:
                pool.load_state_dict(rank_state[key], device)
        return note

    def meta(self, model: ModelConfig, config_hash: str) -> dict[str, Any]:
        """The facts for train_state.json (beside the step, world size and backend that save_checkpoint adds)."""
        return {
            "model": dataclasses.asdict(model),
            "wandb_run_id": self.wandb_run_id,
            "images_seen": self.images_seen,
            "config_hash": config_hash,
        }

    def rank_state(self) -> dict[str, Any]:
        """This rank's own part of a checkpoint: the pools and the data position."""
        return {
            **{key: pool.state_dict() for key, pool in zip(POOL_KEYS, self.pools)},
            "data": self.loader.state_dict(),
        }
