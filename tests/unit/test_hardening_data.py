"""Hostile data directories, stores and image folders (issue 27): symlinks out of a served directory, a store that
trickles, an endless or deeply nested manifest, a FIFO named like a shard, sample keys that collide, 16-bit grey
images, and a cache directory that cannot be written. Each test builds the hostile situation itself."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards import manifest as manifest_module
from shards.cache import ShardCache
from shards.decode import decode_label, decode_rgb
from shards.manifest import MANIFEST, read_manifest
from shards.remote import RemoteOptions, RetryingReader, ShardUnavailable, open_stream
from shards.serve import ShardRequestHandler, ShardServer
from shards.streams import Reading, file_samples, open_shard
from shards.urls import ShardsError
from shards.write import main as write_main
from shards.write import write_dataset
from tests.conftest import run_bounded, train_command
from tests.unit.test_remote_shards import EXACT, batches
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig
from trainer.data.loader import UnpairedLoader
from trainer.data.plan import count_samples

HOSTILE_S = 10.0
"""How long a hostile server keeps trickling or streaming at most (a test that works is done long before)."""


def fetch(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error's status with an empty body."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


# 1. shards.serve follows no symlink out of its directory


def test_serve_refuses_symlinks_and_special_files_and_serves_regular_ones(tmp_path):
    served, outside = tmp_path / "served", tmp_path / "outside"
    (served / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.tar").write_bytes(b"secret")
    (served / "x.tar").write_bytes(b"shard x")
    (served / "sub" / "y.tar").write_bytes(b"shard y")
    (served / "link.tar").symlink_to(outside / "secret.tar")
    (served / "linkdir").symlink_to(outside, target_is_directory=True)
    (served / "sub" / "inner.tar").symlink_to(served / "x.tar")  # a link is refused even when it stays inside
    os.mkfifo(served / "fifo.tar")  # must be a 404, not a request that never ends
    with ShardServer(served) as srv:
        assert fetch(f"{srv.url}/x.tar") == (200, b"shard x")
        assert fetch(f"{srv.url}/sub/y.tar") == (200, b"shard y")
        for path in ("link.tar", "linkdir/secret.tar", "sub/inner.tar", "fifo.tar", "sub", "sub/", "missing.tar"):
            assert fetch(f"{srv.url}/{path}") == (404, b""), path


# 2. a store that trickles fails within a deadline, like a timeout


class TrickleHandler(ShardRequestHandler):
    """Serves like shards.serve, but the bodies of `server.trickle` paths come one byte per `server.every_s`."""

    def send_body(self, handle, length: int) -> None:
        if self.path not in self.server.trickle:
            super().send_body(handle, length)
            return
        with self.server.lock:
            self.server.requests[self.path] += 1
            stall = self.server.requests[self.path] in self.server.stall
        if stall:  # this connection sends nothing for a while: the reader's timeout, not TooSlow
            time.sleep(1.0)
        end = time.monotonic() + HOSTILE_S
        while length and time.monotonic() < end:
            try:
                self.wfile.write(handle.read(1))
                self.wfile.flush()
            except OSError:  # the reader gave up and closed the connection
                return
            length -= 1
            time.sleep(self.server.every_s)


@pytest.fixture
def trickling(colour_shards):
    with ShardServer(colour_shards, handler=TrickleHandler) as srv:
        srv.lock, srv.requests, srv.trickle, srv.every_s = threading.Lock(), Counter(), set(), 0.05
        srv.stall = set()  # the request numbers (1 = the first) whose body starts after a pause of 1 s
        yield srv


def test_a_trickling_object_fails_after_its_retries_within_the_deadline(trickling):
    trickling.trickle.add("/x-train-000000.tar")  # one byte per 0.05 s: every read gets data, none times out
    options = RemoteOptions(retries=2, backoff_s=0.0, timeout_s=0.3, min_rate_bytes_s=1000)
    started = time.monotonic()
    with pytest.raises(ShardUnavailable) as err, open_stream(f"{trickling.url}/x-train-000000.tar", options) as stream:
        stream.read()
    assert time.monotonic() - started < 5
    message = err.value.reason
    assert "x-train-000000.tar: unreadable after 2 retries at byte " in message
    # each connection ends in TooSlow; on a loaded machine a byte may come later than timeout_s (a timeout instead)
    assert ("TooSlow: " in message and "slower than the minimum of 1000 bytes/s" in message) or "timed out" in message
    assert trickling.requests["/x-train-000000.tar"] == 3  # the first connection and two retries, either way


def test_a_timeout_between_slow_stretches_counts_as_one_of_them(trickling):
    """Connection 1 trickles, 2 sends nothing within timeout_s, 3 trickles: three stretches too slow in a row use
    the budget of 2 retries, whatever kind each one was."""
    trickling.trickle.add("/x-train-000000.tar")
    trickling.stall.add(2)
    options = RemoteOptions(retries=2, backoff_s=0.0, timeout_s=0.3, min_rate_bytes_s=1000)
    url = f"{trickling.url}/x-train-000000.tar"
    with pytest.raises(ShardUnavailable, match="unreadable after 2 retries"), open_stream(url, options) as stream:
        stream.read()
    assert trickling.requests["/x-train-000000.tar"] == 3


def test_a_fast_object_read_in_pauses_is_not_too_slow(trickling, colour_shards):
    """Only the time spent waiting for the store counts, not a consumer that pauses between reads."""
    options = RemoteOptions(retries=0, timeout_s=0.2, min_rate_bytes_s=1 << 20)
    with RetryingReader(f"{trickling.url}/x-train-000000.tar", options) as reader:  # unbuffered: each read waits
        parts = []
        while block := reader.read(8192):
            parts.append(block)
            time.sleep(0.02)  # the pauses add up to well over timeout_s, at far less than min_rate_bytes_s
    assert len(parts) > 10 and b"".join(parts) == (colour_shards / "x-train-000000.tar").read_bytes()


def test_training_skips_a_trickling_shard_and_counts_its_samples_as_unavailable(trickling):
    trickling.trickle.add("/x-train-000002.tar")  # 16 of the 96 X samples
    cfg = DataConfig(root=trickling.url, num_workers=0, max_bad_fraction=0.5, retries=1, retry_backoff_s=0.01,
                     io_timeout_s=0.5, **EXACT)  # fmt: skip
    started = time.monotonic()
    got, loader = batches(cfg, 20)  # the first epoch, the trickling shard included
    assert time.monotonic() - started < 30
    assert all(b["x"].shape == (4, 3, 32, 32) for b in got)
    counters = loader.counters()
    assert counters["data/bad_unavailable"] == 16 and counters["data/retries"] == 1


# 3. the manifest is read within bounds


class EndlessManifestHandler(ShardRequestHandler):
    """manifest.json is an endless body (no Content-Length), as fast as the reader takes it."""

    def _serve(self, body: bool) -> None:
        self.send_response(200)
        self.end_headers()
        end = time.monotonic() + HOSTILE_S
        try:
            while body and time.monotonic() < end:
                self.wfile.write(b"[" * 65536)
        except OSError:  # the reader stopped reading
            pass


def test_an_endless_remote_manifest_is_one_line_error_soon(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_SMALL_FILE", 1 << 20)
    started = time.monotonic()
    with ShardServer(tmp_path, handler=EndlessManifestHandler) as srv, pytest.raises(ShardsError) as err:
        read_manifest(srv.url, RemoteOptions(retries=0))
    assert time.monotonic() - started < 5
    assert str(err.value) == f"{srv.url}/{MANIFEST} is larger than {1 << 20} bytes"


@pytest.mark.parametrize("depth", [100, 100_000])
def test_a_deeply_nested_local_manifest_is_one_line_error(tmp_path, depth):
    (tmp_path / MANIFEST).write_text('{"version": 1, "splits": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ShardsError) as err:
        read_manifest(tmp_path)
    assert str(err.value) == f"{tmp_path / MANIFEST} nests deeper than 64 levels"


def test_an_oversized_local_manifest_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_SMALL_FILE", 1000)
    (tmp_path / MANIFEST).write_text('{"version": 1, "splits": {}, "pad": "' + "x" * 1000 + '"}')
    with pytest.raises(ShardsError, match=r"^manifest .*manifest.json is larger than 1000 bytes$"):
        read_manifest(tmp_path)


# 4. a FIFO named like a shard is an unreadable shard, never a wait


@pytest.fixture
def fifo_shards(colour_shards, tmp_path):
    """The colour shards with x-train-000002.tar (16 samples, listed in the manifest) replaced by a FIFO."""
    root = tmp_path / "colour"
    shutil.copytree(colour_shards, root)
    (root / "x-train-000002.tar").unlink()
    os.mkfifo(root / "x-train-000002.tar")
    return root


@pytest.mark.timeout(120)
def test_a_fifo_shard_is_refused_at_once_wherever_shards_are_opened(fifo_shards):
    fifo = str(fifo_shards / "x-train-000002.tar")
    expected = f"shard {fifo} is a FIFO, not a regular file"
    with pytest.raises(OSError) as err:
        open_shard(fifo, Reading())
    assert str(err.value) == expected
    with pytest.raises(ShardsError, match=f"shard {fifo} cannot be read \\(OSError: {expected}\\)"):
        count_samples(fifo, Reading())
    errors = []
    assert list(file_samples(fifo, lambda e: errors.append(e) or True)) == []
    assert [str(e) for e in errors] == [expected]


@pytest.mark.timeout(120)
def test_training_over_a_fifo_shard_goes_on_and_names_it(fifo_shards, capsys):
    cfg = DataConfig(root=str(fifo_shards), num_workers=0, max_bad_fraction=0.5, **EXACT)
    got, loader = batches(cfg, 20)
    assert len(got) == 20 and loader.counters()["data/bad_truncated"] == 16
    assert f"shard {fifo_shards / 'x-train-000002.tar'} is a FIFO, not a regular file" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_a_cache_entry_that_is_a_fifo_is_replaced(colour_shards, tmp_path):
    record = read_manifest(colour_shards)["splits"]["x-train"]["shards"][0]
    data = (colour_shards / record["name"]).read_bytes()
    cache = ShardCache(tmp_path, max_bytes=10**9)
    os.mkfifo(tmp_path / f"{record['sha256']}.tar")
    with cache.open("x0", record["sha256"], lambda: io.BytesIO(data)) as stream:
        assert stream.read() == data


# 5. shards.write refuses files that would share a sample key


@pytest.mark.parametrize("names", [("s.jpg", "s.png"), ("d.b.png", "d_b.png")])
def test_write_refuses_two_files_with_one_sample_key_before_writing(tmp_path, names, capsys):
    x, y, out = tmp_path / "x", tmp_path / "y", tmp_path / "out"
    for folder, files in ((x, ("a.png", *names)), (y, ("b.png",))):
        folder.mkdir()
        for name in files:
            Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(folder / name)
    key = names[1].rsplit(".", 1)[0].replace(".", "_")
    expected = f"{x}: {names[0]} and {names[1]} would both be sample '{key}'"
    with pytest.raises(ValueError, match=f"^{expected} .*; rename one of them$"):
        write_dataset({"x-train": (x, None), "y-train": (y, None)}, out)
    with pytest.raises(SystemExit) as err:
        write_main(["--x", str(x), "--y", str(y), "--out", str(out)])
    assert str(err.value).startswith(f"shards.write: {expected}") and "\n" not in str(err.value)
    assert not out.exists()


# 6. 16-bit grey images are scaled to 8 bits, not clipped to white


def grey16_png(path: Path | None = None) -> bytes:
    """A 16 x 16 16-bit grey PNG whose pixel k is k * 257 (so k in 8 bits)."""
    image = Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16))
    assert image.mode == "I;16"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_a_16_bit_grey_png_decodes_to_its_8_bit_values():
    pixels = decode_rgb(grey16_png())
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert pixels.dtype == np.uint8 and all(np.array_equal(pixels[..., c], expected) for c in range(3))
    int32 = io.BytesIO()  # 32-bit integer grey ("I") holding 16-bit values, as a TIFF
    Image.fromarray((np.arange(256, dtype=np.int32) * 257).reshape(16, 16), "I").save(int32, format="TIFF")
    assert np.array_equal(decode_rgb(int32.getvalue())[..., 0], expected)
    labels = io.BytesIO()  # label maps hold class ids: never scaled
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) % 7).save(labels, format="PNG")
    assert np.array_equal(decode_label(labels.getvalue()), np.arange(256).reshape(16, 16) % 7)


def test_write_packs_a_16_bit_grey_png_with_its_8_bit_values(tmp_path):
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir()
    y.mkdir()
    grey16_png(x / "g.png")
    grey16_png(y / "g.png")
    write_dataset({"x-train": (x, None), "y-train": (y, None)}, tmp_path / "out", fmt="png")
    with tarfile.open(tmp_path / "out" / "x-train-000000.tar") as tar:
        data = tar.extractfile("g.png").read()
    assert np.array_equal(decode_rgb(data)[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


# 7. a data.cache_dir that cannot be used is one line at start


def test_an_unusable_cache_dir_is_one_config_error_at_start(colour_shards, tmp_path):
    (tmp_path / "afile").write_text("a regular file, so nothing can be made under it (even by root)")
    cache = tmp_path / "afile" / "cache"
    cfg = DataConfig(root=str(colour_shards), cache_dir=str(cache), **EXACT)
    with pytest.raises(ConfigError) as err:
        UnpairedLoader(cfg, batch_size=4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    assert str(err.value) == f"data.cache_dir={cache} cannot be used (Not a directory)"
    result = run_bounded(train_command(colour_shards, tmp_path / "run", f"data.cache_dir={cache}", "train.steps=1"),
                         timeout_s=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: data.cache_dir={cache} cannot be used (Not a directory)"


def test_a_writable_cache_dir_is_created_at_start_and_left_clean(colour_shards, tmp_path):
    cache = tmp_path / "new" / "cache"
    cfg = DataConfig(root=str(colour_shards), cache_dir=str(cache), **EXACT)
    UnpairedLoader(cfg, batch_size=4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    assert cache.is_dir() and list(cache.iterdir()) == []
