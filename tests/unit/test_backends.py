"""Each backend against the `Backend` protocol; the engine delegates and never names a backend; the DDP path
never imports DeepSpeed; training imports no command-line module."""

import inspect
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from trainer.algorithms.cyclegan import build_units
from trainer.build import build_training
from trainer.config.load import load_config
from trainer.runtime.backends import Backend, build_backend
from trainer.runtime.backends.fsdp2 import shard_blocks, shard_roots
from trainer.runtime.engine import Engine

TINY = ["model.generator=resnet", "model.n_blocks=1", "model.ngf=4", "model.ndf=4", "model.n_layers_d=1",
        "data.load_size=16", "data.crop_size=16"]  # fmt: skip


def protocol_members() -> set[str]:
    methods = {name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")}
    return methods | set(Backend.__annotations__)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "deepspeed"])
def test_backend_has_every_protocol_member_with_its_signature(backend, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # as under a launcher: no rendezvous of its own
    cfg = load_config(None, [*TINY, f"distributed.backend={backend}"])
    instance = build_backend(cfg.distributed, cfg.train, cfg.optimizer, on_cuda=False)
    assert type(instance).__module__ == f"trainer.runtime.backends.{backend}"
    for name in protocol_members():
        assert hasattr(instance, name), name
        if callable(getattr(Backend, name, None)):
            wanted = list(inspect.signature(getattr(Backend, name)).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(instance, name)).parameters) == wanted, name
    assert instance.name == {"ddp": "ddp", "fsdp2": "fsdp2", "deepspeed": "zero2"}[backend]


def test_the_engine_never_branches_on_a_backend():
    source = (REPO / "trainer" / "runtime" / "engine.py").read_text()
    for word in ("deepspeed", "DistributedDataParallel", "is_deepspeed", "zero_stage", "GradScaler", "fully_shard"):
        assert word not in source.replace("DeepSpeed ZeRO", ""), word


def test_a_ddp_run_never_imports_deepspeed():
    code = f"""
import sys
from trainer.config.load import load_config
from trainer.runtime.engine import Engine
from trainer.build import build_training
cfg = load_config(None, {TINY!r})
engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
build_training(cfg, engine)
engine.universal_state("g")
assert engine.backend_name == "ddp"
print(sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed"))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_ddp_universal_state_round_trips_into_a_fresh_engine():
    def trained(steps: int) -> Engine:
        cfg = load_config(None, TINY)
        engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
        build_training(cfg, engine)
        for _ in range(steps):
            gens = engine.unwrap("g")
            loss = gens.g_yx(gens.g_xy(torch.rand(1, 3, 16, 16))).square().mean()
            engine.backward(loss, "g")
            engine.step("g")
        return engine

    source, fresh = trained(2), trained(0)
    state = source.universal_state("g")
    assert "__step__" in state and any(key.endswith(".exp_avg_sq") for key in state)
    fresh.load_universal_state("g", state)
    again = fresh.universal_state("g")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert fresh.full_shapes("g") == {k: tuple(v.shape) for k, v in source.full_state_dict("g").items()}


def test_fsdp2_shards_each_network_as_a_root_and_large_modules_as_blocks():
    cfg = load_config(None, ["model.generator=resnet", "model.n_blocks=2", "model.ngf=8", "model.discriminator=hnet"])
    gens, discs = build_units(cfg.model, cfg.loss)
    assert shard_roots(gens) == [gens.g_xy, gens.g_yx]
    trunk, head_x, head_y = discs.trunk, discs.d_x[1], discs.d_y[1]
    roots = shard_roots(discs)  # the shared H trunk is split out of both heads' networks, once
    assert len(roots) == 3 and all(any(r is m for r in roots) for m in (trunk, head_x, head_y))
    residual = [m for m in gens.g_xy.modules() if type(m).__name__ == "ResnetBlock"]
    per_block = sum(p.numel() for p in residual[0].parameters())
    blocks = shard_blocks(gens.g_xy, per_block)
    for block in residual:  # each residual block's parameters form one group (the block or its one container)
        inside = [b for b in blocks if any(b is m for m in block.modules())]
        assert len(inside) == 1 and sum(p.numel() for p in inside[0].parameters()) == per_block
    assert all(sum(p.numel() for p in b.parameters()) >= per_block for b in blocks)
    assert shard_blocks(gens.g_xy, 10**9) == []  # nothing that large: the network is the only group
    innermost = shard_blocks(gens.g_xy, 1)  # every module with parameters, children before parents
    assert all(next(m.parameters(recurse=False), None) is not None for m in innermost)
    dense = load_config(None, ["model.generator=densenet", "model.ngf=64"])
    net = build_units(dense.model, dense.loss)[0].g_xy
    lists = [m for m in net.modules() if isinstance(m, torch.nn.ModuleList)]
    assert lists and not any(b is m for b in shard_blocks(net, 500_000) for m in lists)  # no forward: never a group


def test_training_imports_no_command_line_module():
    cli = ("trainer.evaluate", "trainer.translate", "trainer.main")
    code = f"import sys, trainer.train; print(sorted(m for m in {cli!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
