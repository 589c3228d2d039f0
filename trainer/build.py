"""Assembling a run from its config: the engine (backend and precision resolved), the family's seeded units with
their optimizers and schedules, the image pools, the loader, the test-split evaluator and the sample images. The
training loop and every benchmark build through here, so that a benchmark measures what training runs."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from shards.cpu_budget import cpu_budget
from trainer.algorithms.family import Family, family
from trainer.algorithms.pool import ImagePool
from trainer.config.checks import ConfigError
from trainer.config.model import LossConfig
from trainer.config.schema import Config
from trainer.data.formats import domain_formats
from trainer.data.loader import UnpairedLoader
from trainer.data.plan import DOMAINS
from trainer.data.test_sets import load_test_images
from trainer.eval.evaluator import NO_INCEPTION, NO_RGB, Evaluator, load_inception
from trainer.models import set_activation_checkpointing
from trainer.observe.console import Console
from trainer.runtime.cpu_threads import loader_workers
from trainer.runtime.engine import Engine
from trainer.runtime.schedule import build_optimizer, build_scheduler, lr_scale, warmup


@dataclasses.dataclass
class Training:
    """What one update needs: the engine, model.family's functions, the prepared units {"g", "d"}, this rank's
    image pools, the loss settings, and the global batch with the LR scale applied for it."""

    engine: Engine
    family: Family
    units: dict[str, nn.Module]
    pools: tuple[ImagePool, ImagePool]
    loss: LossConfig
    global_batch: int
    lr_scale: float


def build_engine(cfg: Config) -> tuple[Engine, Config]:
    """The engine of `cfg`, and `cfg` with what the engine resolved (distributed.backend=auto,
    train.precision=auto, train.cpu_threads=auto, data.num_workers=auto)."""
    log_with = None if cfg.logging.wandb == "disabled" else "wandb"
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer, log_with=log_with)
    budget = cpu_budget(measure_load=cfg.train.cpu_threads == "auto")
    workers = loader_workers(cfg.data.num_workers, engine.device.type == "cuda", budget)
    engine.use_cpu_threads(cfg.train.cpu_threads, workers, budget)
    data = dataclasses.replace(cfg.data, num_workers=workers)
    return engine, dataclasses.replace(cfg, distributed=engine.cfg, train=engine.train_cfg, data=data)


def build_pools(cfg: Config, rank: int) -> tuple[ImagePool, ImagePool]:
    """This rank's pools of fake X and fake Y images (train.pool_size), seeded from train.seed and the rank."""
    return tuple(ImagePool(cfg.train.pool_size, seed=cfg.train.seed * 1000 + 2 * rank + i) for i in (0, 1))


def check_backend(cfg: Config, engine: Engine) -> None:
    """Refuse what the backend's capabilities cannot honour (its flags decide, never its name)."""
    if cfg.loss.gan_mode == "wgangp" and not engine.backend.double_backward:
        raise ConfigError(
            f"loss.gan_mode=wgangp under {engine.backend_name}: the gradient penalty differentiates the "
            "discriminators twice, and this backend frees their gathered weights after the first backward; use DDP "
            "or DeepSpeed ZeRO-1/2 (launch/zero2.yaml), or another gan_mode"
        )
    if "batch" in (cfg.model.norm_g, cfg.model.norm_d) and not engine.backend.batch_norm_synced:
        raise ConfigError(
            f"model.norm_g/norm_d=batch under {engine.backend_name}: it keeps each rank's batch-norm statistics "
            "apart (no SyncBatchNorm); use instance norm or DDP"
        )


def build_training(cfg: Config, engine: Engine) -> Training:
    """Seeded units of model.family, AdamW optimizers with the scaled LRs and schedules, prepared by the engine,
    the EMA of the generators under ema.enabled, and the pools."""
    check_backend(cfg, engine)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    chosen = family(cfg.model.family)
    gens, discs = chosen.build_units(cfg.model, cfg.loss, cfg.train.fuse_generator_passes)
    if cfg.train.activation_checkpointing:  # before compile (in engine.prepare), which guards on the flag
        for gen in (gens.g_xy, gens.g_yx):
            if gen is not None:
                set_activation_checkpointing(gen, True)
    if cfg.train.channels_last:
        gens, discs = gens.to(memory_format=torch.channels_last), discs.to(memory_format=torch.channels_last)
    global_batch = engine.global_batch(cfg.train.batch_size)
    scale = lr_scale(cfg.optimizer, global_batch)
    optimizers, schedulers = {}, {}
    for name, unit, lr in (("g", gens, cfg.optimizer.lr), ("d", discs, cfg.optimizer.lr_d or cfg.optimizer.lr)):
        optimizers[name] = build_optimizer(unit.parameters(), cfg.optimizer, lr * scale, engine.device)
        schedulers[name] = build_scheduler(optimizers[name], warmup(cfg, global_batch), cfg.train.steps)
    units = engine.prepare({"g": gens, "d": discs}, optimizers, schedulers)
    if cfg.ema.enabled:
        engine.attach_ema(cfg.ema)
    pools = build_pools(cfg, engine.rank)
    return Training(engine, chosen, units, pools, cfg.loss, global_batch, scale)


def build_loader(cfg: Config, engine: Engine) -> UnpairedLoader:
    """This rank's loader of unpaired training batches."""
    return UnpairedLoader(
        cfg.data, cfg.train.batch_size, cfg.train.seed, engine.rank, engine.world_size, engine.device,
        domain_formats(cfg),
    )  # fmt: skip


def build_evaluator(cfg: Config, engine: Engine, console: Console) -> Evaluator | None:
    """The evaluator of this rank's share of the test split (None without one), after checking eval.select."""
    test = load_test_images(cfg.data, cfg.eval.images, "cpu", engine.rank, engine.world_size, domain_formats(cfg))
    if test is None:
        if cfg.eval.select != "none":
            raise ConfigError(f"eval.select={cfg.eval.select} needs x-test/y-test splits in data.root={cfg.data.root}")
        return None
    if cfg.eval.select == "psnr" and not test.paired:
        raise ConfigError("eval.select=psnr needs a test split with a known answer (synthetic data); use cycle or fid")
    inception = load_inception(cfg.eval.inception_weights, engine.device) if cfg.eval.inception_weights else None
    channels = sorted({cfg.model.channels(d) for d in DOMAINS} - {1, 3})
    if inception is None:
        console.message(NO_INCEPTION)
    elif channels:
        console.message(NO_RGB.format(channels[0]))
        inception = None
    return Evaluator(test, cfg.eval, cfg.model.input_nc, engine.device, engine.world_size, inception)
