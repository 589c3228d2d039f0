"""Shards over HTTP, against real servers on loopback (shards.serve's, with faults injected): the same batches as
from the local directory, exact mid-epoch resume, retries that change nothing, shards and stores that stay down,
the node-local cache, and the shard tools on a remote root."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from shards.cache import ShardCache
from shards.manifest import MANIFEST, read_manifest
from shards.remote import RemoteOptions, ShardUnavailable, open_stream
from shards.serve import ShardRequestHandler, ShardServer
from shards.streams import Reading
from shards.urls import ShardsError
from tests.conftest import REPO, run_bounded, train_command
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig
from trainer.data.health import LOST, BadSampleCounter
from trainer.data.loader import UnpairedLoader
from trainer.data.plan import DataError, train_shards
from trainer.data.stream import DomainStream, shard_samples

EXACT = dict(load_size=32, crop_size=32, flip=False)
FAST = dict(retries=3, retry_backoff_s=0.01, io_timeout_s=10.0)


class FaultyHandler(ShardRequestHandler):
    """Serves like shards.serve, but first answers `server.unavailable` shard requests with 503, cuts the next
    `server.cuts` shard bodies after `server.cut_bytes` bytes, and always answers 503 for `server.broken` paths."""

    def _serve(self, body: bool) -> None:
        server = self.server
        with server.lock:
            server.requests[self.path] += 1
            shard = self.path.endswith(".tar")
            refuse = shard and (server.unavailable > 0 or self.path in server.broken)
            if refuse and self.path not in server.broken:
                server.unavailable -= 1
            self.cut = shard and not refuse and server.cuts > 0
            if self.cut:
                server.cuts -= 1
        if refuse:
            self.send_error(503, "busy")
            return
        super()._serve(body)

    def send_body(self, handle, length: int) -> None:
        if not self.cut:
            super().send_body(handle, length)
            return
        self.wfile.write(handle.read(min(length, self.server.cut_bytes)))
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # the promised Content-Length never arrives
        self.close_connection = True


@pytest.fixture
def server(colour_shards):
    """A faulty-capable server of the colour shards (no faults until a test sets them)."""
    with ShardServer(colour_shards, handler=FaultyHandler) as srv:
        srv.lock, srv.requests, srv.broken = threading.Lock(), Counter(), set()
        srv.unavailable, srv.cuts, srv.cut_bytes = 0, 0, 3000
        yield srv


def batches(cfg: DataConfig, count: int, state: dict | None = None, rank: int = 0, world: int = 1):
    loader = UnpairedLoader(cfg, batch_size=4, seed=0, rank=rank, world_size=world, device=torch.device("cpu"))
    if state is not None:
        loader.load_state_dict(state)
    out = [{d: b[d].clone() for d in ("x", "y")} for b in itertools.islice(loader, count)]
    return out, loader


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b):
        assert torch.equal(left["x"], right["x"]) and torch.equal(left["y"], right["y"])


def test_serve_answers_byte_ranges_and_refuses_listings(colour_shards):
    data = (colour_shards / "x-train-000000.tar").read_bytes()
    with ShardServer(colour_shards) as srv:
        url = f"{srv.url}/x-train-000000.tar"
        with urllib.request.urlopen(url) as response:
            assert response.status == 200 and response.read() == data
        ranged = urllib.request.Request(url, headers={"Range": "bytes=1000-"})
        with urllib.request.urlopen(ranged) as response:
            assert response.status == 206 and response.read() == data[1000:]
            assert response.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        for path, code in ((url, 416), (f"{srv.url}/", 404), (f"{srv.url}/../etc/passwd", 404)):
            request = urllib.request.Request(path, headers={"Range": f"bytes={len(data)}-"} if code == 416 else {})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request)
            assert err.value.code == code


def test_http_root_gives_the_local_batches_and_resumes_mid_epoch(colour_shards, server):
    local = DataConfig(root=str(colour_shards), num_workers=2, **EXACT)
    remote = DataConfig(root=f"{server.url}/", num_workers=2, **EXACT, **FAST)
    expected, _ = batches(local, 10)
    first, loader = batches(remote, 4)
    assert_same(first, expected[:4])
    rest, _ = batches(remote, 6, state=loader.state_dict())  # a new loader, as after a restart
    assert_same(rest, expected[4:])
    assert server.requests[f"/{MANIFEST}"] >= 1 and loader.counters()["data/retries"] == 0


def test_dropped_connections_and_503s_are_retried_counted_and_change_nothing(colour_shards, server):
    server.unavailable, server.cuts = 3, 4
    local = DataConfig(root=str(colour_shards), num_workers=0, **EXACT)
    remote = DataConfig(root=server.url, num_workers=0, **EXACT, **FAST)
    expected, _ = batches(local, 30)  # more than an epoch: every shard is read
    got, loader = batches(remote, 30)
    assert_same(got, expected)
    counters = loader.counters()
    assert counters["data/retries"] == 3 + 4 and counters["data/bad_unavailable"] == 0
    assert server.unavailable == 0 and server.cuts == 0


def test_a_shard_that_keeps_failing_is_skipped_and_its_samples_count_as_bad(colour_shards, server):
    server.broken.add("/x-train-000002.tar")  # 16 of the 96 X samples
    cfg = DataConfig(root=server.url, num_workers=0, max_bad_fraction=0.5, **EXACT, **FAST)
    got, loader = batches(cfg, 20)  # 80 good X samples and the 16 lost ones: exactly the first epoch
    assert all(b["x"].shape == (4, 3, 32, 32) for b in got)
    counters = loader.counters()
    assert counters["data/bad_unavailable"] == 16 and counters["data/retries"] == FAST["retries"]
    assert loader.state_dict()["slots"]["0"]["x"] == [0, 96]
    assert server.requests["/x-train-000002.tar"] == FAST["retries"] + 1
    strict = DataConfig(root=server.url, num_workers=0, **EXACT, **FAST)  # max_bad_fraction 0.01
    with pytest.raises(DataError, match=r"\d+ of \d+ samples read were bad \(unavailable=\d+\), more than"):
        batches(strict, 60)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_store_gone_for_good_stops_with_one_line_naming_a_shard(colour_shards, workers):
    with ShardServer(colour_shards) as srv:
        cfg = DataConfig(root=srv.url, num_workers=workers, **EXACT, **FAST)
        loader = UnpairedLoader(cfg, batch_size=4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(DataError) as err:  # the server is gone after the manifest was read
        next(loader)
    message = str(err.value)
    assert "\n" not in message and f"{srv.url}/" in message and ".tar: unreadable after 3 retries" in message
    assert message.endswith("3 shards in a row were unreadable, the store looks down")


def test_reads_continue_at_the_byte_where_the_connection_dropped(colour_shards, server):
    server.cuts, server.cut_bytes = 10, 2500
    retries = []
    with open_stream(f"{server.url}/x-train-000000.tar", RemoteOptions(**{"retries": 2, "backoff_s": 0.0}),
                     lambda: retries.append(1)) as stream:  # fmt: skip
        data = stream.read()
    assert data == (colour_shards / "x-train-000000.tar").read_bytes()
    assert len(retries) == 10  # each cut costs one retry; the budget counts failures in a row only


class NoRangeHandler(FaultyHandler):
    """A server that ignores Range: every answer is 200 with the whole object."""

    def _serve(self, body: bool) -> None:
        if "Range" in self.headers:
            del self.headers["Range"]
        super()._serve(body)


def test_a_server_without_ranges_is_read_from_the_start_again(colour_shards):
    data = (colour_shards / "x-train-000000.tar").read_bytes()
    with ShardServer(colour_shards, handler=NoRangeHandler) as srv:
        srv.lock, srv.requests, srv.broken, srv.unavailable, srv.cuts, srv.cut_bytes = (
            threading.Lock(), Counter(), set(), 0, 2, 3000)  # fmt: skip
        with open_stream(f"{srv.url}/x-train-000000.tar", RemoteOptions(retries=2, backoff_s=0.0)) as stream:
            assert stream.read() == data


class ChangingHandler(FaultyHandler):
    """Cuts the first answer, then serves the object with other contents (another version)."""

    def _serve(self, body: bool) -> None:
        if self.server.requests[self.path] == 1:
            target = Path(self.translate_path(self.path))
            target.write_bytes(target.read_bytes() + bytes(10240))
        super()._serve(body)


def test_an_object_that_changes_between_reconnects_is_not_spliced(colour_shards, tmp_path):
    shutil.copy(colour_shards / "x-train-000000.tar", tmp_path / "x.tar")
    with ShardServer(tmp_path, handler=ChangingHandler) as srv:
        srv.lock, srv.requests, srv.broken, srv.unavailable, srv.cuts, srv.cut_bytes = (
            threading.Lock(), Counter(), set(), 0, 1, 3000)  # fmt: skip
        with pytest.raises(ShardUnavailable, match=r"x.tar: the object changed while being read \(at byte 3000\)"):
            open_stream(f"{srv.url}/x.tar", RemoteOptions(retries=2, backoff_s=0.0)).read()


def test_a_lost_shard_counts_each_of_its_samples_once_over_all_slots(colour_shards, server):
    server.broken.add("/x-train-000001.tar")  # 40 samples
    cfg = DataConfig(root=server.url, **EXACT, **FAST)
    shards = train_shards(cfg, "x")
    lost = 0
    for slot in range(8):  # 8 slots of 12 samples: the shard spans several of them
        stream = DomainStream(cfg, shards, seed=0, domain="x", slot=slot, slots=8)
        samples = itertools.islice(stream.samples(0, 0, BadSampleCounter()), stream.epoch_length)
        lost += sum(LOST in sample for _, _, sample in samples)
    assert lost == 40


def test_resuming_after_a_lost_shard_does_not_count_it_again(colour_shards, server):
    server.broken.add("/x-train-000002.tar")
    cfg = DataConfig(root=server.url, num_workers=0, max_bad_fraction=0.5, **EXACT, **FAST)
    _, straight = batches(cfg, 16)
    _, first = batches(cfg, 8)
    _, resumed = batches(cfg, 8, state=first.state_dict())
    counts = {k: v for k, v in straight.counters().items() if k != "data/retries"}  # the replay retries again
    assert {k: resumed.counters()[k] for k in counts} == counts and counts["data/bad_unavailable"] > 0


def test_a_failing_pipe_command_is_noted_not_raised(colour_shards):
    url = f"pipe:cat {colour_shards / 'x-train-000000.tar'}; exit 3"
    bad = BadSampleCounter()
    samples = list(shard_samples(url, 0, bad, Reading()))  # webdataset checks the status where the output ends
    assert 0 < len(samples) <= 40 and any("exit 3" in line for line in bad.examples), bad.examples


def test_refused_objects_and_missing_roots_fail_with_one_line(server):
    with pytest.raises(ShardUnavailable, match=r"nothing.tar: HTTPError: HTTP Error 404"):
        open_stream(f"{server.url}/nothing.tar", RemoteOptions())
    cfg = DataConfig(root=f"{server.url}/elsewhere", **EXACT, **FAST)
    with pytest.raises(ConfigError, match=rf"{server.url}/elsewhere/manifest.json cannot be read \(.*404"):
        train_shards(cfg, "x")


def test_a_remote_manifest_is_checked_like_a_local_one(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"version": 1, "splits": {"x-train": {"shards": [
        {"name": "x-000000.tar", "samples": 3, "sha256": "../../etc"}]}}}))  # fmt: skip
    with ShardServer(tmp_path) as srv, pytest.raises(ShardsError, match=r"has sha256='../../etc'; expected 64 hex"):
        read_manifest(srv.url)
    (tmp_path / MANIFEST).write_text(json.dumps({"version": 1, "splits": {"x-train": {"shards": [
        {"name": "pipe:rm -rf x", "samples": 3}]}}}))  # fmt: skip
    with ShardServer(tmp_path) as srv, pytest.raises(ShardsError, match=r"is not a plain relative file name"):
        read_manifest(srv.url)


def test_shard_lists_take_urls_and_are_counted_by_a_scan(colour_shards, server):
    spec = f"{server.url}/x-train-{{000000..000002}}.tar"
    cfg = DataConfig(x_train=spec, y_train=spec, **EXACT, **FAST)
    assert [s.samples for s in train_shards(cfg, "x")] == [40, 40, 16]


def test_the_cache_downloads_each_shard_once_and_later_epochs_read_it(colour_shards, server, tmp_path):
    cache = tmp_path / "cache"
    local = DataConfig(root=str(colour_shards), num_workers=2, **EXACT)
    remote = DataConfig(root=server.url, num_workers=2, cache_dir=str(cache), **EXACT, **FAST)
    expected, _ = batches(local, 36)  # three epochs of each domain
    got, _ = batches(remote, 36)
    assert_same(got, expected)
    manifest = read_manifest(colour_shards)
    digests = {s["sha256"] for split in ("x-train", "y-train") for s in manifest["splits"][split]["shards"]}
    assert {p.name for p in cache.iterdir()} == {f"{d}.tar" for d in digests}
    shard_gets = {path: n for path, n in server.requests.items() if "-train-" in path}
    assert len(shard_gets) == 6 and all(n <= 2 for n in shard_gets.values())  # at most one per worker, not per epoch


def test_the_cache_replaces_a_corrupt_entry_and_keeps_its_bound(colour_shards, server, tmp_path):
    records = read_manifest(colour_shards)["splits"]["x-train"]["shards"]
    fetch = lambda name: lambda: open_stream(f"{server.url}/{name}", RemoteOptions())  # noqa: E731
    cache = ShardCache(tmp_path, max_bytes=10**9)
    path = Path(cache.get("x0", records[0]["sha256"], fetch(records[0]["name"])))
    assert path.read_bytes() == (colour_shards / records[0]["name"]).read_bytes()
    path.write_bytes(b"rot" + path.read_bytes()[3:])
    again = ShardCache(tmp_path, max_bytes=10**9)  # another process: verifies the entry before its first use
    assert again.get("x0", records[0]["sha256"], fetch(records[0]["name"])) == str(path)
    assert path.read_bytes() == (colour_shards / records[0]["name"]).read_bytes()
    other = ShardCache(tmp_path / "other", max_bytes=10**9)
    with pytest.raises(ShardUnavailable, match="does not match the manifest's sha256"):
        other.get("x1", records[0]["sha256"], fetch(records[1]["name"]))  # the wrong content for that digest
    assert list((tmp_path / "other").iterdir()) == []
    small = ShardCache(tmp_path / "small", max_bytes=records[0]["bytes"] + records[1]["bytes"])
    for record in records:
        small.get(record["name"], record["sha256"], fetch(record["name"]))
    entries = list((tmp_path / "small").iterdir())
    assert sum(p.stat().st_size for p in entries) <= small.max_bytes
    assert f"{records[-1]['sha256']}.tar" in {p.name for p in entries}  # the newest stays


def _fill(root: str, url: str, records: list[dict], out) -> None:
    cache = ShardCache(root, max_bytes=10**9)
    paths = [cache.get(r["name"], r["sha256"], lambda r=r: open_stream(f"{url}/{r['name']}", RemoteOptions()))
             for r in records]  # fmt: skip
    out.put(paths)


def test_several_processes_fill_one_cache_at_once(colour_shards, server, tmp_path):
    records = [s for split in ("x-train", "y-train") for s in read_manifest(colour_shards)["splits"][split]["shards"]]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_fill, args=(str(tmp_path), server.url, records, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert all(paths == results[0] for paths in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{r['sha256']}.tar" for r in records)  # no .part
    for record, path in zip(records, results[0]):
        assert Path(path).read_bytes() == (colour_shards / record["name"]).read_bytes()


def test_verify_and_info_read_a_remote_root(colour_shards, tmp_path):
    copy = tmp_path / "colour"
    shutil.copytree(colour_shards, copy)
    with ShardServer(copy) as srv:
        ok = subprocess.run([sys.executable, "-m", "shards.verify", srv.url], cwd=REPO, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.splitlines()[-1] == f"{srv.url}: 4 splits, 224 samples, 0 bad, 0 problem(s)"
        sheet = tmp_path / "sheet.png"
        info = subprocess.run([sys.executable, "-m", "shards.info", srv.url, "--sheet", str(sheet)], cwd=REPO,
                              capture_output=True, text=True)  # fmt: skip
        assert info.returncode == 0 and sheet.is_file(), info.stderr
        assert any(line.split()[:2] == ["x-train", "96"] for line in info.stdout.splitlines())
        data = (copy / "y-train-000001.tar").read_bytes()
        (copy / "y-train-000001.tar").write_bytes(data[:100] + b"X" + data[101:])
        (copy / "x-train-000002.tar").unlink()
        bad = subprocess.run([sys.executable, "-m", "shards.verify", srv.url], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "y-train-000001.tar: sha256 differs from the manifest" in bad.stdout
    assert "x-train-000002.tar: unavailable (" in bad.stdout and "HTTP Error 404" in bad.stdout


def test_training_against_a_store_without_its_shards_stops_with_one_line(colour_shards, tmp_path):
    (tmp_path / "root").mkdir()
    shutil.copy(colour_shards / MANIFEST, tmp_path / "root" / MANIFEST)  # the shards themselves are missing: 404
    with ShardServer(tmp_path / "root") as srv:
        cmd = train_command(srv.url, tmp_path / "run", "train.steps=2", "eval.images=0", "data.retry_backoff_s=0.01")
        result = run_bounded(cmd, timeout_s=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {srv.url}/") and "HTTP Error 404" in last
    assert last.endswith("3 shards in a row were unreadable, the store looks down")
