"""Built-in unpaired data with a known answer: Y = T(X) for a hidden invertible mapping T.

X images are reddish shapes (discs, boxes) on bluish, shaded backgrounds, so no task's T leaves them unchanged and
the identity is a poor translation. Training sets are unpaired (x-train and y-train come from independent scenes);
test sets are paired (y-test[k] = T(x-test[k]), same keys), so PSNR of G(x) against T(x) measures quality.

Tasks:
  colour  - T permutes the colour channels (R, G, B) -> (B, R, G): easy, learnable in minutes on a CPU.
  stripes - T darkens every other pair of rows inside the shapes (invertible up to rounding): harder.
  grey16  - 16-bit single-channel X (the scene's luma with detail below 8 bits); T is the negative, exact in 16
            bits (thermal imaging's palette switch).
  colour2grey - X are the RGB scenes, Y one 8-bit channel: T keeps the red channel (channels differ between X
            and Y, so the generators map 3 channels to 1 and back).
  photos  - real image statistics: X are random crops of the photographs bundled with scikit-image (an optional
            extra: pip install -e .[photos]), downscaled to the size; T scales the saturation by 0.4 and applies a tone
            curve per channel (gammas 0.5, 1, 2), invertible but where rounding merges dark levels (gamma 2 on
            blue keeps 192 of 256). Test pairs are crops of other
            photographs than the training crops.

    python -m shards.synthetic --task colour --out data/colour --size 32 --train 2048 --test 64

`data.root: builtin:colour` (or `builtin:stripes`) makes the same data set once into a cache directory, so a demo
needs no preparatory command.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from shards.encoding import colour_histogram, npy_bytes, png_bytes
from shards.manifest import MANIFEST, split_entry, write_manifest
from shards.pixels import RGB8, PixelFormat, encode_pixels
from shards.tar_shards import write_shards
from shards.urls import ShardsError

Scene = tuple[np.ndarray, np.ndarray]  # image [H, W, 3] uint8, object mask [H, W] bool


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """One X-domain scene: a shaded bluish background with 1-3 reddish discs or boxes."""
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    top = rng.uniform([20, 40, 150], [70, 110, 230])
    bottom = rng.uniform([10, 20, 110], [50, 80, 190])
    image = top * (1 - rows) + bottom * rows + rng.normal(0, 4, (size, size, 3))
    image = np.broadcast_to(image, (size, size, 3)).copy()
    mask = np.zeros((size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 4)):
        colour = rng.uniform([170, 20, 20], [250, 90, 90])
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        radius = rng.uniform(0.1, 0.25) * size
        if rng.random() < 0.5:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            shape = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius * rng.uniform(0.5, 1.0))
        image[shape] = colour + rng.normal(0, 4, (int(shape.sum()), 3))
        mask |= shape
    return np.clip(image, 0, 255).astype(np.uint8), mask


def colour_task(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T for `colour`: new (R, G, B) = old (B, R, G)."""
    return image[..., [2, 0, 1]].copy()


def stripes_task(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T for `stripes`: inside the shapes, rows 0-1 of every 4 are darkened to 35%."""
    out = image.astype(np.float32)
    rows = (np.arange(image.shape[0]) // 2) % 2 == 0
    out[mask & rows[:, None]] *= 0.35
    return np.round(out).astype(np.uint8)


PHOTO_SATURATION = 0.4
PHOTO_GAMMAS = np.array([0.5, 1.0, 2.0])
PHOTOS = {  # files of scikit-image's data folder: training crops, and the held-out photographs of the test pairs
    "train": ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg"),
    "test": ("chelsea.png", "coffee.png"),
}


def photos_task(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T for `photos`: the saturation times PHOTO_SATURATION (a blend towards the luma, which stays in range), then
    each channel to the power PHOTO_GAMMAS (on [0, 1])."""
    rgb = image.astype(np.float64) / 255
    luma = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
    rgb = luma + PHOTO_SATURATION * (rgb - luma)
    return np.round(np.clip(rgb, 0, 1) ** PHOTO_GAMMAS * 255).astype(np.uint8)


def photographs(part: str) -> list[np.ndarray]:
    """The RGB photographs of PHOTOS[part] from scikit-image's data folder.

    Raises:
        ShardsError: scikit-image is not installed.
    """
    try:
        import skimage
    except ImportError:
        raise ShardsError(
            "the photos task crops the photographs that scikit-image bundles; install it with pip install -e .[photos]"
        ) from None
    folder = Path(skimage.__file__).parent / "data"
    return [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS[part]]


def photo_crops(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> Iterator[Scene]:
    """Endless square crops of random photographs and sides (2 x size up to half the shorter edge; for sizes the
    photographs are too small for, from min(2 x size, the shorter edge)), resized to size x size; the masks are
    empty."""
    while True:
        photo = photos[int(rng.integers(len(photos)))]
        height, width = photo.shape[:2]
        low = min(2 * size, height, width)
        side = int(rng.integers(low, max(low, min(height, width) // 2) + 1))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BOX)
        yield np.asarray(crop), np.zeros((size, size), bool)


def rendered_scenes(rng: np.random.Generator, size: int) -> Iterator[Scene]:
    while True:
        yield render_scene(rng, size)


def grey16_form(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """X of `grey16`: the scene's luma at 16 bits with fine noise (a third of an 8-bit step), so the low 8 bits
    carry detail: uint16 [H, W, 1]."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) * 257
    return np.clip(np.round(luma + rng.normal(0, 85, luma.shape)), 0, 65535).astype(np.uint16)[..., None]


def grey16_task(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T for `grey16`: the negative (as a thermal camera's white-hot and black-hot palettes), exact in 16 bits."""
    return 65535 - image


def red_task(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """T for `colour2grey`: the red channel alone, one 8-bit channel (as one band of a colour sensor)."""
    return image[..., :1].copy()


TASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "colour": colour_task,
    "stripes": stripes_task,
    "photos": photos_task,
    "grey16": grey16_task,
    "colour2grey": red_task,
}
X_FORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {"grey16": grey16_form}
"""How a task's X images are made from the rendered RGB scene, where they are not that scene."""
SOURCE_FORMATS = {"grey16": PixelFormat(1, 16)}
TARGET_FORMATS = {"grey16": PixelFormat(1, 16), "colour2grey": PixelFormat(1, 8)}
"""The pixel formats of X and Y where they are not 8-bit RGB."""


def _scenes(task: str, part: str, size: int, seed: int) -> Iterator[Scene]:
    rng = np.random.default_rng(seed)
    if task == "photos":
        return photo_crops(rng, photographs(part), size)
    return rendered_scenes(rng, size)


def _samples(
    task: str, part: str, size: int, count: int, seed: int, transform: bool, extras: bool
) -> Iterator[dict[str, Any]]:
    scenes = _scenes(task, part, size, seed)
    noise = np.random.default_rng([seed, 1])
    for index in range(count):
        image, mask = next(scenes)
        if task in X_FORMS:
            image = X_FORMS[task](image, noise)
        if transform:
            image = TASKS[task](image, mask)
        image_part, data = encode_pixels(image, "png")
        sample = {"__key__": f"{index:07d}", image_part: data}
        if extras:
            # Label map: 255 on the objects, 0 on the background; histogram of the image as stored.
            sample["label.png"] = png_bytes((mask * 255).astype(np.uint8))
            sample["hist.npy"] = npy_bytes(colour_histogram(image))
        yield sample


def write_synthetic(
    out: str | Path,
    task: str,
    size: int,
    train: int,
    test: int,
    seed: int = 0,
    maxcount: int = 1024,
    extras: bool = False,
) -> Path:
    """Write x-train, y-train (unpaired) and x-test, y-test (paired) shards of `task` plus the manifest; with
    `extras` every sample also carries label.png (the object mask) and hist.npy (its colour histogram).

    Returns:
        The path of manifest.json.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")
    if task in ("photos", "grey16", "colour2grey") and extras:
        raise ValueError(f"the {task} task writes no extras (object masks and colour histograms are of RGB scenes)")
    # Three seed streams: x-train and y-train must not share scenes (unpaired); the test pairs share theirs.
    x_train, y_train, test_seed = np.random.SeedSequence(seed).generate_state(3)
    plan = {
        "x-train": _samples(task, "train", size, train, int(x_train), transform=False, extras=extras),
        "y-train": _samples(task, "train", size, train, int(y_train), transform=True, extras=extras),
        "x-test": _samples(task, "test", size, test, int(test_seed), transform=False, extras=extras),
        "y-test": _samples(task, "test", size, test, int(test_seed), transform=True, extras=extras),
    }
    formats = {"x": SOURCE_FORMATS.get(task, RGB8), "y": TARGET_FORMATS.get(task, RGB8)}
    splits = {
        split: split_entry(write_shards(out, split, samples, maxcount), (size, size), None, formats[split[0]])
        for split, samples in plan.items()
        if (train if split.endswith("train") else test) > 0
    }
    return write_manifest(out, splits, {"synthetic": {"task": task, "seed": seed, "paired_test": True}})


BUILTIN_PREFIX = "builtin:"
BUILTIN = {
    "colour": {"task": "colour", "size": 32, "train": 2048, "test": 64, "extras": False},
    "stripes": {"task": "stripes", "size": 32, "train": 2048, "test": 64, "extras": True},
    "photos": {"task": "photos", "size": 32, "train": 2048, "test": 64, "extras": False},
    "grey16": {"task": "grey16", "size": 32, "train": 2048, "test": 64, "extras": False},
    "colour2grey": {"task": "colour2grey", "size": 32, "train": 2048, "test": 64, "extras": False},
}
"""The data sets `data.root: builtin:NAME` names: made once into a cache directory, byte for byte the same every
time (seed 0). `stripes` carries the extras (label maps and colour histograms); `photos` needs scikit-image."""


def builtin_cache() -> Path:
    """Where built-in data sets are kept: $CYCLEGAN_DATA_CACHE, else $XDG_CACHE_HOME/cyclegan-dist, else
    ~/.cache/cyclegan-dist."""
    if os.environ.get("CYCLEGAN_DATA_CACHE"):
        return Path(os.environ["CYCLEGAN_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cyclegan-dist"


def builtin_root(spec: str) -> Path:
    """The shard directory of `builtin:NAME`, written on first use. Safe with many processes at once (ranks, loader
    workers, several runs): one writes under a file lock while the others wait, and the directory appears whole.

    Raises:
        ShardsError: an unknown name.
    """
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN:
        raise ShardsError(
            f"data.root={spec} is not a built-in data set; expected one of: builtin:{', builtin:'.join(BUILTIN)}"
        )
    params = BUILTIN[name]
    cache = builtin_cache()
    root = cache / f"{name}-{params['size']}px-{params['train']}-{params['test']}"
    if (root / MANIFEST).is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{root.name}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if not (root / MANIFEST).is_file():
            tmp = cache / f"{root.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"making the built-in data set {spec} in {root} (once)")
            write_synthetic(
                tmp, params["task"], params["size"], params["train"], params["test"], extras=params["extras"]
            )
            os.replace(tmp, root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic unpaired dataset with a known answer as shards.")
    parser.add_argument("--task", choices=sorted(TASKS), default="colour")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=int, default=32, help="image height and width in pixels")
    parser.add_argument("--train", type=int, default=2048, help="training images per domain")
    parser.add_argument("--test", type=int, default=64, help="paired test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxcount", type=int, default=1024, help="samples per shard")
    parser.add_argument("--extras", action="store_true", help="also store label.png and hist.npy per sample")
    args = parser.parse_args(argv)
    if args.size < 8 or args.train < 0 or args.test < 0 or args.maxcount < 1:
        parser.error("--size must be >= 8, --train/--test >= 0 and --maxcount >= 1")
    try:
        path = write_synthetic(
            args.out, args.task, args.size, args.train, args.test, args.seed, args.maxcount, args.extras
        )
    except (ShardsError, ValueError) as err:
        parser.exit(2, f"shards.synthetic: {err}\n")
    print(f"wrote {args.task} shards and {path}")


if __name__ == "__main__":
    main()
