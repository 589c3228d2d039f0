"""The training loop, top to bottom: setup, then per step a generator update and a discriminator update, with
logging, sample grids, evaluation and checkpoints on intervals, and exported generators at the end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from shards.remote import RemoteOptions
from trainer.build import Training, build_engine, build_evaluator, build_loader, build_training
from trainer.checkpoint.export import save_export
from trainer.checkpoint.format import CHECKPOINTS, COMPLETE, CheckpointError, read_best, step_dirs
from trainer.checkpoint.load import load_checkpoint
from trainer.checkpoint.remote_resume import (
    check_store,
    clear_store,
    fetch_where_needed,
    newest_in_store,
    resume_from_store,
)
from trainer.checkpoint.resume import check_architecture, find_resume, set_aside_damaged
from trainer.checkpoint.sharing import RunDirSharing, probe_run_dir
from trainer.checkpoint.store import CheckpointStore
from trainer.checkpoint.train_state import TrainState, comparable_best
from trainer.checkpoint.upload import CheckpointUploader
from trainer.config.checks import ConfigError
from trainer.config.load import config_yaml, to_dict
from trainer.config.schema import Config
from trainer.data.formats import aspect_note, data_manifest, domain_formats, formats_note, resolve_formats
from trainer.data.loader import UnpairedLoader
from trainer.data.test_sets import TestSet, load_test_images
from trainer.eval.evaluator import Evaluator
from trainer.observe.console import Console
from trainer.observe.flops import flops_per_pair, peak_flops
from trainer.observe.nonfinite import NonfiniteGuard
from trainer.observe.out_of_memory import out_of_memory
from trainer.observe.profiler import ProfileWindow
from trainer.observe.stragglers import StragglerWatch
from trainer.observe.tracking import Tracker
from trainer.periodic import Checkpointer, IntervalWork, MetricWindow, PeriodicEval, SampleGrids, accumulate
from trainer.runtime.engine import EMA_UNIT, Engine
from trainer.runtime.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptionFlag, mark_preempted
from trainer.runtime.run_files import check_run_dir, write_atomic
from trainer.runtime.run_lock import hold_run_dir
from trainer.runtime.watchdog import HANG_MARKER, Watchdog

RECORDED_OUTPUTS = ("fake_x", "fake_y", "rec_x", "rec_y")  # those the family's generators produce
FAKES = ("fake_x", "fake_y")  # the generator outputs the discriminators see, through the pools of TrainState.pools
Batch = dict[str, torch.Tensor]  # "x", "y": [N, 3, H, W] in [-1, 1]; optional "extra_x", "extra_y": [N, C, H, W]


def generator_update(
    run: Training, micro_batches: list[Batch]
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor | None, torch.Tensor]], dict[str, torch.Tensor]]:
    """The generators' optimizer update over `micro_batches` (the first half of train_step), with the
    discriminators frozen; their fakes go through the image pools for discriminator_update.

    Returns:
        (stats, fakes, outputs): each loss term averaged over the micro-batches and grad_norm/g (detached device
        tensors); the pooled (fake_x, fake_y) of each micro-batch (fake_x None for CUT/FastCUT, which have no
        generator Y -> X); the last micro-batch's generator outputs.
    """
    engine, pools = run.engine, run.pools
    if engine.compile_mode is not None:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graph trees: a new iteration, earlier outputs are done
    last = len(micro_batches) - 1
    sums: dict[str, torch.Tensor] = {}
    fakes = []
    with engine.frozen("d") as plain_discs:  # D gets no gradients from the generator step
        for i, batch in enumerate(micro_batches):
            with engine.accumulate("g", is_last=i == last):
                with engine.autocast():
                    g_loss, stats, out = run.family.generator_step(
                        run.units["g"],
                        plain_discs,
                        batch["x"],
                        batch["y"],
                        run.loss,
                        batch.get("extra_x"),
                        batch.get("extra_y"),
                    )
                engine.backward(g_loss, "g")
            pooled = [pool.query(out[key].detach().float()) if key in out else None for pool, key in zip(pools, FAKES)]
            fakes.append((pooled[0], pooled[1]))
            accumulate(sums, stats)
    norm = engine.step("g")
    return {**{key: value / len(micro_batches) for key, value in sums.items()}, "grad_norm/g": norm}, fakes, out


def discriminator_update(
    run: Training, micro_batches: list[Batch], fakes: list[tuple[torch.Tensor | None, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The discriminators' optimizer update over `micro_batches` and their pooled `fakes` (the second half of
    train_step).

    Returns:
        Each loss term averaged over the micro-batches and grad_norm/d (detached device tensors).
    """
    engine, last = run.engine, len(micro_batches) - 1
    sums: dict[str, torch.Tensor] = {}
    for i, (batch, (fake_x, fake_y)) in enumerate(zip(micro_batches, fakes)):
        with engine.accumulate("d", is_last=i == last):
            with engine.autocast():
                d_loss, stats = run.family.discriminator_step(
                    run.units["d"], batch["x"], batch["y"], fake_x, fake_y, run.loss
                )
            engine.backward(d_loss, "d")
        accumulate(sums, stats)
    norm = engine.step("d")
    return {**{key: value / len(micro_batches) for key, value in sums.items()}, "grad_norm/d": norm}


def train_step(run: Training, micro_batches: list[Batch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer update of each unit over `micro_batches` (gradient accumulation when there are several):
    generator_update, then discriminator_update, with the step functions of model.family (run.family).

    Returns:
        (stats, images): detached device tensors - each loss term averaged over the micro-batches and each unit's
        grad norm; the last micro-batch's real images and generator outputs (for loss-spike capture).
    """
    with run.engine.phase("generator step"):
        g_stats, fakes, out = generator_update(run, micro_batches)
    with run.engine.phase("discriminator step"):
        d_stats = discriminator_update(run, micro_batches, fakes)
    batch = micro_batches[-1]
    recorded = {key: out[key].detach() for key in RECORDED_OUTPUTS if key in out}
    images = {"real_x": batch["x"], "real_y": batch["y"], **recorded}
    return {**g_stats, **d_stats}, images


@dataclasses.dataclass
class TrainResult:
    step: int  # the last update done
    metrics: dict[str, float]  # the last evaluation (empty without a test split)
    preempted: bool  # stopped by SIGUSR1/SIGTERM after saving a checkpoint
    interrupted: bool = False  # stopped by SIGINT (Ctrl-C) after saving a checkpoint


def train(cfg: Config) -> TrainResult:
    """Train a CycleGAN as `cfg` says, continuing from a checkpoint when train.resume finds one. Everything that
    can be checked (data, test split, the resume point and its architecture) is checked before the run directory
    changes.

    Raises:
        ConfigError, CheckpointError, RunDirLocked, TrainingDiverged: one-line reasons to stop.
    """
    preemption = PreemptionFlag()  # before the loader forks its workers, so they inherit the harmless handler
    engine, cfg = build_engine(cfg)  # cfg: with backend, precision, cpu_threads and num_workers resolved
    engine.watchdog = watchdog = Watchdog(Path(cfg.train.run_dir), engine.rank, cfg.train.hang_timeout_s)
    if cfg.profile.memory and engine.device.type == "cuda":  # allocation stacks for an out-of-memory snapshot
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        with engine.phase("start-up"):
            manifest = data_manifest(cfg)
            cfg = resolve_formats(cfg, manifest)  # each domain's channels and bit depth, from the data
            console = Console(engine.is_main)
            if note := aspect_note(cfg, manifest):
                console.message(note)
            loader = build_loader(cfg, engine)
            evaluator = build_evaluator(cfg, engine, console)
            samples = load_test_images(cfg.data, cfg.logging.sample_images, engine.device, formats=domain_formats(cfg))
        with hold_run_dir(Path(cfg.train.run_dir), engine.is_main, engine.any_rank):
            with engine.phase("start-up"):
                _on_main(engine, lambda: check_run_dir(Path(cfg.train.run_dir)))  # before anything is written
                sharing = probe_run_dir(engine, Path(cfg.train.run_dir), cfg.checkpoint.remote)
                resume_from = _resume_point(cfg, Path(cfg.train.run_dir), engine, console, sharing)
            with engine.phase("start-up"):
                set_up = _set_up(cfg, engine, preemption, console, loader, evaluator, samples, resume_from, sharing)
            return _train(cfg, engine, preemption, console, loader, *set_up)
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise out_of_memory(err, cfg, engine, watchdog.where_raised(err), watchdog.step) from None
    finally:
        watchdog.close()


def _train(
    cfg: Config,
    engine: Engine,
    preemption: PreemptionFlag,
    console: Console,
    loader: UnpairedLoader,
    run: Training,
    state: TrainState,
    tracker: Tracker,
    work: IntervalWork,
) -> TrainResult:
    """The loop from `state` (what _set_up made) to the end of the run, a stop signal or an error."""
    run_dir, total, accum = Path(cfg.train.run_dir), cfg.train.steps, cfg.train.grad_accum_steps
    start = state.step
    stopping = False
    preemption.step = preemption.saved_step = start
    console.start(start, total)
    if start >= total:
        console.message(_finished_line(run_dir, start, total))
    for step in range(start + 1, total + 1):
        with work.profiler.around(step):
            with work.window.timing_update():
                with work.window.waiting_for_data(), engine.phase("data"):
                    micro_batches = [next(loader) for _ in range(accum)]
                stats, images = train_step(run, micro_batches)
            work.window.add(stats)  # on the device: no host sync per step
            state.step = preemption.step = step
            if engine.watchdog is not None:
                engine.watchdog.at_step(step)
            engine.update_ema(state.images_seen, run.global_batch)
            console.step()
            for event in tracker.capture_spikes(step, stats, images):
                console.spike(event)
            stopping = work.after_step(step, state)
        if stopping:
            break
    work.profiler.close(state.step)
    with engine.phase("checkpoint"):
        work.checkpointer.finish()  # an asynchronous save still in flight
    interrupted = stopping and engine.any_rank(preemption.interrupted)
    with engine.phase("export"):
        export = _end_of_run(cfg, engine, console, stopping, interrupted, state.step, work.checkpointer.last_saved)
    images = (state.step - start) * run.global_batch
    console.summary(state.step, images, work.metrics, None if export is None else str(export))
    tracker.close()
    work.checkpointer.finish_uploads(_final_files(run_dir, export) if engine.is_main else [])
    engine.end()
    preempted = stopping and not interrupted
    return TrainResult(step=state.step, metrics=work.metrics, preempted=preempted, interrupted=interrupted)


def _set_up(
    cfg: Config,
    engine: Engine,
    preemption: PreemptionFlag,
    console: Console,
    loader: UnpairedLoader,
    evaluator: Evaluator | None,
    samples: TestSet | None,
    resume_from: Path | None,
    sharing: RunDirSharing,
) -> tuple[Training, TrainState, Tracker, IntervalWork]:
    """The units, the training state (resumed from `resume_from`), the claimed run directory, the tracker and the
    interval work (`sharing`: which ranks see the main rank's run directory), with the start line said and the
    run's facts logged."""
    run_dir = Path(cfg.train.run_dir)
    run = build_training(cfg, engine)
    state = TrainState(loader=loader, pools=run.pools, global_batch=run.global_batch)
    if resume_from is not None:
        _resume(state, cfg, engine, resume_from, console)
    start = state.step
    _claim_run_dir(cfg, engine, resume_from, console)  # only now: a failed resume leaves the run directory as it was
    tracker = Tracker(
        engine.accelerator, run_dir, cfg.logging, _tracked_config(cfg, engine), resume_step=start,
        wandb_run_id=state.wandb_run_id,
    )  # fmt: skip
    state.wandb_run_id = tracker.wandb_run_id
    console.message(_start_line(cfg, engine, run.global_batch, run.lr_scale, resume_from, start))
    _log_run_facts(tracker, console, engine, state, run.lr_scale)
    state.best = comparable_best(read_best(run_dir), cfg.eval.select)  # from before a resume
    work = _interval_work(cfg, engine, loader, evaluator, samples, tracker, console, preemption, run.global_batch,
                          sharing)  # fmt: skip
    return run, state, tracker, work


def _interval_work(
    cfg: Config,
    engine: Engine,
    loader: UnpairedLoader,
    evaluator: Evaluator | None,
    samples: TestSet | None,
    tracker: Tracker,
    console: Console,
    preemption: PreemptionFlag,
    global_batch: int,
    sharing: RunDirSharing,
) -> IntervalWork:
    """The periodic parts of the loop (trainer.periodic) as the config sets them."""
    run_dir, total, fp16 = Path(cfg.train.run_dir), cfg.train.steps, cfg.train.precision == "fp16"
    nonfinite = NonfiniteGuard(cfg.train.max_nonfinite_steps, fp16)
    flops, flops_reason = flops_per_pair(cfg)
    peak, peak_reason = peak_flops(engine.device, engine.precision) if flops else (None, "")
    console.message(flops_reason + (f"; MFU against {peak_reason}" if flops else ""))
    window = MetricWindow(
        engine, loader, nonfinite, cfg.logging.every_steps, total, cfg.train.batch_size * cfg.train.grad_accum_steps,
        global_batch, fp16=fp16, sinks=(tracker.log, console.interval), flops_per_pair=flops, peak_flops=peak,
        stragglers=StragglerWatch(cfg.logging.straggler_factor, cfg.logging.straggler_windows, console.message),
    )  # fmt: skip
    grids = SampleGrids(engine, samples, cfg.logging.image_every_steps, total)
    evaluation = PeriodicEval(engine, evaluator, cfg.eval.every_steps, total, cfg.eval.select)
    checkpointer = Checkpointer(
        engine, run_dir, cfg.checkpoint, total, cfg.model, config_hash(cfg), tracker, console, preemption,
        _uploader(cfg, engine, console, sharing), sharing,
    )  # fmt: skip
    profiler = ProfileWindow(cfg.profile, run_dir, engine.rank, engine.device.type == "cuda", console.message)
    return IntervalWork(
        engine, tracker, window, nonfinite, grids, evaluation, checkpointer, profiler, run_dir, cfg.ema.eval_raw
    )


def _resume(state: TrainState, cfg: Config, engine: Engine, resume_from: Path, console: Console) -> None:
    """Load the checkpoint `resume_from` into the engine and `state` (a collective)."""
    saved, rank_state = load_checkpoint(engine, resume_from, console.message)
    if saved.get("config_hash") not in (None, config_hash(cfg)):
        console.message(f"note: the config differs from the one that wrote {resume_from}")
    note = state.load(saved, rank_state, engine.device)
    if note:
        console.message(f"note: {note}")


def _tracked_config(cfg: Config, engine: Engine) -> dict:
    """The resolved config and why its automatic values were chosen (the W&B run's config)."""
    budget = dataclasses.asdict(engine.cpu_budget) if engine.cpu_budget else None
    resolved = {"precision": engine.precision_reason, "cpu_threads": engine.cpu_threads_reason, "cpu_budget": budget}
    return {**to_dict(cfg), "resolved": resolved}


def _log_run_facts(tracker: Tracker, console: Console, engine: Engine, state: TrainState, scale: float) -> None:
    """run/world_size, run/global_batch, run/lr_scale and run/cpu_threads (torch's, on the main rank) at the start
    and whenever the world size changed or an elastic agent restarted the workers (run/restarts), and the updates
    an interrupted attempt logged after the checkpoint this one resumed, which are done again (run/steps_redone)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    changed = state.saved_world_size not in (None, engine.world_size)
    if state.step == 0 or changed or restarts:
        facts = {"run/global_batch": state.global_batch, "run/world_size": engine.world_size, "run/lr_scale": scale,
                 "run/cpu_threads": torch.get_num_threads()}  # fmt: skip
        tracker.log(state.step, {**facts, "run/restarts": restarts})
    if changed:
        console.message(
            f"world size {state.saved_world_size} -> {engine.world_size} (agent restart {restarts}): global batch "
            f"{state.global_batch}, lr x{scale:.4g}"
        )
    if tracker.steps_redone:
        tracker.log(state.step, {"run/steps_redone": tracker.steps_redone})
        console.message(f"{tracker.steps_redone} update(s) after step {state.step} are done again")


def _claim_run_dir(cfg: Config, engine: Engine, resume_from: Path | None, console: Console) -> None:
    """On the main rank: the run's resolved config.yaml, no PREEMPTED or HUNG marker of an earlier attempt, and the
    damaged checkpoints an automatic resume skipped set aside (see checkpoint.set_aside_damaged)."""
    if engine.is_main:
        run_dir = Path(cfg.train.run_dir)
        write_atomic(run_dir / "config.yaml", config_yaml(cfg))
        for marker in (PREEMPTED_MARKER, HANG_MARKER):  # an earlier attempt's
            (run_dir / marker).unlink(missing_ok=True)
        if cfg.train.resume == "auto":
            for damaged in set_aside_damaged(run_dir, resume_from):
                console.message(f"set aside {damaged}: it is damaged (see above); delete it once inspected")


def _finished_line(run_dir: Path, step: int, total: int) -> str:
    """What a run resumed at or after its last update says instead of training nothing without a word."""
    return (
        f"{run_dir} is finished: its checkpoint is at step {step} and train.steps={total}, so nothing is trained; "
        "raise train.steps to train it further, or add train.resume=none train.overwrite=true to start over"
    )


def _start_line(
    cfg: Config, engine: Engine, global_batch: int, scale: float, resume_from: Path | None, start: int
) -> str:
    """What trains where: backend, processes, device, the global batch's make-up, the LR scaling, the resume."""
    return (
        f"training with {engine.backend_name} on {engine.world_size} process(es), {engine.device}: "
        f"global batch {global_batch} = {cfg.train.batch_size} per rank x {engine.world_size} ranks x "
        f"{cfg.train.grad_accum_steps} micro-batches; lr scaling {cfg.optimizer.lr_scaling} x{scale:.4g} -> lr "
        f"{cfg.optimizer.lr * scale:.4g}; precision {engine.precision} ({engine.precision_reason}); "
        f"{cfg.train.cpu_threads} CPU thread(s) and {cfg.data.num_workers} loader worker(s) per rank "
        f"({engine.cpu_threads_reason})"
        + formats_note(cfg)
        + (f"; resuming from {resume_from} at step {start}" if resume_from else "")
    )


def _end_of_run(
    cfg: Config, engine: Engine, console: Console, stopped: bool, interrupted: bool, step: int, saved: Path | None
) -> Path | None:
    """Export the generators of a finished run (a collective), or say how a stopped one goes on (`saved`: its last
    checkpoint). Returns the export directory (on the main rank) or None."""
    run_dir = Path(cfg.train.run_dir)
    if not stopped:
        raw = engine.full_state_dict("g")  # collectives under FSDP2 and DeepSpeed
        ema = engine.universal_state(EMA_UNIT) if engine.ema is not None else None
        if not engine.is_main:
            return None
        save_export(run_dir / "export", raw, ema, cfg.model, cfg.data)
        return run_dir / "export"
    if interrupted:
        console.message(f"interrupted: saved {saved}; run the same command to continue from step {step}")
        return None
    if engine.is_main:
        mark_preempted(run_dir, step)
    console.message(f"preempted: saved {saved}; exiting with code {PREEMPTED_EXIT_CODE} to be requeued")
    return None


def _checkpoint_store(cfg: Config) -> CheckpointStore | None:
    """The store of checkpoint.remote (credentials and endpoint as for the data), or None without one."""
    if not cfg.checkpoint.remote:
        return None
    return CheckpointStore(cfg.checkpoint.remote, RemoteOptions(s3_endpoint_url=cfg.data.s3_endpoint_url))


def _uploader(cfg: Config, engine: Engine, console: Console, sharing: RunDirSharing) -> CheckpointUploader | None:
    """Under checkpoint.remote: the main rank's uploader, and one on each rank whose run directory is elsewhere (for
    its own files, reporting on stderr); else None."""
    uploads_own = engine.is_main or not sharing.sharing[engine.rank]
    store = _checkpoint_store(cfg) if uploads_own else None
    if store is None:
        return None

    return CheckpointUploader(
        store, cfg.checkpoint.keep, cfg.checkpoint.keep_every_steps, cfg.checkpoint.remote_max_behind,
        console.message if engine.is_main else _rank_report(engine),
        confirmed=newest_in_store(store) if engine.is_main else None,
        elsewhere=sharing.elsewhere, attempt=sharing.attempt,
    )  # fmt: skip


def _rank_report(engine: Engine) -> Callable[[str], None]:
    """One-line messages of a rank other than the main one (whose console is silent): on stderr, with its rank."""
    return lambda line: print(f"rank {engine.rank}: {line}", file=sys.stderr, flush=True)


def _final_files(run_dir: Path, export: Path | None) -> list[tuple[str, Path]]:
    """What a finished run uploads last ({store name: local path}): the export, metrics.jsonl and config.yaml."""
    files = [p for p in sorted(export.rglob("*")) if p.is_file() and not p.is_symlink()] if export else []
    files.sort(key=lambda p: p.name == COMPLETE)  # each export directory's marker after the files it lists
    files += [p for p in (run_dir / "metrics.jsonl", run_dir / "config.yaml") if p.is_file()]
    return [(p.relative_to(run_dir).as_posix(), p) for p in files]


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config, for telling whether a resumed run continues with the same settings."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _on_main(engine: Engine, work: Callable[[], str | None]) -> str | None:
    """`work`'s result, computed by the main rank alone (N ranks must not read a run directory N times from shared
    storage) and shared with every rank; its ConfigError or CheckpointError is raised on every rank."""
    verdict: dict[str, str | None] = {"value": None, "error": None}
    if engine.is_main:
        try:
            verdict["value"] = work()
        except (ConfigError, CheckpointError) as err:
            verdict["error"] = str(err)
    verdict = engine.broadcast_json(verdict)
    if verdict["error"] is not None:
        raise CheckpointError(verdict["error"])
    return verdict["value"]


def _resume_point(cfg: Config, run_dir: Path, engine: Engine, console: Console, sharing: RunDirSharing) -> Path | None:
    """The checkpoint to continue from (this rank's copy), after refusing to start over on top of an existing run
    unless told; under checkpoint.remote the store's newest complete checkpoint when the run directory has none as
    new, with the files a rank lacks (its run directory on another node's disk) fetched from the store."""
    if cfg.train.resume == "none" and engine.any_rank(bool(step_dirs(run_dir))):
        if not cfg.train.overwrite:
            raise ConfigError(
                f"train.run_dir={run_dir} already has checkpoints; use train.resume=auto to continue, or "
                "train.overwrite=true to delete them and start over"
            )
        engine.barrier()
        if engine.is_main or not sharing.sharing[engine.rank]:  # each node's own directory
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=not engine.is_main)
        engine.barrier()
    store = _checkpoint_store(cfg)
    uses = engine.is_main or not sharing.sharing[engine.rank]
    readable = check_store(store, uses, engine, console.message if engine.is_main else _rank_report(engine))

    def newest() -> str | None:
        found = find_resume(run_dir, cfg.train.resume, console.message)
        if store is None or cfg.train.resume not in ("auto", "none"):
            return None if found is None else str(found)
        if not readable:
            if cfg.train.resume == "none" or found is None:
                raise CheckpointError(f"checkpoint.remote={store.url} cannot be read now (see above); try again later")
            return str(found)
        if cfg.train.resume == "none":
            clear_store(store, cfg.train.overwrite)
            return None
        found = resume_from_store(store, run_dir, found, console.message, store_only=bool(sharing.elsewhere))
        return None if found is None else str(found)

    found = _on_main(engine, newest)
    if found is None:
        return None
    resume_from = fetch_where_needed(store if readable else None, Path(found), run_dir, engine)
    check_architecture(resume_from, cfg.model)
    return resume_from
