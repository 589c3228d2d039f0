"""A kill -9 at any phase of a checkpoint's save leaves a run that the same command finishes with exactly the
weights of an uninterrupted run; what the crash left behind is never resumed from and is cleaned up. The same
holds for asynchronous saves (checkpoint.async_save), killed while the background writer is at work, and an
asynchronous run ends with exactly the weights of a synchronous one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics, run_bounded, train_command
from tests.integration.crash_during_save import PHASES
from trainer.checkpoint.format import UNIVERSAL

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "train.precision=fp32",
        "data.num_workers=1", "train.pool_size=4", "eval.images=4", "logging.image_every_steps=0",
        "train.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=1", "logging.every_steps=2"]  # fmt: skip
CRASH = "tests/integration/crash_during_save.py"
ASYNC = "checkpoint.async_save=true"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(run_dir / "checkpoints" / "step_00000008" / UNIVERSAL))
    for name in ("g_xy", "g_yx"):
        out.update(
            {f"export/{name}/{k}": v for k, v in load_file(str(run_dir / "export" / f"{name}.safetensors")).items()}
        )
    return out


@pytest.fixture(scope="module")
def reference(colour_shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_bounded(train_command(colour_shards, run_dir, *TINY))
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(run_dir)


def test_asynchronous_saves_end_with_the_weights_of_synchronous_ones(reference, colour_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_bounded(train_command(colour_shards, run_dir, *TINY, ASYNC))
    assert result.returncode == 0, result.stderr[-3000:]
    final = weights(run_dir)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000008"]
    stalls = [r["checkpoint/stall_s"] for r in read_metrics(run_dir) if "checkpoint/stall_s" in r]
    assert len(stalls) == 4 and all(s >= 0 for s in stalls)


CASES = [(phase, False) for phase in PHASES] + [("mid-units", True)]


@pytest.mark.parametrize("phase,asynchronous", CASES, ids=[f"{p}{'-async' if a else ''}" for p, a in CASES])
def test_a_kill_during_a_save_then_the_same_command_finishes_like_an_uninterrupted_run(
    phase, asynchronous, reference, colour_shards, tmp_path
):
    run_dir = tmp_path / "run"
    command = train_command(colour_shards, run_dir, *TINY, *([ASYNC] if asynchronous else []))
    crashed = run_bounded([sys.executable, CRASH, phase, "4", *command[2:]])
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    left = sorted(p.name for p in checkpoints.iterdir())
    complete = "step_00000004" if phase in ("before-latest", "mid-rotation") else "step_00000002"
    assert complete in left
    if phase == "before-rename":  # finished but not renamed: the debris that must never be resumed from
        assert (checkpoints / "step_00000004.tmp" / "COMPLETE").is_file()

    finished = run_bounded(command)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming from {checkpoints / complete} at step {int(complete[5:])}" in finished.stdout
    final = weights(run_dir)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), phase
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000008"], left  # debris removed
    assert sorted(r["step"] for r in read_metrics(run_dir) if "loss/g_total" in r) == [2, 4, 6, 8]
