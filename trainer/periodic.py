"""The training loop's work on intervals, each part deciding itself when it is due (`due(step)`) and doing it:
the metric window (logging.every_steps), sample grids (logging.image_every_steps), evaluation with best-checkpoint
selection (eval.every_steps, eval.select) and checkpoints (checkpoint.every_steps, a new best, a preemption stop).
What a checkpoint holds is trainer.checkpoint.train_state's; how it is written, trainer.checkpoint.save's.

The metric window: per-step stats are summed on the device (no host sync per step); at the interval's end one
collective (Engine.gather_scalars) brings every rank's values (the stats, data epochs and counters, memory, images/s
per rank, own time and data wait per update, non-finite update counts): the window averages them over ranks, sums
the data counters, logs min/median/max of the per-rank timing and memory with the slowest rank
(trainer.observe.stragglers), adds the LRs, the timing (images/s, step time, data-wait fraction) and, under fp16,
the loss scales, hands the record to its sinks (tracker, console) and starts over. It logs nothing itself and
decides nothing about stopping (trainer.observe.nonfinite's guard does, from the counts it is fed here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from shards.manifest import sha256_file
from trainer.checkpoint.format import checkpoint_step, rank_file
from trainer.checkpoint.save import AsyncCheckpointWriter, SaveRequest, save_checkpoint, tmp_dir
from trainer.checkpoint.sharing import RunDirSharing
from trainer.checkpoint.train_state import TrainState
from trainer.checkpoint.upload import CheckpointUploader, Upload, rank_record, record_name
from trainer.config.model import ModelConfig
from trainer.config.sections import CheckpointConfig
from trainer.data.loader import UnpairedLoader
from trainer.data.test_sets import TestSet
from trainer.eval.evaluator import Evaluator, eval_mode, selection_score
from trainer.observe.console import Console
from trainer.observe.grids import image_grid
from trainer.observe.nonfinite import NonfiniteGuard
from trainer.observe.profiler import ProfileWindow
from trainer.observe.stragglers import DATA_WAIT, OWN_TIME, SLOWEST_RANK, SPREAD, StragglerWatch, slowest, spread
from trainer.observe.tracking import Tracker
from trainer.runtime.engine import Engine
from trainer.runtime.preemption import PreemptionFlag
from trainer.runtime.run_files import write_file


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


def _step_name(step: int | None) -> str:
    return f"step_{step:08d}" if step is not None else "none"


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
        uploader: CheckpointUploader | None = None,
        sharing: RunDirSharing | None = None,
    ):
        """`model` and `config_hash`: the run's facts for train_state.json (see TrainState.meta); `uploader`: under
        checkpoint.remote, the main rank's (each published checkpoint is handed to it) and that of each rank whose
        run directory is elsewhere (`sharing`), for its own files."""
        self.engine, self.run_dir, self.cfg, self.total_steps = engine, run_dir, cfg, total_steps
        self.model, self.config_hash = model, config_hash
        self.tracker, self.console, self.preemption = tracker, console, preemption
        self.uploader, self.sharing = uploader, sharing
        self.last_saved: Path | None = None
        on_saved = self._upload if uploader is not None else None
        self.writer = AsyncCheckpointWriter(engine, engine.cfg.timeout_s, on_saved) if cfg.async_save else None

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
        protect = self.uploader.pending_steps if self.uploader is not None else None
        here = self.sharing.here if self.sharing is not None else None
        request = SaveRequest(
            self.run_dir, step, state.rank_state(), meta, self.cfg.keep, self.cfg.keep_every_steps, best, protect, here
        )
        if self.writer is None:
            path = save_checkpoint(self.engine, request)
            if self.uploader is not None:
                self._upload(path)
        else:
            path = self.writer.save(request)
        stall = time.perf_counter() - started
        self.preemption.saved_step = step
        logged = {"checkpoint/saved_step": step, "checkpoint/stall_s": stall, **self._replica_check(step)}
        if self.uploader is not None and self.engine.is_main:
            logged["checkpoint/upload_lag_steps"] = self.uploader.lag_steps(step)
        self.tracker.log(step, {**logged, **({"eval/best_step": step} if best is not None else {})})
        self.last_saved = path
        return path

    def finish(self) -> None:
        """Wait for a checkpoint still being written (a collective; raises CheckpointError if it failed)."""
        if self.writer is not None:
            self.writer.wait()

    def finish_uploads(self, files: Sequence[tuple[str, Path]]) -> None:
        """(Under checkpoint.remote, each rank with an uploader) upload the run's final `files` ({store name: local
        path}; the main rank's) after the checkpoints handed over, waiting at most checkpoint.remote_final_wait_s
        for all of them, and say how it ended."""
        if self.uploader is None:
            return
        uploader, wait_s = self.uploader, self.cfg.remote_final_wait_s
        if files:
            uploader.submit(Upload(step=self.total_steps, files=tuple(files)))
        self.console.message(f"waiting up to {wait_s:g} s for the uploads to {uploader.store.url}")
        with self.engine.phase("final uploads"), self.engine.unwatched():  # bounded by wait_s itself
            finished = uploader.close(wait_s)
        if finished:
            self.console.message(f"uploaded to {uploader.store.url}: checkpoints to {_step_name(uploader.confirmed)}"
                                 f"{' and the final files' if files else ''}")  # fmt: skip
        else:
            uploader.report(
                f"warning: uploads to {uploader.store.url} did not finish within checkpoint.remote_final_wait_s="
                f"{wait_s:g} s; the newest complete checkpoint there is {_step_name(uploader.confirmed)}, the run "
                f"directory {self.run_dir} holds the rest"
            )

    def _upload(self, checkpoint: Path) -> None:
        """Hand checkpoint `checkpoint` (its final path) to the uploader once this rank's part is saved: the whole
        published checkpoint on the main rank; elsewhere this rank's file, with the record of its hash and this
        launch's attempt by which the main rank completes the checkpoint in the store."""
        assert self.uploader is not None
        step = checkpoint_step(checkpoint) or 0
        if self.engine.is_main:
            self.uploader.submit(Upload(step=step, checkpoint=checkpoint))
            return
        assert self.sharing is not None
        local, name = tmp_dir(checkpoint), rank_file(self.engine.rank)
        record = local / record_name(name)
        write_file(record, rank_record(sha256_file(local / name), self.sharing.attempt))
        remote = self.uploader.store.checkpoint(step)
        files = ((f"{remote}/{name}", local / name), (f"{remote}/{record.name}", record))
        self.uploader.submit(Upload(step=step, files=files, rank_files=True))

    def _replica_check(self, step: int) -> dict[str, float]:
        """run/replica_spread (see Engine.replica_spread), with a warning when ranks differ."""
        spread = self.engine.replica_spread()
        if spread is None:
            return {}
        if spread > 0:
            self.console.message(f"warning: ranks hold different weights at step {step} (relative spread {spread:.3g})")
        return {"run/replica_spread": spread}


Sink = Callable[[int, dict[str, float]], None]  # (step, logged): Tracker.log, Console.interval


def accumulate(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Add `stats` into `sums` key by key (on the device: no host sync)."""
    for key, value in stats.items():
        sums[key] = sums[key] + value if key in sums else value


class MetricWindow:
    """Accumulates per-step stats; `flush` reduces, times and publishes them when `due`."""

    def __init__(
        self,
        engine: Engine,
        loader: UnpairedLoader,
        nonfinite: NonfiniteGuard,
        every_steps: int,
        total_steps: int,
        rank_images_per_step: int,
        global_batch: int,
        fp16: bool,
        sinks: Sequence[Sink] = (),
        flops_per_pair: int | None = None,
        peak_flops: float | None = None,
        stragglers: StragglerWatch | None = None,
    ):
        """
        Args:
            nonfinite: fed every step's stats; its counts since the last flush are logged with the window.
            rank_images_per_step: images per domain per update on this rank (batch size x micro-batches).
            global_batch: images per domain per update on all ranks.
            fp16: log the loss scales (loss_scale/g, loss_scale/d).
            sinks: called with (step, logged) at each flush, in order.
            flops_per_pair: FLOPs of one update per image pair (trainer.observe.flops): perf/flops_per_s.
            peak_flops: one device's peak FLOP/s: perf/mfu, the FLOP/s over the peak of all ranks' devices.
            stragglers: fed each window's per-rank own time and data wait when there are several ranks.
        """
        self.engine, self.loader, self.nonfinite = engine, loader, nonfinite
        self.every_steps, self.total_steps = every_steps, total_steps
        self.rank_images_per_step, self.global_batch, self.fp16 = rank_images_per_step, global_batch, fp16
        self.sinks = tuple(sinks)
        self.flops_per_pair, self.peak_flops, self.stragglers = flops_per_pair, peak_flops, stragglers
        self.restart()

    def restart(self) -> None:
        """Start an empty window now."""
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()
        self.data_wait_s = 0.0
        self.own_s = 0.0

    @contextlib.contextmanager
    def timing_update(self) -> Iterator[None]:
        """Time the block (loading an update's data and doing it) as this rank's own time, less the time it spent
        in calls where ranks wait for each other (Engine.waited_s)."""
        start, waited = time.perf_counter(), self.engine.waited_s
        yield
        self.own_s += time.perf_counter() - start - (self.engine.waited_s - waited)

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time the block as waiting for data (perf/data_wait_fraction)."""
        start = time.perf_counter()
        yield
        self.data_wait_s += time.perf_counter() - start

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Account one update's stats (device tensors: loss terms, grad norms)."""
        accumulate(self.sums, stats)
        self.nonfinite.add(stats)
        self.steps += 1

    def due(self, step: int) -> bool:
        """Whether the window closes after update `step`: every logging.every_steps and at the last update."""
        return is_due(step, self.every_steps, self.total_steps)

    def flush(self, step: int) -> dict[str, float]:
        """Close the window after update `step`: one collective (a call on every rank), then the sinks get the
        record, then a new window starts.

        Returns:
            The record: each stat's mean over the window's steps and the ranks, loss/nonfinite_{g,d}, data/*
            (counters summed over ranks), mem/*, lr/*, perf/* and, under fp16, loss_scale/*; with several ranks
            also /min, /median and /max over the ranks of the per-rank timing and memory, and the slowest rank.
        """
        elapsed = time.perf_counter() - self.started
        rank_values = {
            **self.loader.progress(),
            **self.engine.memory_metrics(),
            "perf/images_per_s_per_rank": self.steps * self.rank_images_per_step / elapsed,
            OWN_TIME: self.own_s / self.steps,
            DATA_WAIT: self.data_wait_s / self.steps,
        }
        counters = self.loader.counters()  # totals of all ranks
        per_rank = self.engine.gather_scalars(  # one collective for everything
            {
                **{key: value / self.steps for key, value in self.sums.items()},
                **self.nonfinite.take(),
                **{key: torch.tensor(value) for key, value in {**rank_values, **counters}.items()},
            }
        )
        logged = {
            key: sum(values) if key in counters else sum(values) / len(values) for key, values in per_rank.items()
        }
        if len(per_rank[OWN_TIME]) > 1:
            logged[SLOWEST_RANK] = slowest(per_rank[OWN_TIME])
            for key in (key for key in SPREAD if key in per_rank):
                logged.update(spread(key, per_rank[key]))
            if self.stragglers is not None:
                self.stragglers.update(step, per_rank[OWN_TIME], per_rank[DATA_WAIT])
        logged.update(
            {
                "lr/g": self.engine.lr("g"),
                "lr/d": self.engine.lr("d"),
                "perf/images_per_s": self.steps * self.global_batch / elapsed,
                "perf/step_time_s": elapsed / self.steps,
                "perf/data_wait_fraction": logged[DATA_WAIT] * self.steps / elapsed,
            }
        )
        if self.flops_per_pair:
            logged["perf/flops_per_s"] = self.flops_per_pair * logged["perf/images_per_s"]
            if self.peak_flops:
                logged["perf/mfu"] = logged["perf/flops_per_s"] / (self.peak_flops * self.engine.world_size)
        if self.fp16:
            logged.update({"loss_scale/g": self.engine.loss_scale("g"), "loss_scale/d": self.engine.loss_scale("d")})
        for sink in self.sinks:
            sink(step, logged)
        self.restart()
        return logged


@dataclasses.dataclass
class IntervalWork:
    """The loop's work after each update, in order, each part when due: the metric window, the sample grids and the
    evaluation (both on the EMA weights under ema.enabled, the evaluation also on the raw ones under ema.eval_raw)
    and the checkpoint; the non-finite guard checks at each window's end and before every save."""

    engine: Engine
    tracker: Tracker
    window: MetricWindow
    nonfinite: NonfiniteGuard
    grids: SampleGrids
    evaluation: PeriodicEval
    checkpointer: Checkpointer
    profiler: ProfileWindow
    run_dir: Path
    eval_raw: bool
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the last evaluation's

    def after_step(self, step: int, state: TrainState) -> bool:
        """Do what is due after update `step` (collectives); whether the run stops now on a signal, saved."""
        engine, tracker = self.engine, self.tracker
        if self.window.due(step):
            with engine.phase("metric window"):
                self.window.flush(step)  # to the tracker and the console
                self.nonfinite.check(engine.any_rank, step, self.run_dir)
        if self.grids.due(step):
            with engine.phase("sample grids"), engine.ema_weights():
                tracker.log_images(step, self.grids(engine.unwrap("g")))
        new_best = None
        if self.evaluation.due(step):
            with engine.phase("evaluation"):
                self.metrics, new_best = self._evaluate(state.best)
                tracker.log(step, self.metrics)
        with engine.phase("stop check"):
            stopping = self.checkpointer.stop_requested(step)
        if self.checkpointer.due(step, new_best is not None, stopping):
            with engine.phase("checkpoint"):
                self.nonfinite.check(engine.any_rank, step, self.run_dir)  # never save weights a diverged run spoilt
                self.checkpointer.save(state, new_best)
        return stopping

    def _evaluate(self, best: dict[str, Any] | None) -> tuple[dict[str, float], dict | None]:
        """PeriodicEval on the EMA weights, with the raw weights' metrics as eval_raw/* under ema.eval_raw."""
        engine = self.engine
        with engine.ema_weights():
            metrics, new_best = self.evaluation(engine.unwrap("g"), best)
        if engine.ema is not None and self.eval_raw:
            raw = self.evaluation.measure(engine.unwrap("g"))
            metrics = {**metrics, **{key.replace("eval/", "eval_raw/", 1): value for key, value in raw.items()}}
        return metrics, new_best
