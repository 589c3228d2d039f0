import itertools

import torch

from trainer.config import DataConfig
from trainer.data import UnpairedStream, augment, load_test_images


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_batches_have_the_configured_shape_and_range(colour_shards):
    cfg = DataConfig(root=str(colour_shards), load_size=36, crop_size=32, rotation_deg=15)
    (batch,) = take(UnpairedStream(cfg, batch_size=3, seed=0), 1)
    for key in ("x", "y"):
        assert batch[key].shape == (3, 3, 32, 32)
        assert batch[key].min() >= -1 and batch[key].max() <= 1


def test_same_seed_same_stream_other_seed_other_stream(colour_shards):
    cfg = DataConfig(root=str(colour_shards), load_size=36, crop_size=32)
    a = take(UnpairedStream(cfg, 4, seed=1), 30)  # 120 samples: crosses an epoch of 96
    b = take(UnpairedStream(cfg, 4, seed=1), 30)
    c = take(UnpairedStream(cfg, 4, seed=2), 30)
    assert all(torch.equal(p["x"], q["x"]) and torch.equal(p["y"], q["y"]) for p, q in zip(a, b))
    assert not all(torch.equal(p["x"], q["x"]) for p, q in zip(a, c))


def test_ranks_read_disjoint_samples(colour_shards):
    cfg = DataConfig(root=str(colour_shards), load_size=32, crop_size=32, flip=False, shuffle_buffer=1)
    seen = []
    for rank in range(2):
        batches = take(UnpairedStream(cfg, 4, seed=0, rank=rank, world_size=2), 12)  # 48 = half an epoch
        seen.append({tuple(img.flatten()[:64].tolist()) for b in batches for img in b["x"]})
    assert len(seen[0]) == 48 and len(seen[1]) == 48
    assert not seen[0] & seen[1]


def test_augment_flips_and_crops_deterministically():
    image = torch.linspace(-1, 1, 3 * 8 * 8).view(3, 8, 8)
    cfg = DataConfig(load_size=8, crop_size=8, flip=True)
    outs = {augment(image, cfg, torch.Generator().manual_seed(s)).sum(dim=(0, 1))[0].item() for s in range(20)}
    assert len(outs) == 2  # either flipped or not
    crop = augment(image, DataConfig(load_size=8, crop_size=4, flip=False), torch.Generator().manual_seed(0))
    assert crop.shape == (3, 4, 4)


def test_test_images_are_paired_for_synthetic_data(colour_shards):
    x, y, paired = load_test_images(str(colour_shards), 5, 32)
    assert paired and x.shape == y.shape == (5, 3, 32, 32)
    torch.testing.assert_close(y, x[:, [2, 0, 1]])
