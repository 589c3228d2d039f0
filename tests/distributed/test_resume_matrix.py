"""Every checkpoint resumes under every backend and world size: sources {1-rank DDP, 2-rank DDP, FSDP2, ZeRO-2 and
ZeRO-3 on 2 ranks} x the same targets (ZeRO-1 runs every line of ZeRO-2's checkpoint code, and
tests/distributed/test_two_process.py trains it), through tests/distributed/resume_worker.py. The loaded weights are
exactly the saved ones (the generators' moving average included), training continues from the right step with the
saved schedule, and the first step's generator loss equals the source's own next step (bitwise on the same topology,
within float rounding elsewhere). Every backend's moving average, kept on the part of the weights each rank holds,
equals a reference average of the full weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import accelerate_launch, run_bounded
from trainer.checkpoint.format import UNIVERSAL

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
WORKER = "tests/distributed/resume_worker.py"
TOPOLOGIES = {"ddp1": (None, 1), "ddp2": ("cpu-ddp-2", 2), "fsdp2": ("fsdp2", 2), "zero2": ("zero2", 2),
              "zero3": ("zero3", 2)}  # fmt: skip
STEPS = 2


def launch(topology: str, *args: str) -> None:
    config, nproc = TOPOLOGIES[topology]
    prefix = [sys.executable] if config is None else accelerate_launch(config, nproc)
    result = run_bounded(prefix + [WORKER, *args], timeout_s=400)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint at step STEPS per topology, plus what that topology did in its next step."""
    out = {}
    for name in TOPOLOGIES:
        directory = tmp_path_factory.mktemp(name)
        launch(name, "save", str(directory))
        out[name] = directory
    return out


def checkpoint(directory: Path) -> Path:
    return directory / "run" / "checkpoints" / f"step_{STEPS:08d}"


@pytest.mark.parametrize("target", sorted(TOPOLOGIES))
def test_every_source_resumes_under(target, sources, tmp_path):
    out = tmp_path / "results.pt"
    names = sorted(sources)
    launch(target, "resume", str(out), *[str(checkpoint(sources[name])) for name in names])
    report = torch.load(out, weights_only=True)
    assert report["world"] == TOPOLOGIES[target][1]
    assert len(report["results"]) == len(names)
    for name, result in zip(names, report["results"]):
        saved = load_file(str(checkpoint(sources[name]) / UNIVERSAL))
        assert result["loaded"]["g_ema"].keys() == result["loaded"]["g"].keys(), name
        for unit in ("g", "d", "g_ema"):  # the weights the target holds are the saved ones, bit for bit
            for key, value in result["loaded"][unit].items():
                assert torch.equal(value, saved[f"{unit}/{key}"]), (name, unit, key)
        assert result["step"] == STEPS and result["schedulers"] == {"g": STEPS, "d": STEPS}, name
        next_step = json.loads((sources[name] / "next.json").read_text())
        losses = result["losses"]
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), (name, losses)
        if name == target:  # same backend and world size: the run continues exactly
            assert losses == {k: next_step[k] for k in losses}, name
            after = torch.load(sources[name] / "after.pt", weights_only=True)
            for unit in ("g", "d", "g_ema"):
                assert all(torch.equal(after[unit][k], v) for k, v in result["after"][unit].items()), (name, unit)
        else:  # the generator loss is a forward pass of the loaded weights on the same images
            assert losses["loss/g_total"] == pytest.approx(next_step["loss/g_total"], rel=1e-5), name


def test_every_backend_averages_the_generators_like_the_full_weights(sources):
    for name, directory in sources.items():
        facts = json.loads((directory / "next.json").read_text())
        assert facts["ema_error"] <= 1e-6, name  # elementwise lerp of shards == lerp of the full tensors
        sums = facts["ema_rank_sums"]
        if name in ("ddp2", "zero2"):  # whole weights on every rank: equal averages without communication
            assert sums[0] == sums[1] and facts["ema_local_share"] == 1.0, name
        elif name in ("fsdp2", "zero3"):  # sharded like the generators
            assert abs(facts["ema_local_share"] - 0.5) < 0.05, (name, facts["ema_local_share"])
