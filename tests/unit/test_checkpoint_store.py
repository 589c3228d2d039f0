"""The checkpoint store (checkpoint.remote) against moto's S3 server on loopback: uploads in the background (files,
then COMPLETE, then latest; rotation; a newer checkpoint replacing a waiting one; a store that is down and comes
back), what the store says checked, and resuming from it on a node whose run directory is empty or behind."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

import trainer.checkpoint.upload as upload_module
from shards.bounded_read import MAX_SMALL_FILE
from shards.manifest import sha256_file
from shards.remote import RemoteOptions
from tests.conftest import eventually
from trainer.checkpoint.format import BEST, COMPLETE, TRAIN_STATE, UNIVERSAL, CheckpointError
from trainer.checkpoint.remote_resume import check_store, clear_store, fetch_where_needed, resume_from_store
from trainer.checkpoint.store import CheckpointStore, StoreError
from trainer.checkpoint.upload import CheckpointUploader, Upload
from trainer.config.checks import ConfigError


def published(run_dir: Path, step: int, payload: bytes = b"units", world_size: int = 1) -> Path:
    """A published checkpoint of `step` in run_dir (the files a save writes, with their COMPLETE marker)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / UNIVERSAL).write_bytes(payload + bytes([step]))
    (path / TRAIN_STATE).write_text(json.dumps({"step": step, "world_size": world_size, "backend": "ddp"}))
    (path / "rank_00000.safetensors").write_bytes(b"rank" + bytes([step]))
    (path / COMPLETE).write_text(json.dumps({p.name: sha256_file(p) for p in sorted(path.iterdir())}))
    return path


def store_at(s3_server, bucket: str) -> CheckpointStore:
    return CheckpointStore(f"{s3_server.bucket(bucket)}/run", RemoteOptions(s3_endpoint_url=s3_server.endpoint))


def uploader(store: CheckpointStore, messages: list[str], keep: int = 1, every: int = 0, confirmed=None):
    return CheckpointUploader(store, keep, every, max_behind=2, report=messages.append, confirmed=confirmed)


def listing(s3_server, store: CheckpointStore) -> list[str]:
    root = store.url.removeprefix("s3://")
    return sorted(name.removeprefix(root + "/") for name in s3_server.filesystem().find(root))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(upload_module, "RETRY_S", 0.05)
    monkeypatch.setattr(upload_module, "MAX_RETRY_S", 0.2)


def test_an_upload_sends_the_files_then_complete_then_latest(s3_server, tmp_path, monkeypatch):
    store, messages, order = store_at(s3_server, "order"), [], []
    put_file, put_bytes = CheckpointStore.put_file, CheckpointStore.put_bytes
    monkeypatch.setattr(
        CheckpointStore, "put_file", lambda s, local, name: (order.append(name), put_file(s, local, name))
    )
    monkeypatch.setattr(
        CheckpointStore, "put_bytes", lambda s, name, data: (order.append(name), put_bytes(s, name, data))
    )
    up = uploader(store, messages)
    checkpoint = published(tmp_path, 2)
    (tmp_path / "checkpoints" / BEST).write_text(
        json.dumps({"step": 2, "select": "psnr", "score": 20.0, "metrics": {}})
    )
    up.submit(Upload(step=2, checkpoint=checkpoint))
    assert up.close(30) and messages == []
    names = [name.rsplit("/", 1)[-1] for name in order]  # COMPLETE and latest are written from memory
    assert sorted(names[:3]) == ["rank_00000.safetensors", TRAIN_STATE, UNIVERSAL]
    assert names[3:] == [COMPLETE, "latest", BEST]
    assert store.complete_hashes(2) == json.loads((checkpoint / COMPLETE).read_text())
    assert store.read_small("checkpoints/latest") == b"step_00000002\n" and up.confirmed == 2


def test_the_store_is_rotated_like_the_run_directory(s3_server, tmp_path):
    store, messages = store_at(s3_server, "rotation"), []
    for step in (2, 4, 6):
        published(tmp_path, step)
    store.put_bytes("checkpoints/step_00000003/units.safetensors", b"an upload a kill interrupted")
    store.put_bytes("checkpoints/step_00000009/units.safetensors", b"an upload still running")
    up = uploader(store, messages, keep=1, every=4)
    for step in (2, 4, 6):
        up.submit(Upload(step=step, checkpoint=tmp_path / "checkpoints" / f"step_{step:08d}"))
        assert eventually(lambda: up.confirmed == step)  # noqa: B023
    assert up.close(30)
    assert store.complete_steps() == [4, 6]  # 2 rotated out, 4 kept as a multiple of keep_every_steps
    assert store.steps() == [4, 6, 9]  # the interrupted upload is gone, the newer unfinished one is not touched


def test_a_newer_checkpoint_replaces_a_waiting_one(s3_server, tmp_path, monkeypatch):
    store, messages, sent = store_at(s3_server, "replace"), [], []
    release = threading.Event()
    put_file = CheckpointStore.put_file

    def slow_put(s, local, name):
        release.wait(30)
        sent.append(name)
        put_file(s, local, name)

    monkeypatch.setattr(CheckpointStore, "put_file", slow_put)
    up = uploader(store, messages, keep=3)
    for step in (2, 4, 6):
        up.submit(Upload(step=step, checkpoint=published(tmp_path, step)))
        time.sleep(0.1)  # 2 is in flight when 4 and 6 come
    assert up.pending_steps() == {2, 6} and up.behind() == 3  # 4 replaced while waiting
    release.set()
    assert up.close(30)
    assert store.complete_steps() == [2, 6]
    assert not any("step_00000004" in name for name in sent)


def test_uploads_wait_for_a_store_that_is_down_and_catch_up(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: ours are the ones under test
    store, messages = store_at(s3_server, "downtime"), []
    up = uploader(store, messages, keep=5)
    up.submit(Upload(step=2, checkpoint=published(tmp_path, 2)))
    assert up.close(30) is True
    up = uploader(store, messages, keep=5, confirmed=2)
    s3_server.server.stop()
    try:
        up.submit(Upload(step=4, checkpoint=published(tmp_path, 4)))
        assert eventually(lambda: any(m.startswith("warning: uploading checkpoint step_00000004 failed (cannot ")
                                      for m in messages))  # fmt: skip
        for step in (6, 8):
            up.submit(Upload(step=step, checkpoint=published(tmp_path, step)))
        assert up.confirmed == 2 and up.lag_steps(8) == 6
        assert f"warning: checkpoint uploads to {store.url} are 3 checkpoints behind (newest complete there: " \
               "step_00000002); training goes on, uploads keep retrying" in messages  # fmt: skip
    finally:
        s3_server.server.start()
    assert up.close(60)
    complete = store.complete_steps()  # 4 and 6 may each be replaced by a newer one while failing: timing decides
    assert up.confirmed == 8 and complete[0] == 2 and complete[-1] == 8
    assert any(m.startswith(f"checkpoint uploads to {store.url} caught up: step_0000000") for m in messages)


def test_what_the_store_says_is_checked(s3_server, tmp_path):
    store = store_at(s3_server, "hostile")
    for name in ("step_1", "step_00000002.tmp", "stepx", "step_000000030"):
        store.put_bytes(f"checkpoints/{name}/COMPLETE", b"{}")
    store.put_bytes("checkpoints/step_00000005/COMPLETE", json.dumps({"../../escape": "0" * 64}).encode())
    store.put_bytes("checkpoints/step_00000006/COMPLETE", json.dumps({"a/b": "0" * 64}).encode())
    store.put_bytes("checkpoints/step_00000007/COMPLETE", b"[1, 2]")
    store.put_bytes("checkpoints/step_00000008/COMPLETE", b" " * (MAX_SMALL_FILE + 1))
    assert store.steps() == [5, 6, 7, 8]
    with pytest.raises(CheckpointError, match="escape"):
        store.complete_hashes(5)
    with pytest.raises(CheckpointError, match="is not a file of the checkpoint"):
        store.complete_hashes(6)
    with pytest.raises(CheckpointError, match=r"is not a \{file: sha256\} record"):
        store.complete_hashes(7)
    with pytest.raises(StoreError, match="cannot read checkpoints/step_00000008/COMPLETE"):
        store.complete_hashes(8)
    store.put_bytes("checkpoints/step_00000009/units.safetensors", b"tampered")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        store.download("checkpoints/step_00000009/units.safetensors", tmp_path / "units", "0" * 64)
    assert list(tmp_path.iterdir()) == []  # nothing kept of a download that does not match


def test_a_store_url_and_credentials_are_checked_at_start(s3_server, monkeypatch):
    with pytest.raises(ConfigError, match="checkpoint.remote='/tmp/x' is not a store URL; expected s3://"):
        CheckpointStore("/tmp/x", RemoteOptions())
    store = CheckpointStore("s3://no-such-bucket/run", RemoteOptions(s3_endpoint_url=s3_server.endpoint))
    with pytest.raises(ConfigError, match=r"checkpoint.remote=s3://no-such-bucket/run: cannot list the store \("):
        store.check_access()


def test_a_fresh_node_resumes_from_the_stores_newest_intact_checkpoint(s3_server, tmp_path):
    store, messages = store_at(s3_server, "fresh"), []
    up = uploader(store, messages, keep=3)
    for step in (2, 4, 6):
        up.submit(Upload(step=step, checkpoint=published(tmp_path / "old", step)))
        assert eventually(lambda: up.confirmed == step)  # noqa: B023
    assert up.close(30) and store.complete_steps() == [2, 4, 6]
    store.put_bytes("checkpoints/step_00000006/units.safetensors", b"damaged in the store")

    fresh, reports = tmp_path / "fresh", []
    got = resume_from_store(store, fresh, None, reports.append)
    assert got == fresh / "checkpoints" / "step_00000004"
    assert (got / UNIVERSAL).read_bytes() == b"units\x04"
    assert reports[0].startswith(f"skipping {store.url}/checkpoints/step_00000006/units.safetensors does not match")
    assert reports[1] == f"downloaded {store.url}/checkpoints/step_00000004 (verified) to continue from"

    behind = tmp_path / "behind"
    local = published(behind, 2)
    assert resume_from_store(store, behind, local, reports.append) == behind / "checkpoints" / "step_00000004"
    ahead = published(tmp_path / "ahead", 8)
    assert resume_from_store(store, tmp_path / "ahead", ahead, reports.append) == ahead


def test_a_store_that_cannot_be_read_at_start(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = store_at(s3_server, "unreadable")
    local, reports = published(tmp_path, 2), []
    s3_server.server.stop()
    try:
        assert resume_from_store(store, tmp_path, local, reports.append) == local
        assert reports[0].startswith("warning: cannot list checkpoints at ") and reports[0].endswith(
            "; continuing from the run directory's step_00000002"
        )
        with pytest.raises(CheckpointError, match="the run directory has no checkpoint to continue from either"):
            resume_from_store(store, tmp_path / "empty", None, reports.append)
    finally:
        s3_server.server.start()


def test_starting_over_refuses_or_clears_a_store_with_checkpoints(s3_server, tmp_path):
    store, messages = store_at(s3_server, "over"), []
    up = uploader(store, messages)
    up.submit(Upload(step=2, checkpoint=published(tmp_path, 2)))
    assert up.close(30)
    with pytest.raises(ConfigError, match="already has checkpoints; use train.resume=auto to continue, or train.ov"):
        clear_store(store, overwrite=False)
    clear_store(store, overwrite=True)
    assert store.steps() == []


class OneRank:
    """What the store functions ask of the engine, for rank `rank` of `world_size` (any_rank: this rank's flag)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size, self.backend_name = rank, world_size, "ddp"

    def any_rank(self, flag: bool) -> bool:
        return flag


def test_check_store_stops_on_a_refusal_and_says_when_the_store_is_down(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    said: list[str] = []
    store = store_at(s3_server, "check")
    assert check_store(store, True, OneRank(), said.append) and said == []
    assert check_store(None, True, OneRank(), said.append)  # no checkpoint.remote: nothing to check
    missing = CheckpointStore("s3://no-bucket-here/run", RemoteOptions(s3_endpoint_url=s3_server.endpoint))
    with pytest.raises(ConfigError, match="checkpoint.remote=s3://no-bucket-here/run: cannot list the store"):
        check_store(missing, True, OneRank(), said.append)
    assert check_store(missing, False, OneRank(), said.append)  # a rank that does not use the store checks nothing
    s3_server.server.stop()
    try:
        assert not check_store(store, True, OneRank(), said.append)
        assert said[0].startswith(f"warning: cannot list {store.url}: ")
    finally:
        s3_server.server.start()


def test_an_unexpected_error_is_reported_and_retried_without_sending_twice(s3_server, tmp_path, monkeypatch):
    store, messages, sent = store_at(s3_server, "flaky"), [], []
    put_file, put_bytes = CheckpointStore.put_file, CheckpointStore.put_bytes
    failed = []

    def flaky_put_bytes(s, name, data):
        if name.endswith(COMPLETE) and not failed:
            failed.append(name)
            raise RuntimeError("a bug or a store answering nonsense")
        put_bytes(s, name, data)

    monkeypatch.setattr(
        CheckpointStore, "put_file", lambda s, local, name: (sent.append(name), put_file(s, local, name))
    )
    monkeypatch.setattr(CheckpointStore, "put_bytes", flaky_put_bytes)
    up = uploader(store, messages)
    up.submit(Upload(step=2, checkpoint=published(tmp_path, 2)))
    assert up.close(30) and store.complete_steps() == [2]
    assert messages == ["warning: uploading checkpoint step_00000002 failed (a bug or a store answering nonsense); "
                        "retrying, training goes on"]  # fmt: skip
    assert sorted(sent) == sorted(
        f"checkpoints/step_00000002/{n}" for n in ("rank_00000.safetensors", TRAIN_STATE, UNIVERSAL)
    )  # fmt: skip  (each once)


def test_no_intact_checkpoint_in_the_store_and_none_here_stops(s3_server, tmp_path):
    store, messages = store_at(s3_server, "allbad"), []
    up = uploader(store, messages, keep=2)
    for step in (2, 4):
        up.submit(Upload(step=step, checkpoint=published(tmp_path / "old", step)))
        assert eventually(lambda: up.confirmed == step)  # noqa: B023
    assert up.close(30)
    for step in (2, 4):
        store.put_bytes(f"checkpoints/step_{step:08d}/{UNIVERSAL}", b"damaged")
    with pytest.raises(CheckpointError, match=r"none of the 2 complete checkpoint\(s\) in s3://allbad/run is intact"):
        resume_from_store(store, tmp_path / "fresh", None, messages.append)


def test_a_rank_fetches_the_files_its_copy_lacks(s3_server, tmp_path):
    """A checkpoint whose rank 1 file went to the store from another node: rank 1, now beside the main rank, gets
    it from the store; a rank on another node gets all it loads into its own run directory."""
    store = store_at(s3_server, "layout")
    local = published(tmp_path / "main", 2, world_size=2)  # the main rank's copy: no rank 1 file
    rank1 = b"rank 1 of step 2"
    hashes = json.loads((local / COMPLETE).read_text())
    for name in hashes:
        store.put_bytes(f"checkpoints/step_00000002/{name}", (local / name).read_bytes())
    store.put_bytes("checkpoints/step_00000002/rank_00001.safetensors", rank1)
    hashes["rank_00001.safetensors"] = hashlib.sha256(rank1).hexdigest()
    store.put_bytes("checkpoints/step_00000002/COMPLETE", json.dumps(hashes).encode())

    assert fetch_where_needed(store, local, tmp_path / "main", OneRank(rank=1, world_size=2)) == local
    assert (local / "rank_00001.safetensors").read_bytes() == rank1
    elsewhere = tmp_path / "node1"
    got = fetch_where_needed(store, Path("/nowhere/checkpoints/step_00000002"), elsewhere, OneRank(1, 2))
    assert got == elsewhere / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in got.iterdir()) == ["rank_00001.safetensors", TRAIN_STATE, UNIVERSAL]
    with pytest.raises(CheckpointError, match="step_00000009 is not complete in the store"):
        fetch_where_needed(store, Path("/nowhere/checkpoints/step_00000009"), elsewhere, OneRank(1, 2))
