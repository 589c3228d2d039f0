"""Bad data never stops training: corrupt, missing and truncated samples are counted and skipped; grey and RGBA
images are converted; too many bad samples stop the run with a clear error."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from shards.manifest import shard_entry, split_entry, write_manifest
from shards.tar_shards import write_shards
from tests.conftest import read_metrics, run_bounded, train_command
from trainer.config.sections import DataConfig
from trainer.data.health import LOST, BadSampleCounter
from trainer.data.loader import UnpairedLoader
from trainer.data.plan import train_shards
from trainer.data.stream import DomainStream

CORRUPT, MISSING = "0000005", "0000009"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def good(i: int) -> dict:
    return {"__key__": f"{i:07d}", "png": png(np.full((32, 32, 3), i, np.uint8))}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    samples = [good(i) for i in range(20)]
    samples[int(CORRUPT)] = {"__key__": CORRUPT, "png": b"\x89PNG this is not an image"}
    samples[int(MISSING)] = {"__key__": MISSING, "txt": b"the image is missing"}
    samples[12] = {"__key__": "0000012", "png": png(np.full((32, 32), 7, np.uint8))}  # grey
    samples[13] = {"__key__": "0000013", "png": png(np.full((32, 32, 4), 9, np.uint8))}  # RGBA
    x = write_shards(root, "x-train", samples, maxcount=20)
    whole = write_shards(root, "x-train-cut", [good(100 + i) for i in range(20)], maxcount=20)
    cut = root / "x-train-000001.tar"
    data = (root / whole[0]["name"]).read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])  # truncated mid-sample
    x.append(dict(shard_entry(cut, 20)))  # the manifest still promises 20
    y = write_shards(root, "y-train", [good(i) for i in range(40)], maxcount=20)
    write_manifest(root, {"x-train": split_entry(x, (32, 32)), "y-train": split_entry(y, (32, 32))})
    return root


def test_bad_samples_are_counted_by_kind_and_skipped(bad_shards):
    cfg = DataConfig(root=str(bad_shards), load_size=32, crop_size=32, num_workers=0, max_bad_fraction=0.5)
    loader = UnpairedLoader(cfg, 5, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    batches = list(itertools.islice(loader, 20))
    assert all(b["x"].shape == (5, 3, 32, 32) for b in batches)
    # The oracle: the raw X samples the loader consumed, listed by the plan itself.
    read_x = loader.state_dict()["slots"]["0"]["x"]
    stream = DomainStream(cfg, train_shards(cfg, "x"), 0, "x", slot=0, slots=1)
    oracle = BadSampleCounter()
    raw = list(itertools.islice(stream.samples(0, 0, oracle), read_x[0] * stream.epoch_length + read_x[1]))
    keys = [sample["__key__"] for _, _, sample in raw]
    counts = loader.counters()
    assert counts["data/bad_corrupt"] == keys.count(CORRUPT) > 0
    assert counts["data/bad_missing"] == keys.count(MISSING) > 0
    # The truncated shard's missing samples hold their positions as placeholders, each one bad sample.
    assert counts["data/bad_truncated"] == sum(s.get(LOST) == "truncated" for _, _, s in raw) > 0
    # grey and RGBA images were converted, not dropped: their values show up as RGB
    values = {int(v) for b in batches for v in ((b["x"][:, 0, 0, 0] + 1) * 127.5).round().tolist()}
    assert {7, 9} <= values


def test_too_many_bad_samples_stop_with_a_clear_error(bad_shards):
    cfg = DataConfig(root=str(bad_shards), load_size=32, crop_size=32, num_workers=0, max_bad_fraction=0.0)
    loader = UnpairedLoader(cfg, 5, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(
        RuntimeError,
        match=r"samples read were bad \(corrupt=\d+, missing=\d+.*more than "
        r"data.max_bad_fraction=0.0; check the shards with",
    ):
        list(itertools.islice(loader, 40))


def test_training_on_bad_shards_runs_to_the_end(bad_shards, tmp_path):
    run_dir = tmp_path / "run"
    small = ["train.steps=12", "logging.every_steps=6", "model.ngf=4", "model.ndf=4"]
    result = run_bounded(train_command(bad_shards, run_dir, "data.max_bad_fraction=0.5", *small))
    assert result.returncode == 0, result.stderr[-3000:]
    last = [r for r in read_metrics(run_dir) if "data/bad_corrupt" in r][-1]
    assert last["step"] == 12 and last["data/bad_corrupt"] >= 1 and last["data/bad_truncated"] >= 1
    assert f"bad sample corrupt: {bad_shards}/x-train-000000.tar:{CORRUPT}" in result.stdout


def test_shards_without_a_readable_sample_stop_even_when_bad_samples_are_allowed(tmp_path):
    x = write_shards(tmp_path, "x-train", [good(i) for i in range(8)], maxcount=4)
    y = write_shards(tmp_path, "y-train", [good(i) for i in range(8)], maxcount=4)
    for record in x:
        (tmp_path / record["name"]).write_bytes(b"not a tar at all" * 100)  # the manifest still promises 4 each
    write_manifest(tmp_path, {"x-train": split_entry(x, (32, 32)), "y-train": split_entry(y, (32, 32))})
    cfg = DataConfig(root=str(tmp_path), load_size=32, crop_size=32, num_workers=0, max_bad_fraction=1.0)
    loader = UnpairedLoader(cfg, 2, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"no readable samples in any of 2 shards \(first: .*x-train-00000"):
        next(loader)
