"""Engine pieces that need no second process: backend resolution, clipping, LR scaling, compile."""

import json
from types import SimpleNamespace

import pytest
import torch

from trainer.build import build_training, check_backend
from trainer.config.checks import ConfigError
from trainer.config.load import load_config
from trainer.config.sections import DistributedConfig, OptimizerConfig, TrainConfig
from trainer.runtime.backends import resolve_backend
from trainer.runtime.engine import Engine
from trainer.runtime.schedule import lr_scale, warmup


def test_auto_backend_follows_the_launcher():
    assert resolve_backend(DistributedConfig(), {}).backend == "ddp"
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    }
    resolved = resolve_backend(DistributedConfig(), env)
    assert (resolved.backend, resolved.zero_stage, resolved.offload_optimizer, resolved.offload_params) == (
        "deepspeed",
        3,
        True,
        False,
    )
    explicit = resolve_backend(DistributedConfig(backend="deepspeed", zero_stage=1), env)
    assert explicit.zero_stage == 1  # an explicit backend keeps its own settings


def test_forcing_ddp_under_a_deepspeed_launch_is_refused():
    with pytest.raises(ConfigError, match="distributed.backend=ddp but accelerate launched with a DeepSpeed config"):
        resolve_backend(DistributedConfig(backend="ddp"), {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_an_fsdp2_launch_config_selects_fsdp2_and_its_resharding():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    resolved = resolve_backend(DistributedConfig(), env)
    assert (resolved.backend, resolved.reshard_after_forward) == ("fsdp2", False)
    assert resolve_backend(DistributedConfig(backend="fsdp2"), env).reshard_after_forward is True  # explicit wins
    with pytest.raises(ConfigError, match="distributed.backend=ddp but accelerate launched with a FSDP2 config"):
        resolve_backend(DistributedConfig(backend="ddp"), env)
    with pytest.raises(ConfigError, match="asks for FSDP version 1; only FSDP2 is supported"):
        resolve_backend(DistributedConfig(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distributed.backend=fsdp2", "train.precision=fp16"], "fp16 with distributed.backend=fsdp2"),
        (["distributed.backend=fsdp2", "distributed.offload_optimizer=true"], "need distributed.backend=deepspeed"),
        (["distributed.fsdp_min_block_params=0"], "distributed.fsdp_min_block_params"),
        (["distributed.backend=fsdp2", "train.channels_last=true"], "fully_shard needs contiguous weights"),
        (["distributed.backend=fsdp2", "train.compile=true", "train.compile_mode=reduce-overhead"], "CUDA graphs"),
    ],
)
def test_fsdp2_settings_it_cannot_honour_are_refused(overrides, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, overrides)
        Engine(cfg.distributed, cfg.train, cfg.optimizer)


def test_batch_norm_is_refused_where_each_rank_keeps_its_own_statistics():
    from trainer.runtime.backends.ddp import DDPBackend
    from trainer.runtime.backends.fsdp2 import FSDP2Backend

    cfg = load_config(None, ["model.norm_d=batch"])
    check_backend(cfg, SimpleNamespace(backend=DDPBackend, backend_name="ddp"))
    with pytest.raises(ConfigError, match="batch under fsdp2: it keeps each rank's batch-norm statistics apart"):
        check_backend(cfg, SimpleNamespace(backend=FSDP2Backend, backend_name="fsdp2"))


@pytest.mark.parametrize("rule,expected", [("none", 1.0), ("linear", 8.0), ("sqrt", 8.0**0.5), ("auto", 8.0)])
def test_lr_scaling_rules(rule, expected):
    assert lr_scale(OptimizerConfig(lr_scaling=rule, base_batch=2), 16) == pytest.approx(expected)


def test_auto_scaling_is_linear_up_to_its_cap_and_warms_up():
    auto = OptimizerConfig(lr_scaling="auto")
    assert [lr_scale(auto, batch) for batch in (1, 4, 8, 16, 64)] == [1.0, 4.0, 8.0, 8.0, 8.0]
    cfg = load_config(None, [])
    assert warmup(cfg, 16).warmup_steps == 32 and warmup(cfg, 1).warmup_steps == 0  # 512 images at batch 16
    assert warmup(load_config(None, ["schedule.warmup_steps=5"]), 16).warmup_steps == 5  # the config's own
    assert warmup(load_config(None, ["optimizer.lr_scaling=linear"]), 16).warmup_steps == 0


def test_clipping_bounds_the_update_and_reports_the_raw_norm():
    engine = Engine(DistributedConfig(cpu=True), TrainConfig(), OptimizerConfig(clip_grad_norm_g=0.5))
    weight = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        weight.weight.zero_()
    units = {"g": weight, "d": torch.nn.Linear(1, 1)}
    optimizers = {n: torch.optim.SGD(u.parameters(), lr=1.0) for n, u in units.items()}  # update = -grad
    schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for n, o in optimizers.items()}
    prepared = engine.prepare(units, optimizers, schedulers)
    loss = (prepared["g"].weight * torch.full((1, 4), 3.0)).sum()  # gradient (3, 3, 3, 3): norm 6
    engine.backward(loss, "g")
    raw = engine.step("g")
    assert raw.item() == pytest.approx(6.0)
    assert weight.weight.norm().item() == pytest.approx(0.5)  # the step used the clipped gradient
    assert weight.weight.grad is None  # zeroed after the step


def test_deepspeed_fp16_loss_scale_round_trips_through_plain_numbers():
    """DeepSpeed's fp16 (CUDA only) dynamic loss scaler: its state survives a checkpoint as JSON numbers."""
    import types

    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from trainer.runtime.backends.deepspeed import scaler_state, set_scaler_state

    def optimizer() -> types.SimpleNamespace:  # the dynamic scaler as DeepSpeed's "fp16": {"loss_scale": 0} makes it
        args = {"init_scale": 2.0**16, "scale_window": 1000, "delayed_shift": 2, "consecutive_hysteresis": False,
                "min_scale": 1.0}  # fmt: skip
        return types.SimpleNamespace(loss_scaler=CreateLossScaler(torch.float16, 0, True, args))

    trained = optimizer()  # where a run of overflows left it (update_scale needs DeepSpeed's process group)
    values = {"cur_scale": 1024.0, "cur_iter": 37, "last_overflow_iter": 30, "cur_hysteresis": 1}
    for field, value in values.items():
        setattr(trained.loss_scaler, field, value)
    state = scaler_state(trained)
    assert state == values
    restored = optimizer()
    set_scaler_state(restored, json.loads(json.dumps(state)))
    for field in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
        assert getattr(restored.loss_scaler, field) == getattr(trained.loss_scaler, field), field
    static = types.SimpleNamespace(loss_scaler=CreateLossScaler(torch.float32, 1.0, False, None))
    assert scaler_state(static) == {}  # fp32/bf16: nothing to keep


def test_build_training_applies_the_auto_warm_up(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = load_config(None, ["train.batch_size=16", "model.ngf=4", "model.ndf=4", "model.generator=resnet",
                             "model.n_blocks=1", "schedule.kind=constant"])  # fmt: skip
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    build_training(cfg, engine)
    assert engine.lr("g") == pytest.approx(2e-4 * 8 / 32)  # x min(16, 8), first of 512 / 16 warm-up steps
