"""The benchmarks measure what training runs: benchmarks/train_throughput.py builds its units, pools and family
through trainer.build exactly as a training run does (they once drifted: the benchmark's pools had seeds of
their own)."""

import signal

import pytest
import torch

import trainer.train
from benchmarks.train_throughput import setup
from tests.conftest import REPO
from trainer.build import Training, build_training
from trainer.config.load import load_config
from trainer.runtime.preemption import SIGNALS

SMALL = ["model.generator=resnet", "model.n_blocks=1", "model.ngf=4", "model.ndf=4", "train.batch_size=2",
         "train.pool_size=4", "train.seed=7", "data.num_workers=0", "train.steps=1"]  # fmt: skip


class Built(Exception):
    """Raised by the recording build: the training run stops once its units exist."""


def snapshot(run: Training) -> dict:
    """What a build decides: the family, the global batch and LR scale, each unit's initial weights, each pool's
    size and random state."""
    return {
        "family": run.family.__name__,
        "global_batch": run.global_batch,
        "lr_scale": run.lr_scale,
        "units": {name: {k: v.clone() for k, v in unit.state_dict().items()} for name, unit in run.units.items()},
        "pools": [(pool.size, pool.generator.get_state().clone()) for pool in run.pools],
    }


def assert_same(ours: dict, theirs: dict) -> None:
    assert (ours["family"], ours["global_batch"], ours["lr_scale"]) == (
        theirs["family"], theirs["global_batch"], theirs["lr_scale"],
    )  # fmt: skip
    for name, weights in theirs["units"].items():
        assert weights.keys() == ours["units"][name].keys()
        assert all(torch.equal(weights[key], ours["units"][name][key]) for key in weights), name
    for (size, state), (their_size, their_state) in zip(ours["pools"], theirs["pools"]):
        assert size == their_size == 4 and torch.equal(state, their_state)


@pytest.fixture
def signal_handlers():
    """train() installs its stop handlers in this process: put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("family", ["cyclegan", "cut"])
def test_the_throughput_benchmark_builds_what_training_builds(family, tmp_path, colour_shards, monkeypatch,
                                                              signal_handlers):  # fmt: skip
    overrides = [*SMALL, f"model.family={family}", f"data.root={colour_shards}", f"train.run_dir={tmp_path / 'run'}"]
    cfg = load_config(REPO / "configs/demo-cpu.yaml", overrides)
    trained = []

    def recording(cfg, engine):
        trained.append(snapshot(build_training(cfg, engine)))
        raise Built

    monkeypatch.setattr(trainer.train, "build_training", recording)
    with pytest.raises(Built):
        trainer.train.train(cfg)
    run, _ = setup(cfg)
    assert_same(snapshot(run), trained[0])
    run.engine.end()
