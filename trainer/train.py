"""The training loop, top to bottom: setup, then per step a generator update and a discriminator update, with
logging, sample grids, evaluation and checkpoints on intervals, and exported generators at the end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from trainer.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    check_architecture,
    complete_checkpoints,
    find_resume,
    load_checkpoint,
    read_best,
    save_checkpoint,
)
from trainer.config import Config, ConfigError, LossConfig, OptimizerConfig, save_config, to_dict
from trainer.console import Console
from trainer.cyclegan import build_units, discriminator_step, generator_step
from trainer.data import TestSet, UnpairedLoader, load_test_images
from trainer.engine import Engine
from trainer.evaluation import NO_INCEPTION, Evaluator, eval_mode, load_inception, selection_score
from trainer.export import save_generators
from trainer.models import set_activation_checkpointing
from trainer.nonfinite import NonfiniteGuard
from trainer.pool import ImagePool
from trainer.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptionFlag, mark_preempted
from trainer.run_lock import hold_run_dir
from trainer.schedule import build_scheduler
from trainer.spikes import SpikeCapture
from trainer.tracking import Tracker, image_grid

RECORDED_OUTPUTS = ("fake_x", "fake_y", "rec_x", "rec_y")
Batch = dict[str, torch.Tensor]  # "x", "y": [N, 3, H, W] in [-1, 1]; optional "extra_x", "extra_y": [N, C, H, W]


def lr_scale(cfg: OptimizerConfig, global_batch: int) -> float:
    """Multiplier of the configured learning rates for `global_batch` under cfg.lr_scaling."""
    ratio = global_batch / cfg.base_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def train_step(
    engine: Engine,
    units: dict,
    pools: tuple[ImagePool, ImagePool],
    micro_batches: list[Batch],
    loss_cfg: LossConfig,
    clock: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer update of each unit over `micro_batches` (gradient accumulation when there are several).
    `clock` (benchmarks) is called with "generator" after the generators' update and "discriminator" at the end.

    Returns:
        (stats, images): detached device tensors - each loss term averaged over the micro-batches and each unit's
        grad norm; the last micro-batch's real images and generator outputs (for loss-spike capture).
    """
    if engine.compile_mode is not None:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graph trees: a new iteration, earlier outputs are done
    last = len(micro_batches) - 1
    sums: dict[str, torch.Tensor] = {}
    fakes = []
    with engine.frozen("d") as plain_discs:  # D gets no gradients from the generator step
        for i, batch in enumerate(micro_batches):
            with engine.accumulate("g", is_last=i == last):
                with engine.autocast():
                    g_loss, stats, out = generator_step(
                        units["g"],
                        plain_discs,
                        batch["x"],
                        batch["y"],
                        loss_cfg,
                        batch.get("extra_x"),
                        batch.get("extra_y"),
                    )
                engine.backward(g_loss, "g")
            fakes.append(
                (pools[0].query(out["fake_x"].detach().float()), pools[1].query(out["fake_y"].detach().float()))
            )
            _accumulate(sums, stats)
    norm_g = engine.step("g")
    if clock is not None:
        clock("generator")
    for i, (batch, (fake_x, fake_y)) in enumerate(zip(micro_batches, fakes)):
        with engine.accumulate("d", is_last=i == last):
            with engine.autocast():
                d_loss, stats = discriminator_step(units["d"], batch["x"], batch["y"], fake_x, fake_y, loss_cfg)
            engine.backward(d_loss, "d")
        _accumulate(sums, stats)
    norm_d = engine.step("d")
    if clock is not None:
        clock("discriminator")
    means = {key: value / len(micro_batches) for key, value in sums.items()}
    batch = micro_batches[-1]
    images = {"real_x": batch["x"], "real_y": batch["y"], **{k: out[k].detach() for k in RECORDED_OUTPUTS}}
    return {**means, "grad_norm/g": norm_g, "grad_norm/d": norm_d}, images


def _accumulate(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    for key, value in stats.items():
        sums[key] = sums[key] + value if key in sums else value


def optimizer_kernel(implementation: str, device: torch.device) -> dict[str, bool]:
    """torch.optim keyword arguments for optimizer.implementation on `device`."""
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def build_training(cfg: Config, engine: Engine) -> tuple[dict, int, float]:
    """Seeded units, AdamW optimizers with the scaled LRs and schedules, prepared by the engine.

    Returns:
        (the prepared units {"g", "d"}, the global batch, the LR scale factor applied).
    """
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    gens, discs = build_units(cfg.model, cfg.loss, cfg.train.fuse_generator_passes)
    if cfg.train.activation_checkpointing:  # before compile (in engine.prepare), which guards on the flag
        for gen in (gens.g_xy, gens.g_yx):
            set_activation_checkpointing(gen, True)
    if cfg.train.channels_last:
        gens, discs = gens.to(memory_format=torch.channels_last), discs.to(memory_format=torch.channels_last)
    kernel = optimizer_kernel(cfg.optimizer.implementation, engine.device)
    global_batch = engine.global_batch(cfg.train.batch_size)
    scale = lr_scale(cfg.optimizer, global_batch)
    optimizers, schedulers = {}, {}
    for name, unit, lr in (("g", gens, cfg.optimizer.lr), ("d", discs, cfg.optimizer.lr_d or cfg.optimizer.lr)):
        optimizers[name] = torch.optim.AdamW(
            unit.parameters(),
            lr=lr * scale,
            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
            **kernel,
        )
        schedulers[name] = build_scheduler(optimizers[name], cfg.schedule, cfg.train.steps)
    return engine.prepare({"g": gens, "d": discs}, optimizers, schedulers), global_batch, scale


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
    engine = Engine(
        cfg.distributed, cfg.train, cfg.optimizer, log_with=None if cfg.logging.wandb == "disabled" else "wandb"
    )
    cfg = dataclasses.replace(cfg, distributed=engine.cfg)  # backend=auto resolved from the launcher
    console = Console(engine.is_main)
    loader = UnpairedLoader(
        cfg.data, cfg.train.batch_size, cfg.train.seed, engine.rank, engine.world_size, engine.device
    )
    evaluator = _build_evaluator(cfg, engine, console)
    samples = load_test_images(cfg.data, cfg.logging.sample_images, engine.device)
    with hold_run_dir(Path(cfg.train.run_dir), engine.is_main, engine.any_rank):
        resume_from = _resume_point(cfg, Path(cfg.train.run_dir), engine, console)
        return _train(cfg, engine, preemption, console, loader, evaluator, samples, resume_from)


def _train(  # noqa: PLR0915 (to be split into a metric window, a train state and due components: issue 15)
    cfg: Config,
    engine: Engine,
    preemption: PreemptionFlag,
    console: Console,
    loader: UnpairedLoader,
    evaluator: Evaluator | None,
    samples: TestSet | None,
    resume_from: Path | None,
) -> TrainResult:
    run_dir = Path(cfg.train.run_dir)
    total, accum = cfg.train.steps, cfg.train.grad_accum_steps
    units, global_batch, scale = build_training(cfg, engine)
    pools = tuple(ImagePool(cfg.train.pool_size, seed=cfg.train.seed * 1000 + 2 * engine.rank + i) for i in (0, 1))
    start, train_state = 0, {}
    if resume_from is not None:
        train_state, rank_state = load_checkpoint(engine, resume_from, console.message)
        start = train_state["step"]
        if train_state.get("config_hash") not in (None, config_hash(cfg)):
            console.message(f"note: the config differs from the one that wrote {resume_from}")
        loader.load_state_dict(rank_state["data"])
        for pool, key in zip(pools, ("pool_x", "pool_y")):
            if key in rank_state:
                pool.load_state_dict(rank_state[key], engine.device)
    # Images per domain seen before this run: counted by earlier runs (global batches may have differed)
    images_before = train_state.get("images_seen") or start * global_batch
    if engine.is_main:  # only now: a resume point that does not load leaves the run directory as it was
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    tracker = Tracker(
        engine.accelerator,
        run_dir,
        cfg.logging,
        to_dict(cfg),
        resume_step=start,
        wandb_run_id=train_state.get("wandb_run_id"),
    )
    spikes = SpikeCapture(run_dir, cfg.logging.spike_factor, cfg.logging.spike_check_steps)
    capture_spikes = engine.is_main and cfg.logging.spike_factor > 0
    console.message(
        f"training with {engine.backend_name} on {engine.world_size} process(es), {engine.device}: "
        f"global batch {global_batch} = {cfg.train.batch_size} per rank x {engine.world_size} ranks x {accum} "
        f"micro-batches; lr scaling {cfg.optimizer.lr_scaling} x{scale:.4g} -> lr {cfg.optimizer.lr * scale:.4g}"
        + (f"; resuming from {resume_from} at step {start}" if resume_from else "")
    )
    if start == 0:
        tracker.log(0, {"run/global_batch": global_batch, "run/world_size": engine.world_size, "run/lr_scale": scale})
    best = read_best(run_dir)  # from before a resume; a best by another eval.select metric does not compare
    best = best if cfg.eval.select != "none" and best and best["select"] == cfg.eval.select else None

    sums: dict[str, torch.Tensor] = {}
    nonfinite = NonfiniteGuard(cfg.train.max_nonfinite_steps, cfg.train.precision == "fp16")
    window_steps, window_start, data_wait = 0, time.perf_counter(), 0.0
    metrics: dict[str, float] = {}
    stopped = False
    preemption.step = preemption.saved_step = start
    console.start(start, total)
    for step in range(start + 1, total + 1):
        wait_start = time.perf_counter()
        micro_batches = [next(loader) for _ in range(accum)]
        data_wait += time.perf_counter() - wait_start

        stats, images = train_step(engine, units, pools, micro_batches, cfg.loss)
        _accumulate(sums, stats)  # on the device: no host sync per step
        nonfinite.add(stats)
        window_steps += 1
        preemption.step = step
        console.step()
        if capture_spikes:
            for event in spikes.add(step, {k: v for k, v in stats.items() if k.startswith("loss/")}, images):
                console.message(
                    f"loss spike at step {event['step']} in {', '.join(event['terms'])}: saved {event['dir']}"
                )
                tracker.log(step, {"spike/step": event["step"], "spike/terms": len(event["terms"])})
        if _is_due(step, cfg.logging.every_steps, total):
            elapsed = time.perf_counter() - window_start
            rank_values = {
                **loader.progress(),
                **engine.memory_metrics(),
                "perf/images_per_s_per_rank": window_steps * cfg.train.batch_size * accum / elapsed,
            }
            logged = engine.reduce(  # one collective for everything
                {
                    **{k: v / window_steps for k, v in sums.items()},
                    **nonfinite.take(),
                    **{k: torch.tensor(v) for k, v in rank_values.items()},
                },
                sums={k: torch.tensor(v) for k, v in loader.counters().items()},  # totals of all ranks
            )
            logged.update(
                {
                    "lr/g": engine.lr("g"),
                    "lr/d": engine.lr("d"),
                    "perf/images_per_s": window_steps * global_batch / elapsed,
                    "perf/step_time_s": elapsed / window_steps,
                    "perf/data_wait_fraction": data_wait / elapsed,
                }
            )
            if cfg.train.precision == "fp16":
                logged.update({"loss_scale/g": engine.loss_scale("g"), "loss_scale/d": engine.loss_scale("d")})
            tracker.log(step, logged)
            console.interval(step, logged)
            sums, window_steps, window_start, data_wait = {}, 0, time.perf_counter(), 0.0
            nonfinite.check(engine.any_rank, step, run_dir)

        plain_gens = engine.unwrap("g")
        if samples is not None and _is_due(step, cfg.logging.image_every_steps, total):
            with engine.autocast():
                tracker.log_images(step, _sample_grids(plain_gens, samples))
        new_best = False
        if evaluator is not None and _is_due(step, cfg.eval.every_steps, total):
            with eval_mode(plain_gens):
                metrics = evaluator(plain_gens.g_xy, plain_gens.g_yx, engine.autocast)
            if cfg.eval.select != "none":
                metrics["eval/select_score"] = score = selection_score(metrics, cfg.eval.select)
                new_best = engine.any_rank(best is None or score > best["score"])
            tracker.log(step, metrics)
        stopped = step % cfg.checkpoint.preempt_check_steps == 0 and engine.any_rank(preemption.raised)
        if stopped or new_best or _is_due(step, cfg.checkpoint.every_steps, total):
            nonfinite.check(engine.any_rank, step, run_dir)
            rank_state = {"pool_x": pools[0].state_dict(), "pool_y": pools[1].state_dict(), "data": loader.state_dict()}
            meta = {
                "model": dataclasses.asdict(cfg.model),
                "wandb_run_id": tracker.wandb_run_id,
                "images_seen": images_before + (step - start) * global_batch,
                "config_hash": config_hash(cfg),
            }
            if new_best:
                best = {"select": cfg.eval.select, "score": metrics["eval/select_score"], "metrics": metrics}
            path = save_checkpoint(
                engine, run_dir, step, rank_state, meta, cfg.checkpoint.keep, cfg.checkpoint.keep_every_steps,
                best if new_best else None,
            )  # fmt: skip
            preemption.saved_step = step
            logged = {"checkpoint/saved_step": step, **_replica_check(engine, step, console)}
            tracker.log(step, {**logged, **({"eval/best_step": step} if new_best else {})})
        if stopped:
            break

    interrupted = stopped and engine.any_rank(preemption.interrupted)
    export = None
    if not stopped:
        weights = engine.full_state_dict("g")  # collective under DeepSpeed
        if engine.is_main:
            export = run_dir / "export"
            save_generators(export, weights, cfg.model, cfg.data)
    elif interrupted:
        console.message(f"interrupted: saved {path}; run the same command to continue from step {step}")
    else:
        if engine.is_main:
            mark_preempted(run_dir, step)
        console.message(f"preempted: saved {path}; exiting with code {PREEMPTED_EXIT_CODE} to be requeued")
    last = step if total > start else start
    console.summary(last, (last - start) * global_batch, metrics, None if export is None else str(export))
    tracker.close()
    engine.end()
    return TrainResult(step=last, metrics=metrics, preempted=stopped and not interrupted, interrupted=interrupted)


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config, for telling whether a resumed run continues with the same settings."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _resume_point(cfg: Config, run_dir: Path, engine: Engine, console: Console) -> Path | None:
    """The checkpoint to continue from, after refusing to start over on top of an existing run unless told."""
    if cfg.train.resume == "none" and complete_checkpoints(run_dir):
        if not cfg.train.overwrite:
            raise ConfigError(
                f"train.run_dir={run_dir} already has checkpoints; use train.resume=auto to continue, or "
                "train.overwrite=true to delete them and start over"
            )
        engine.barrier()
        if engine.is_main:
            shutil.rmtree(run_dir / CHECKPOINTS)
        engine.barrier()
    # The main rank reads and hashes the checkpoints (N ranks must not read them N times from shared storage)
    # and tells the others its verdict: the checkpoint to load, or the error every rank then raises.
    verdict: dict[str, str | None] = {"path": None, "error": None}
    if engine.is_main:
        try:
            found = find_resume(run_dir, cfg.train.resume, console.message)
            verdict["path"] = None if found is None else str(found)
        except CheckpointError as err:
            verdict["error"] = str(err)
    verdict = engine.broadcast_json(verdict)
    if verdict["error"] is not None:
        raise CheckpointError(verdict["error"])
    resume_from = None if verdict["path"] is None else Path(verdict["path"])
    if resume_from is not None:
        check_architecture(resume_from, cfg.model)
    return resume_from


def _build_evaluator(cfg: Config, engine: Engine, console: Console) -> Evaluator | None:
    """The evaluator of this rank's share of the test split (None without one), after checking eval.select."""
    test = load_test_images(cfg.data, cfg.eval.images, "cpu", engine.rank, engine.world_size)
    if test is None:
        if cfg.eval.select != "none":
            raise ConfigError(f"eval.select={cfg.eval.select} needs x-test/y-test splits in data.root={cfg.data.root}")
        return None
    if cfg.eval.select == "psnr" and not test.paired:
        raise ConfigError("eval.select=psnr needs a test split with a known answer (synthetic data); use cycle or fid")
    inception = load_inception(cfg.eval.inception_weights, engine.device) if cfg.eval.inception_weights else None
    if inception is None:
        console.message(NO_INCEPTION)
    return Evaluator(test, cfg.eval, cfg.model.input_nc, engine.device, engine.world_size, inception)


def _replica_check(engine: Engine, step: int, console: Console) -> dict[str, float]:
    """run/replica_spread (see Engine.replica_spread) for the checkpoint log, with a warning when ranks differ."""
    spread = engine.replica_spread()
    if spread is None:
        return {}
    if spread > 0:
        console.message(f"warning: ranks hold different weights at step {step} (relative spread {spread:.3g})")
    return {"run/replica_spread": spread}


def _is_due(step: int, every: int, total: int) -> bool:
    """True after update `step` (1-based) when it is a multiple of `every` (0: never) or the last one."""
    return step == total or (every > 0 and step % every == 0)


def _sample_grids(gens: torch.nn.Module, samples: TestSet) -> dict:
    """x | G(x) | F(G(x)) and y | F(y) | G(F(y)) rows for the fixed sample images."""
    with eval_mode(gens):
        out = gens(samples.x, samples.y, samples.extra_x, samples.extra_y)
    return {
        "x_to_y": image_grid([list(row) for row in zip(samples.x, out["fake_y"], out["rec_x"])]),
        "y_to_x": image_grid([list(row) for row in zip(samples.y, out["fake_x"], out["rec_y"])]),
    }
