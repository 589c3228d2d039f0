"""The training loop's work on intervals, each part deciding itself when it is due: sample grids
(logging.image_every_steps), evaluation with best-checkpoint selection (eval.every_steps, eval.select) and
checkpoints (checkpoint.every_steps, a new best, a preemption stop). The metric window (logging.every_steps) is
trainer.metric_window's. What a checkpoint holds is trainer.train_state's; how it is written, trainer.checkpoint's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import AsyncCheckpointWriter, save_checkpoint
from trainer.config import CheckpointConfig, ModelConfig
from trainer.console import Console
from trainer.data import TestSet
from trainer.engine import Engine
from trainer.evaluation import Evaluator, eval_mode, selection_score
from trainer.preemption import PreemptionFlag
from trainer.tracking import Tracker, image_grid
from trainer.train_state import TrainState


def is_due(step: int, every: int, total: int) -> bool:
    """True after update `step` (1-based) when it is a multiple of `every` (0: never) or the last one, `total`."""
    return step == total or (every > 0 and step % every == 0)


class SampleGrids:
    """Rows of the fixed sample images (chosen at startup) through the generators - x | G(x) | F(G(x)) and
    y | F(y) | G(F(y)) for CycleGAN, x | G(x) and y | G(y) for CUT/FastCUT - every `every_steps` updates and at the
    last; never without sample images."""

    def __init__(self, engine: Engine, samples: TestSet | None, every_steps: int, total_steps: int):
        self.engine, self.samples = engine, samples
        self.every_steps, self.total_steps = every_steps, total_steps

    def due(self, step: int) -> bool:
        return self.samples is not None and is_due(step, self.every_steps, self.total_steps)

    def __call__(self, gens: torch.nn.Module) -> dict[str, np.ndarray]:
        """The grids of the generator unit `gens` (its plain module), by name: {"x_to_y", "y_to_x"} for CycleGAN,
        {"x_to_y", "y_identity"} for CUT/FastCUT (see their `sample_columns`)."""
        samples = self.samples
        with self.engine.autocast(), eval_mode(gens):
            columns = gens.sample_columns(samples.x, samples.y, samples.extra_x, samples.extra_y)
            return {name: image_grid([list(row) for row in zip(*images)]) for name, images in columns.items()}


class PeriodicEval:
    """The test-split evaluation every `every_steps` updates and at the last (never without a test split), and
    under eval.select the decision whether it is the best so far (the same on every rank)."""

    def __init__(self, engine: Engine, evaluator: Evaluator | None, every_steps: int, total_steps: int, select: str):
        self.engine, self.evaluator, self.select = engine, evaluator, select
        self.every_steps, self.total_steps = every_steps, total_steps

    def due(self, step: int) -> bool:
        return self.evaluator is not None and is_due(step, self.every_steps, self.total_steps)

    def measure(self, gens: torch.nn.Module) -> dict[str, float]:
        """The eval/ metrics of the generator unit `gens` (its plain module; a collective), without selection: both
        directions of a CycleGAN pair, X -> Y of CUT's generator (g_yx None)."""
        with eval_mode(gens):
            return self.evaluator(gens.g_xy, gens.g_yx, self.engine.autocast)

    def __call__(self, gens: torch.nn.Module, best: dict[str, Any] | None) -> tuple[dict[str, float], dict | None]:
        """Evaluate the generator unit `gens` (its plain module; a collective).

        Args:
            best: the best record so far ({select, score, metrics}) or None.

        Returns:
            (the metrics, with eval/select_score under eval.select; the new best record when these metrics beat
            `best` on any rank, else None).
        """
        metrics = self.measure(gens)
        if self.select == "none":
            return metrics, None
        metrics["eval/select_score"] = score = selection_score(metrics, self.select)
        if not self.engine.any_rank(best is None or score > best["score"]):
            return metrics, None
        return metrics, {"select": self.select, "score": score, "metrics": metrics}


class Checkpointer:
    """Saves the training state every checkpoint.every_steps updates, at the last, for a new best and when the run
    stops on a signal (checked every checkpoint.preempt_check_steps updates), and logs each save."""

    def __init__(
        self,
        engine: Engine,
        run_dir: Path,
        cfg: CheckpointConfig,
        total_steps: int,
        model: ModelConfig,
        config_hash: str,
        tracker: Tracker,
        console: Console,
        preemption: PreemptionFlag,
    ):
        """`model` and `config_hash`: the run's facts for train_state.json (see TrainState.meta)."""
        self.engine, self.run_dir, self.cfg, self.total_steps = engine, run_dir, cfg, total_steps
        self.model, self.config_hash = model, config_hash
        self.tracker, self.console, self.preemption = tracker, console, preemption
        self.last_saved: Path | None = None
        self.writer = AsyncCheckpointWriter(engine, engine.cfg.timeout_s) if cfg.async_save else None

    def stop_requested(self, step: int) -> bool:
        """Whether a signal asks the run to stop after update `step` (a collective on the check steps)."""
        return step % self.cfg.preempt_check_steps == 0 and self.engine.any_rank(self.preemption.raised)

    def due(self, step: int, new_best: bool, stopping: bool) -> bool:
        return stopping or new_best or is_due(step, self.cfg.every_steps, self.total_steps)

    def save(self, state: TrainState, best: dict[str, Any] | None = None) -> Path:
        """Save `state` after its update state.step (a collective), as the new best when `best` is given. Under
        checkpoint.async_save the files are written in the background (`finish` waits for them)."""
        step, started = state.step, time.perf_counter()
        if best is not None:
            state.best = best
        meta = state.meta(self.model, self.config_hash)
        rank_state, keep, keep_every = state.rank_state(), self.cfg.keep, self.cfg.keep_every_steps
        if self.writer is None:
            path = save_checkpoint(self.engine, self.run_dir, step, rank_state, meta, keep, keep_every, best)
        else:
            path = self.writer.save(self.run_dir, step, rank_state, meta, keep, keep_every, best)
        stall = time.perf_counter() - started
        self.preemption.saved_step = step
        logged = {"checkpoint/saved_step": step, "checkpoint/stall_s": stall, **self._replica_check(step)}
        self.tracker.log(step, {**logged, **({"eval/best_step": step} if best is not None else {})})
        self.last_saved = path
        return path

    def finish(self) -> None:
        """Wait for a checkpoint still being written (a collective; raises CheckpointError if it failed)."""
        if self.writer is not None:
            self.writer.wait()

    def _replica_check(self, step: int) -> dict[str, float]:
        """run/replica_spread (see Engine.replica_spread), with a warning when ranks differ."""
        spread = self.engine.replica_spread()
        if spread is None:
            return {}
        if spread > 0:
            self.console.message(f"warning: ranks hold different weights at step {step} (relative spread {spread:.3g})")
        return {"run/replica_spread": spread}
