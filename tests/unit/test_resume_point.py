"""Only the main rank reads and hashes checkpoints when a run looks for its resume point; the other ranks take its
verdict (the path, or the one-line error they all raise)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

import trainer.checkpoint.format
from trainer.checkpoint.format import CheckpointError
from trainer.checkpoint.sharing import RunDirSharing
from trainer.config.load import load_config
from trainer.train import _resume_point


class Rank(SimpleNamespace):
    """A stand-in engine for one rank: `broadcast_json` returns the main rank's verdict."""

    def broadcast_json(self, value):
        self.sent = value
        return value if self.is_main else self.verdict

    def barrier(self):
        pass

    def any_rank(self, flag):
        return flag


SHARED = RunDirSharing("attempt", (True, True))  # both ranks see the run directory


def console():
    return SimpleNamespace(message=lambda text: None)


def test_other_ranks_never_hash_a_checkpoint(tmp_path, monkeypatch):
    def no_hashing(path):
        raise AssertionError(f"a non-main rank hashed {path}")

    checkpoint = tmp_path / "checkpoints" / "step_00000004"  # what find_resume would hash on this rank
    checkpoint.mkdir(parents=True)
    for name in ("train_state.json", "units.safetensors"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "COMPLETE").write_text('{"train_state.json": "0", "units.safetensors": "0"}')
    monkeypatch.setattr(trainer.checkpoint.format, "sha256_file", no_hashing)
    monkeypatch.setattr("trainer.train.check_architecture", lambda path, model: None)
    cfg = load_config(None, [f"train.run_dir={tmp_path}"])
    rank = Rank(is_main=False, rank=1, verdict={"value": str(checkpoint), "error": None})
    assert _resume_point(cfg, tmp_path, rank, console(), SHARED) == checkpoint
    rank.verdict = {"value": None, "error": "checkpoint X is damaged: units.safetensors does not match its sha256"}
    with pytest.raises(CheckpointError, match="^checkpoint X is damaged"):
        _resume_point(cfg, tmp_path, rank, console(), SHARED)


def test_the_main_rank_sends_its_verdict(tmp_path):
    cfg = load_config(None, [f"train.run_dir={tmp_path}", f"train.resume={tmp_path / 'missing'}"])
    main = Rank(is_main=True, rank=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        _resume_point(cfg, Path(tmp_path), main, console(), SHARED)
    assert main.sent["value"] is None and "does not exist" in main.sent["error"]
