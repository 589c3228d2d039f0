"""The training loop, top to bottom: setup, then per step a generator update and a discriminator update, with
logging, sample grids, evaluation and checkpoints on intervals, and exported generators at the end."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch

from trainer.checkpoint import save_checkpoint, save_generators
from trainer.config import Config, save_config, to_dict
from trainer.cyclegan import build_units, discriminator_step, generator_step
from trainer.data import UnpairedStream, load_test_images
from trainer.engine import Engine
from trainer.evaluate import translation_metrics
from trainer.pool import ImagePool
from trainer.schedule import build_scheduler
from trainer.tracking import Tracker, image_grid


def _is_due(step: int, every: int, total: int) -> bool:
    """True after update `step` (1-based) when it is a multiple of `every` (0: never) or the last one."""
    return step == total or (every > 0 and step % every == 0)


def train(cfg: Config) -> dict[str, float]:
    """Train a CycleGAN as `cfg` says; returns the final evaluation metrics (empty without a test split)."""
    engine = Engine(cfg.distributed, cfg.train.precision, log_with=None if cfg.logging.wandb == "disabled" else "wandb")
    run_dir = Path(cfg.train.run_dir)
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    total = cfg.train.steps

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    gens, discs = build_units(cfg.model, cfg.loss)
    optimizers, schedulers = {}, {}
    for name, unit, lr in (("g", gens, cfg.optimizer.lr), ("d", discs, cfg.optimizer.lr_d or cfg.optimizer.lr)):
        betas = (cfg.optimizer.beta1, cfg.optimizer.beta2)
        optimizers[name] = torch.optim.AdamW(unit.parameters(), lr=lr, betas=betas, weight_decay=cfg.optimizer.weight_decay)
        schedulers[name] = build_scheduler(optimizers[name], cfg.schedule, total)
    units = engine.prepare({"g": gens, "d": discs}, optimizers, schedulers)

    tracker = Tracker(engine.accelerator, run_dir, cfg.logging, to_dict(cfg), total)
    if engine.is_main:
        global_batch = cfg.train.batch_size * engine.world_size
        print(f"training on {engine.world_size} process(es), {engine.device}; global batch {global_batch}")
    stream = iter(UnpairedStream(cfg.data, cfg.train.batch_size, cfg.train.seed, engine.rank, engine.world_size))
    pool_x = ImagePool(cfg.train.pool_size, seed=cfg.train.seed * 1000 + 2 * engine.rank)
    pool_y = ImagePool(cfg.train.pool_size, seed=cfg.train.seed * 1000 + 2 * engine.rank + 1)
    test = load_test_images(cfg.data.root, cfg.train.eval_images, cfg.data.crop_size)
    samples = load_test_images(cfg.data.root, cfg.logging.sample_images, cfg.data.crop_size)

    sums: dict[str, torch.Tensor] = {}
    window_steps, window_start, data_wait = 0, time.perf_counter(), 0.0
    metrics: dict[str, float] = {}
    for step in range(1, total + 1):
        wait_start = time.perf_counter()
        batch = next(stream)
        real_x, real_y = batch["x"].to(engine.device), batch["y"].to(engine.device)  # [N, 3, H, W] each
        data_wait += time.perf_counter() - wait_start

        with engine.frozen("d") as plain_discs:
            with engine.autocast():
                g_loss, g_stats, out = generator_step(units["g"], plain_discs, real_x, real_y, cfg.loss)
            engine.backward_and_step(g_loss, "g")
        fake_x = pool_x.query(out["fake_x"].detach().float())
        fake_y = pool_y.query(out["fake_y"].detach().float())
        with engine.autocast():
            d_loss, d_stats = discriminator_step(units["d"], real_x, real_y, fake_x, fake_y, cfg.loss)
        engine.backward_and_step(d_loss, "d")

        for key, value in {**g_stats, **d_stats}.items():  # accumulate on device: no host sync per step
            sums[key] = sums.get(key, 0.0) + value
        window_steps += 1
        if _is_due(step, cfg.logging.every_steps, total):
            elapsed = time.perf_counter() - window_start
            logged = engine.reduce_mean({k: v / window_steps for k, v in sums.items()})
            logged.update({
                "lr/g": engine.lr("g"), "lr/d": engine.lr("d"),
                "perf/images_per_s": window_steps * cfg.train.batch_size * engine.world_size / elapsed,
                "perf/step_time_s": elapsed / window_steps,
                "perf/data_wait_fraction": data_wait / elapsed,
            })
            tracker.log(step, logged)
            tracker.advance(window_steps, {"g": logged["loss/g_total"], "d": logged["loss/d_total"]})
            sums, window_steps, window_start, data_wait = {}, 0, time.perf_counter(), 0.0

        plain_gens = engine.unwrap("g")
        if samples is not None and _is_due(step, cfg.logging.image_every_steps, total):
            tracker.log_images(step, _sample_grids(plain_gens, samples[0], samples[1], engine.device))
        if test is not None and _is_due(step, cfg.train.eval_every_steps, total):
            metrics = _evaluate(plain_gens, test, engine.device)
            tracker.log(step, metrics)
        if _is_due(step, cfg.checkpoint.every_steps, total):
            pools = {"pool_x": pool_x.state_dict(), "pool_y": pool_y.state_dict()}
            save_checkpoint(engine, run_dir, step, pools, cfg.checkpoint.keep)

    if engine.is_main:
        plain_gens = engine.unwrap("g")
        save_generators(run_dir / "export", plain_gens.g_xy, plain_gens.g_yx, cfg.model, cfg.data.crop_size)
    tracker.close()
    engine.end()
    return metrics


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, batch-norm running stats) and no autograd for the block, then back to training."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _sample_grids(gens: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """x | G(x) | F(G(x)) and y | F(y) | G(F(y)) rows for the fixed sample images."""
    with _eval_mode(gens):
        x, y = x.to(device), y.to(device)
        fake_y, fake_x = gens.g_xy(x), gens.g_yx(y)
        rec_x, rec_y = gens.g_yx(fake_y), gens.g_xy(fake_x)
    return {
        "x_to_y": image_grid([list(row) for row in zip(x, fake_y, rec_x)]),
        "y_to_x": image_grid([list(row) for row in zip(y, fake_x, rec_y)]),
    }


def _evaluate(gens: torch.nn.Module, test: tuple, device: torch.device) -> dict[str, float]:
    x, y, paired = test
    with _eval_mode(gens):
        return translation_metrics(gens.g_xy, gens.g_yx, x.to(device), y.to(device), paired)
