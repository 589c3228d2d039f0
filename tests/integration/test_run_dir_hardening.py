"""Run directories from elsewhere (issue 27): planted symlinks cannot redirect a resumed run's writes or deletions,
checkpoint JSON is bounded, a damaged only-checkpoint is never silently replaced, a checkpoint's step must match
its name, and a resume on other training shards says so and starts their order afresh."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from shards.manifest import sha256_file
from shards.synthetic import write_synthetic
from tests.conftest import run_bounded, train_command
from trainer.checkpoint.format import (
    COMPLETE,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    complete_checkpoints,
    read_best,
    read_train_state,
    verify_checkpoint,
)
from trainer.checkpoint.resume import find_resume, set_aside_damaged
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader
from trainer.runtime.run_files import UnsafeRunDir, check_run_dir, inside, open_append, write_atomic
from trainer.runtime.run_lock import RunLock

TINY = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "train.batch_size=2", "data.num_workers=0",
        "train.pool_size=4", "eval.every_steps=0", "logging.image_every_steps=0", "logging.every_steps=2",
        "train.precision=fp32", "checkpoint.every_steps=2", "checkpoint.keep=3"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(colour_shards, tmp_path_factory) -> Path:
    """A run directory with checkpoints at steps 2 and 4 and an export."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_bounded(train_command(colour_shards, run_dir, *TINY, "train.steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    """A fresh copy of the trained run directory, and a directory outside it holding a file to protect."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    return copy


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def rehash(path: Path) -> None:
    """Rewrite a checkpoint's COMPLETE so that its (edited) files match again."""
    names = json.loads((path / COMPLETE).read_text())
    (path / COMPLETE).write_text(json.dumps({name: sha256_file(path / name) for name in names}))


PLANTED = {  # what a link at this place in a run directory redirected before issue 27
    ".lock": "truncated its target",
    "metrics.jsonl": "appended to its target",
    "config.yaml": "overwrote its target",
    "export": "wrote the export into another directory",
    "images": "wrote sample grids into another directory",
    "checkpoints/latest.tmp": "was written through",
    "checkpoints/step_00000006": "was resumed from",
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_a_symlink_planted_in_a_run_directory_is_refused_before_anything_is_written(run_copy, planted):
    outside = run_copy.parent / "outside"
    link = run_copy / planted
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.symlink_to(outside if planted in ("export", "images", "checkpoints/step_00000006") else outside / "precious")
    with pytest.raises(UnsafeRunDir, match=f"{link} is a symlink"):
        check_run_dir(run_copy)


def test_a_fifo_planted_in_a_run_directory_is_refused_before_anything_waits_on_it(run_copy):
    (run_copy / "metrics.jsonl").unlink()
    os.mkfifo(run_copy / "metrics.jsonl")  # a resume reads metrics.jsonl: it would wait for a writer forever
    with pytest.raises(UnsafeRunDir, match="metrics.jsonl is neither a file nor a directory"):
        check_run_dir(run_copy)


def test_checkpoints_linked_to_another_runs_are_refused_and_never_rotated(run_copy, trained):
    other = run_copy.parent / "other-run"
    shutil.copytree(trained, other)
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(UnsafeRunDir, match="checkpoints is a symlink"):
        check_run_dir(run_copy)
    assert complete_checkpoints(run_copy) == []  # nothing to rotate, resume from or delete through the link
    with pytest.raises(UnsafeRunDir):
        inside(run_copy, run_copy / "checkpoints" / "step_00000006.tmp")
    assert [p.name for p in complete_checkpoints(other)] == ["step_00000002", "step_00000004"]


def test_the_files_of_a_run_directory_are_never_written_through_a_link(run_copy):
    precious = run_copy.parent / "outside" / "precious"
    latest_tmp = run_copy / "checkpoints" / "latest.tmp"
    latest_tmp.symlink_to(precious)
    write_atomic(run_copy / "checkpoints" / "latest", "step_00000004\n")  # replaces the link, never follows it
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(precious)
    with pytest.raises(OSError):
        open_append(run_copy / "metrics.jsonl")
    (run_copy / ".lock").unlink(missing_ok=True)
    (run_copy / ".lock").symlink_to(precious)
    with pytest.raises(UnsafeRunDir, match=".lock is a symlink"):
        RunLock(run_copy).acquire()
    assert precious.read_text() == "keep me\n"
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_00000004\n"


def test_a_resumed_training_on_a_run_directory_with_a_planted_link_stops_in_one_line(colour_shards, run_copy):
    precious = run_copy.parent / "outside" / "precious"
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(precious)
    result = run_bounded(train_command(colour_shards, run_copy, *TINY, "train.steps=6"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {run_copy / 'metrics.jsonl'} is a symlink")
    assert precious.read_text() == "keep me\n"
    assert not checkpoint(run_copy, 6).exists()


def test_a_damaged_only_checkpoint_is_refused_and_kept(colour_shards, run_copy):
    shutil.rmtree(checkpoint(run_copy, 2))
    units = checkpoint(run_copy, 4) / UNIVERSAL
    data = bytearray(units.read_bytes())
    data[-1] ^= 0xFF
    units.write_bytes(bytes(data))
    reports: list[str] = []
    with pytest.raises(CheckpointError, match="has 1 checkpoint.s. and none is intact"):
        find_resume(run_copy, "auto", reports.append)
    assert "does not match its sha256" in reports[0]
    result = run_bounded(train_command(colour_shards, run_copy, *TINY, "train.steps=6"))
    assert result.returncode == 2, result.stdout[-2000:]
    assert "none is intact" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert units.read_bytes() == bytes(data)  # neither restarted over nor rotated away


def test_a_damaged_newer_checkpoint_is_set_aside_so_rotation_keeps_the_new_ones(run_copy):
    (checkpoint(run_copy, 4) / TRAIN_STATE).write_text("{}")
    resumed = find_resume(run_copy, "auto", lambda message: None)
    assert resumed == checkpoint(run_copy, 2)
    moved = set_aside_damaged(run_copy, resumed)
    assert [p.name for p in moved] == ["step_00000004.damaged"]
    assert [p.name for p in complete_checkpoints(run_copy)] == ["step_00000002"]
    shutil.copytree(moved[0], checkpoint(run_copy, 4))  # damaged again, after a first one was set aside
    assert [p.name for p in set_aside_damaged(run_copy, resumed)] == ["step_00000004.damaged-2"]


def test_a_step_that_disagrees_with_the_checkpoint_name_is_refused(run_copy):
    path = checkpoint(run_copy, 4)
    state = json.loads((path / TRAIN_STATE).read_text())
    (path / TRAIN_STATE).write_text(json.dumps({**state, "step": 10**30}))
    rehash(path)
    with pytest.raises(CheckpointError, match="has step=1000000000000000000000000000000"):
        verify_checkpoint(path)
    (path / TRAIN_STATE).write_text(json.dumps({**state, "step": 3}))
    rehash(path)
    with pytest.raises(CheckpointError, match="has step=3, its name says 4"):
        verify_checkpoint(path)


def test_deeply_nested_checkpoint_json_is_one_line_and_a_deep_complete_falls_back(run_copy):
    deep = "[" * 100_000 + "]" * 100_000
    (checkpoint(run_copy, 4) / COMPLETE).write_text(deep)
    reports: list[str] = []
    assert find_resume(run_copy, "auto", reports.append) == checkpoint(run_copy, 2)
    assert "nests deeper than" in reports[0] or "not valid JSON" in reports[0]
    (checkpoint(run_copy, 2) / TRAIN_STATE).write_text('{"step": ' + deep + "}")
    rehash(checkpoint(run_copy, 2))
    with pytest.raises(CheckpointError, match="train_state.json"):
        verify_checkpoint(checkpoint(run_copy, 2))
    (run_copy / "checkpoints" / "best.json").write_text(deep)
    with pytest.raises(CheckpointError, match="best.json"):
        read_best(run_copy)


def test_a_fifo_in_a_checkpoint_is_never_waited_on(run_copy):
    path = checkpoint(run_copy, 4) / TRAIN_STATE
    path.unlink()
    os.mkfifo(path)  # a writer that never comes: reading must not wait for it
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_train_state(checkpoint(run_copy, 4))
    with pytest.raises(CheckpointError, match="train_state.json is missing or not a regular file"):
        verify_checkpoint(checkpoint(run_copy, 4))


def test_a_resume_on_other_training_shards_starts_their_order_afresh(colour_shards, tmp_path):
    other = tmp_path / "stripes"
    write_synthetic(other, "stripes", size=32, train=24, test=4, seed=1, maxcount=8)
    exact = {"load_size": 32, "crop_size": 32, "flip": False}
    old = UnpairedLoader(DataConfig(root=str(colour_shards), num_workers=0, **exact), 4, 0, 0, 1, torch.device("cpu"))
    list(itertools.islice(old, 30))  # 96 samples per epoch: into epoch 1, past the new set's 24
    state = old.state_dict()
    new = UnpairedLoader(DataConfig(root=str(other), num_workers=0, **exact), 4, 0, 0, 1, torch.device("cpu"))
    note = new.load_state_dict(state)
    assert note is not None and "training shards differ" in note
    assert new.state_dict()["slots"] == {"0": {"x": [0, 0], "y": [0, 0]}}
    same = UnpairedLoader(DataConfig(root=str(colour_shards), num_workers=0, **exact), 4, 0, 0, 1, torch.device("cpu"))
    assert same.load_state_dict(state) is None
    assert same.state_dict()["slots"] == state["slots"]
