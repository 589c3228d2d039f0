import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from shards.manifest import read_manifest, sha256_file
from shards.pixels import RGB8, convert_pixels, format_of
from shards.synthetic import (
    PHOTO_GAMMAS,
    PHOTO_SATURATION,
    PHOTOS,
    TARGET_FORMATS,
    TASKS,
    X_FORMS,
    photos_task,
    render_scene,
    write_synthetic,
)


def read_tar_images(path):
    with tarfile.open(path) as tar:
        return {m.name: np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))) for m in tar.getmembers()}


def test_manifest_counts_and_hashes_match_the_shards(colour_shards):
    manifest = read_manifest(colour_shards)
    assert set(manifest["splits"]) == {"x-train", "y-train", "x-test", "y-test"}
    train = manifest["splits"]["x-train"]
    assert train["samples"] == 96 and [s["samples"] for s in train["shards"]] == [40, 40, 16]
    assert train["image_size"] == [32, 32]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = colour_shards / shard["name"]
            assert sha256_file(path) == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            assert len(read_tar_images(path)) == shard["samples"]
    assert not list(colour_shards.glob("*.tmp"))


def test_test_split_is_paired_with_the_known_answer(colour_shards):
    xs = read_tar_images(colour_shards / "x-test-000000.tar")
    ys = read_tar_images(colour_shards / "y-test-000000.tar")
    assert xs.keys() == ys.keys()
    for key in xs:
        np.testing.assert_array_equal(ys[key], xs[key][..., [2, 0, 1]])


def test_train_split_is_unpaired(colour_shards):
    xs = read_tar_images(colour_shards / "x-train-000000.tar")
    ys = read_tar_images(colour_shards / "y-train-000000.tar")
    matches = sum(np.array_equal(ys[k], xs[k][..., [2, 0, 1]]) for k in xs)
    assert matches == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_change_the_image_and_identity_is_a_poor_answer(task):
    rng = np.random.default_rng(0)
    image, mask = render_scene(rng, 64)
    if task in X_FORMS:
        image = X_FORMS[task](image, rng)
    out = TASKS[task](image, mask)
    target = TARGET_FORMATS.get(task, RGB8)
    assert out.shape == (64, 64, target.channels) and format_of(out) == target
    identity = convert_pixels(image, target)  # x itself, in Y's channels and depth
    assert np.abs(out.astype(int) - identity.astype(int)).mean() > 5 * target.max_value / 255
    assert mask.any()


def test_the_16_bit_task_has_detail_below_8_bits_and_an_exact_answer(tmp_path):
    write_synthetic(tmp_path, "grey16", size=16, train=4, test=3, seed=0)
    manifest = read_manifest(tmp_path)
    assert all(split["format"] == {"channels": 1, "bits": 16} for split in manifest["splits"].values())
    xs, ys = (read_tar_images(tmp_path / f"{d}-test-000000.tar") for d in ("x", "y"))
    for key in xs:
        assert xs[key].dtype == np.uint16 and xs[key].ndim == 2
        np.testing.assert_array_equal(ys[key], 65535 - xs[key])
        assert len(np.unique(xs[key] & 0xFF)) > 64  # the low byte is not constant: 8 bits would lose it


def test_rgb_to_one_channel_pairs_keep_the_red_channel(tmp_path):
    write_synthetic(tmp_path, "colour2grey", size=16, train=4, test=3, seed=0)
    formats = {s: v["format"]["channels"] for s, v in read_manifest(tmp_path)["splits"].items()}
    assert formats == {"x-train": 3, "y-train": 1, "x-test": 3, "y-test": 1}
    xs, ys = (read_tar_images(tmp_path / f"{d}-test-000000.tar") for d in ("x", "y"))
    for key in xs:
        np.testing.assert_array_equal(ys[key], xs[key][..., 0])


@pytest.mark.parametrize("task", ["stripes", "photos"])
def test_same_seed_gives_the_same_bytes(task, tmp_path):
    a = write_synthetic(tmp_path / "a", task, size=16, train=5, test=2, seed=1)
    b = write_synthetic(tmp_path / "b", task, size=16, train=5, test=2, seed=1)
    c = write_synthetic(tmp_path / "c", task, size=16, train=5, test=2, seed=2)
    shas = lambda m: [s["sha256"] for split in read_manifest(m.parent)["splits"].values() for s in split["shards"]]
    assert shas(a) == shas(b) and shas(a) != shas(c)


def test_photos_are_crops_of_real_photographs_with_held_out_test_pictures(tmp_path):
    write_synthetic(tmp_path, "photos", size=32, train=64, test=16, seed=0)
    xs, ys = (read_tar_images(tmp_path / f"{d}-test-000000.tar") for d in ("x", "y"))
    assert all(np.array_equal(ys[k], photos_task(xs[k], np.zeros((32, 32), bool))) for k in xs)  # paired: T(x)
    train = read_tar_images(tmp_path / "x-train-000000.tar")
    assert np.mean([image.std() for image in train.values()]) > 10  # natural texture, not flat colour
    assert set(PHOTOS["train"]).isdisjoint(PHOTOS["test"])
    psnr = np.mean([10 * np.log10(255**2 / ((xs[k].astype(float) - ys[k]) ** 2).mean()) for k in xs])
    assert psnr < 25  # the identity is a poor translation


def test_photo_transform_is_invertible_up_to_rounding():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = photos_task(image, np.zeros((16, 16), bool)).astype(float) / 255
    rgb = out ** (1 / PHOTO_GAMMAS)  # undo the tone curves, then the saturation change
    luma = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    back = luma + (rgb - luma) / PHOTO_SATURATION
    assert np.abs(back * 255 - image).mean() < 3


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"manifest.json not found; write shards with"):
        read_manifest(tmp_path)
