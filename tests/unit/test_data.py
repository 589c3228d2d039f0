"""The training stream: per-(rank, worker) plans, equal epochs, exact resume, URL forms and augmentation."""

import itertools
import subprocess

import numpy as np
import pytest
import torch

from shards.synthetic import write_synthetic
from trainer.config.checks import ConfigError
from trainer.config.sections import DataConfig
from trainer.data.augment import augment
from trainer.data.health import BadSampleCounter
from trainer.data.loader import UnpairedLoader
from trainer.data.plan import train_shards
from trainer.data.stream import DomainStream
from trainer.data.test_sets import load_test_images

EXACT = dict(load_size=32, crop_size=32, flip=False)  # no augmentation: images identify samples


def keys_of_epoch(cfg, domain, slots):
    shards = train_shards(cfg, domain)
    out = []
    for slot in range(slots):
        stream = DomainStream(cfg, shards, seed=0, domain=domain, slot=slot, slots=slots)
        samples = itertools.islice(stream.samples(0, 0, BadSampleCounter()), stream.epoch_length)
        out.append([s["__key__"] for _, _, s in samples])
    return out


def test_four_slots_read_every_sample_exactly_once_per_epoch(colour_shards):
    cfg = DataConfig(root=str(colour_shards), **EXACT)
    per_slot = keys_of_epoch(cfg, "x", slots=4)
    assert [len(keys) for keys in per_slot] == [24] * 4
    flat = [k for keys in per_slot for k in keys]
    assert sorted(flat) == sorted(f"{i:07d}" for i in range(96))


def test_uneven_counts_pad_each_slot_to_the_same_length(tmp_path):
    write_synthetic(tmp_path, "colour", size=16, train=50, test=0, maxcount=16)  # shards of 16, 16, 16, 2
    cfg = DataConfig(root=str(tmp_path), load_size=16, crop_size=16)
    per_slot = keys_of_epoch(cfg, "y", slots=4)
    assert [len(keys) for keys in per_slot] == [13] * 4  # ceil(50 / 4)
    flat = [k for keys in per_slot for k in keys]
    assert set(flat) == {f"{i:07d}" for i in range(50)}  # every sample at least once ...
    assert len(flat) - len(set(flat)) == 2  # ... and 52 - 50 documented padding repeats


def image_ids(batch, domain):
    pixels = ((batch[domain] + 1) * 127.5).round().to(torch.uint8)
    return [hash(img.numpy().tobytes()) for img in pixels]


def test_two_ranks_two_workers_see_each_image_once_with_equal_batch_counts(colour_shards):
    cfg = DataConfig(root=str(colour_shards), num_workers=2, **EXACT)
    per_rank = {}
    for rank in range(2):
        loader = UnpairedLoader(cfg, batch_size=4, seed=0, rank=rank, world_size=2, device=torch.device("cpu"))
        batches = list(itertools.islice(loader, 12))  # 2 workers x 24 samples / batch 4
        per_rank[rank] = batches
        assert loader.progress()["data/epoch_x"] == 0.0
    for domain in ("x", "y"):
        ids = [i for batches in per_rank.values() for b in batches for i in image_ids(b, domain)]
        assert len(ids) == 96 and len(set(ids)) == 96


def test_resume_mid_epoch_continues_identically(colour_shards):
    cfg = DataConfig(
        root=str(colour_shards), num_workers=2, load_size=36, crop_size=32, rotation_deg=10, shuffle_buffer=16
    )
    straight = UnpairedLoader(cfg, 3, seed=5, rank=1, world_size=2, device=torch.device("cpu"))
    head = list(itertools.islice(straight, 7))
    state = straight.state_dict()
    tail = list(itertools.islice(straight, 30))  # crosses the epoch boundary (48 samples per rank-epoch)
    resumed = UnpairedLoader(cfg, 3, seed=5, rank=1, world_size=2, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    again = list(itertools.islice(resumed, 30))
    assert head
    for a, b in zip(tail, again, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_resume_on_another_world_size_restarts_at_the_epoch(colour_shards):
    cfg = DataConfig(root=str(colour_shards), num_workers=1, **EXACT)
    loader = UnpairedLoader(cfg, 4, seed=0, rank=0, world_size=2, device=torch.device("cpu"))
    list(itertools.islice(loader, 15))  # 48 samples per rank-epoch: into epoch 1
    state = loader.state_dict()
    single = UnpairedLoader(cfg, 4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    single.load_state_dict(state)
    assert single.state_dict()["slots"] == {"0": {"x": [1, 0], "y": [1, 0]}}
    fresh = UnpairedLoader(cfg, 4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    skipped = list(itertools.islice(fresh, 24))  # one full epoch of 96 on one rank
    assert torch.equal(next(single)["x"], next(fresh)["x"]) and skipped


def test_plain_gnu_tar_brace_patterns_and_pipes(tmp_path, colour_shards):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(images / f"{i:04d}.png")
    subprocess.run(
        ["tar", "cf", str(tmp_path / "x-000000.tar")] + [f"{i:04d}.png" for i in range(6)], cwd=images, check=True
    )
    brace = f"{colour_shards}/y-train-{{000000..000002}}.tar"
    cfg = DataConfig(x_train=str(tmp_path / "x-000000.tar"), y_train=brace, num_workers=0, **EXACT)
    assert [s.samples for s in train_shards(cfg, "x")] == [6]
    assert sum(s.samples for s in train_shards(cfg, "y")) == 96
    batch = next(UnpairedLoader(cfg, 6, seed=0, rank=0, world_size=1, device=torch.device("cpu")))
    assert sorted(((batch["x"][:, 0, 0, 0] + 1) * 127.5).round().tolist()) == [0, 40, 80, 120, 160, 200]

    piped = f"pipe:cat {tmp_path / 'x-000000.tar'}"
    with pytest.raises(ConfigError, match="set data.allow_pipe=true to allow pipe: URLs"):
        train_shards(DataConfig(x_train=piped, y_train=brace), "x")
    assert [s.samples for s in train_shards(DataConfig(x_train=piped, y_train=brace, allow_pipe=True), "x")] == [6]


def test_missing_shards_are_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.x_train: shard .*nope.tar does not exist"):
        train_shards(DataConfig(x_train=str(tmp_path / "nope.tar"), y_train="y"), "x")
    with pytest.raises(ConfigError, match="data.root is empty"):
        train_shards(DataConfig(), "x")


def test_augment_flips_crops_and_zooms_deterministically():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    cfg = DataConfig(load_size=8, crop_size=8, flip=True)
    outs = {augment(image, None, cfg, torch.Generator().manual_seed(s))[0][0, 0, 0].item() for s in range(20)}
    assert outs == {0, 7}  # flipped or not
    cfg = DataConfig(load_size=16, crop_size=8, scale_min=0.5, flip=False)
    a, _ = augment(image, None, cfg, torch.Generator().manual_seed(3))
    b, _ = augment(image, None, cfg, torch.Generator().manual_seed(3))
    assert a.shape == (3, 8, 8) and torch.equal(a, b)


def test_label_maps_follow_the_image_geometry():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, :4] = 255
    label = (image[:1] > 0).to(torch.uint8) * 255
    cfg = DataConfig(load_size=20, crop_size=16, rotation_deg=30, flip=True)
    for seed in range(5):
        out, lab = augment(image, label, cfg, torch.Generator().manual_seed(seed))
        assert ((out[0] > 127) == (lab[0] > 127)).float().mean() > 0.95


def test_test_images_are_paired_for_synthetic_data(colour_shards):
    test = load_test_images(DataConfig(root=str(colour_shards), load_size=32, crop_size=32), 5)
    assert test.paired and test.x.shape == test.y.shape == (5, 3, 32, 32)
    torch.testing.assert_close(test.y, test.x[:, [2, 0, 1]])


def test_resampled_mode_draws_shards_with_replacement(colour_shards):
    cfg = DataConfig(root=str(colour_shards), resampled=True, **EXACT)
    stream = DomainStream(cfg, train_shards(cfg, "x"), seed=0, domain="x", slot=0, slots=2)
    orders = [[s.url for s in stream.order(epoch)] for epoch in range(20)]
    assert all(len(order) == 3 for order in orders)
    assert any(len(set(order)) < 3 for order in orders)  # some epoch repeats a shard
    samples = list(itertools.islice(stream.samples(0, 0, BadSampleCounter()), 2 * stream.epoch_length))
    assert [epoch for epoch, _, _ in samples] == [0] * 48 + [1] * 48
