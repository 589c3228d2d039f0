"""Translate images with trained generators, in batches, on CPU or GPU.

    python -m trainer.translate --weights RUN_or_EXPORT --direction x2y --input DIR|SHARDS --out DIR

--input is a directory of images (searched recursively; outputs keep each file's relative path and name), a
shard directory (manifest.json; the x-test split for x2y, y-test for y2x, or --split) or a shard URL spec (outputs
are named KEY.png). Each image keeps its size (padded by reflection to a multiple the generator accepts, cropped
back), or --size N resizes it to N x N; one with a side over --tile px is translated in tiles with --halo px of
context, the generator's memory set by the tile (trainer.models.tiling). Outputs are in the target domain's pixel
format: its channels and bit depth (16-bit grey as PNG or TIFF, grey as a grey image, what PNG cannot hold as
TIFF; the suffix changes where the input's format cannot hold them). --side-by-side also writes input | output
pairs under OUT/compare/ (8-bit RGB to look at). Images are decoded as training decodes them (shards.decode, in
the source domain's format, the same pixel limit); an input that cannot be used is skipped and named with its
reason on stderr, and the run fails (exit 2) only when nothing could be translated. From Python:
`load_inference_generators` (trainer.export) and `translate_batches`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from shards.decode import DEFAULT_MAX_PIXELS, BadSample
from shards.manifest import read_manifest, split_urls
from shards.pixels import DTYPES, RGB8, PixelFormat, encode_file, file_suffix
from shards.streams import Reading
from shards.urls import ShardsError, expand_shard_spec
from trainer.algorithms.shared import with_extra
from trainer.checkpoint.export import (
    ExportedGenerators,
    add_inference_arguments,
    inference_device,
    load_inference_generators,
)
from trainer.checkpoint.format import CheckpointError
from trainer.config.checks import ConfigError
from trainer.data.augment import decode, extra_channels, resize
from trainer.data.formats import from_unit_range, to_unit_range
from trainer.data.health import BadSampleCounter
from trainer.data.image_folders import Item, image_files, read_image_dir
from trainer.data.stream import shard_samples
from trainer.models.tiling import translate_tiled
from trainer.observe.grids import display_channels
from trainer.runtime.process_exit import exit_process


def output_name(key: str) -> str:
    """A relative output path from a sample key, which is data: each path component keeps letters, digits and
    `_.+-` (anything else becomes `_`), without leading dots; empty, `.` and `..` components are dropped."""
    parts = [re.sub(r"[^A-Za-z0-9_.+-]", "_", part).lstrip(".") for part in key.split("/")]
    return "/".join(part for part in parts if part) or "_"


def read_shards(
    urls: list[str], extra: str, skipped: list[str] | None = None, pixel_format: PixelFormat = RGB8
) -> Iterator[Item]:
    """Every decodable sample of the shards (in `pixel_format`), named KEY.png (see `output_name`). Each bad sample
    (and each tar-level error) is appended to `skipped` as "SHARD:KEY: reason"; None prints those lines to stderr
    at the end."""
    bad = BadSampleCounter()
    lines = [] if skipped is None else skipped
    for sample in (s for url in urls for s in shard_samples(url, 0, bad, Reading())):
        try:
            image, extra_part = decode(sample, extra, DEFAULT_MAX_PIXELS, pixel_format)
        except BadSample as err:
            lines.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {err}")
            continue
        yield f"{output_name(str(sample['__key__']))}.png", image, extra_part
    lines.extend(bad.examples)  # tar-level errors (handler), at most 8
    if skipped is None:
        for line in lines:
            print(f"skipped {line}", file=sys.stderr)


def read_inputs(
    source: str,
    direction: str,
    split: str | None,
    extra: str,
    skipped: list[str] | None = None,
    pixel_format: PixelFormat = RGB8,
) -> Iterator[Item]:
    """The images of --input: an image directory, a shard directory or a shard URL spec. Images are decoded as
    training decodes them, in the source domain's `pixel_format` (for 8-bit RGB, grey, RGBA and palette images are
    converted); an input that cannot be used is skipped and appended to `skipped` as "WHERE: reason" (None:
    printed to stderr).

    Raises:
        ConfigError: a path that does not exist or holds nothing to translate.
    """
    path = Path(source)
    if path.is_dir() and (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        split = split or f"{direction[0]}-test"
        if split not in manifest["splits"]:
            raise ConfigError(f"--input {path}: no split {split}; it has {', '.join(sorted(manifest['splits']))}")
        return read_shards(split_urls(path, manifest, split), extra, skipped, pixel_format)
    if path.is_dir():
        files = image_files(path, "--input")
        return read_image_dir(path, files, extra, "--input", DEFAULT_MAX_PIXELS, skipped, pixel_format)
    if not any(mark in source for mark in "{:") and not path.suffix == ".tar":
        raise ConfigError(f"--input {source} does not exist (expected an image directory, shard directory or shards)")
    return read_shards(expand_shard_spec(source, allow_pipe=False, key="--input"), extra, skipped, pixel_format)


Crop = tuple[int, int, int, int]
"""(top, left, height, width): where an image lies in its padded tensor."""


Pending = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, Crop]
"""(name, image, padded image, padded extra, crop) of an image waiting for its batch."""


@dataclass
class Translator:
    """One generator's translation of images from the source domain's format to the target's."""

    net: torch.nn.Module
    source: PixelFormat
    target: PixelFormat
    extra: str  # data.extra of the training run
    device: torch.device
    bf16: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch(self, batch: list[Pending]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, input, output) of padded images of one shape translated together, cropped back."""
        images = to_unit_range(torch.stack([padded for _, _, padded, _, _ in batch]).to(self.device), self.source)
        extra = None
        if self.extra != "none":
            extra = torch.stack([e for *_, e, _ in batch])
            extra = extra_channels(extra, self.extra, images.shape[-2:]).to(self.device)
        with torch.no_grad(), self.autocast():
            out = self.net(with_extra(images, extra))
        pixels = from_unit_range(out, self.target).cpu()
        for (name, image, _, _, (top, left, height, width)), result in zip(batch, pixels):
            yield name, image, result[:, top : top + height, left : left + width]

    def tiled(self, image: torch.Tensor, extra: torch.Tensor | None, multiple: int, tile: int, halo: int):
        """One image translated tile by tile (trainer.models.tiling): the generator sees windows of the image,
        padded as the untiled path pads it, by index (no padded copy of the image is made)."""
        height, width = image.shape[-2:]
        padded, (top, left, _, _) = padded_size(height, width, multiple)

        def tile_input(row: int, col: int, rows: int, cols: int) -> torch.Tensor:
            index = reflected(row - top, rows, height), reflected(col - left, cols, width)
            window = to_unit_range(image[:, index[0]][:, :, index[1]].to(self.device), self.source)[None]
            if self.extra == "label":
                label = extra_channels(extra[:, index[0]][:, :, index[1]][None], "label", 0)
                return with_extra(window, label.to(self.device))
            if self.extra == "hist":
                return with_extra(window, extra_channels(extra[None], "hist", (rows, cols)).to(self.device))
            return window

        out = np.empty((*padded, self.target.channels), DTYPES[self.target.bits])
        with self.autocast():
            translate_tiled(self.net, tile_input, padded, out, lambda band: from_unit_range(band, self.target), tile,
                            halo)  # fmt: skip
        return torch.from_numpy(out[top : top + height, left : left + width]).permute(2, 0, 1)


def translate_batches(
    gens: ExportedGenerators,
    direction: str,
    items: Iterable[Item],
    size: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    tiling: tuple[int, int] | None = None,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, input, output) for each item, integer pixels [C, H, W] of the source's and the target's format on the
    CPU (augment.pixel_tensor). By default (`size` None or 0) each image keeps its own size: padded by reflection
    to a size the generator takes (`pad_to_multiple`), translated, cropped back. `size` N resizes to N x N instead
    (said once on stderr when that changes an image's aspect). Consecutive images of one shape go through the
    generator together, up to `batch_size`; with `tiling` (tile, halo), an image with a side over `tile` is
    translated in tiles (trainer.models.tiling; its 16-bit output is uint16, half the memory of int32)."""
    translator = Translator(_generator(gens, direction), *gens.direction_formats(direction), gens.extra,
                            torch.device(device), bf16)  # fmt: skip
    translator.net.to(translator.device).eval()
    multiple = gens.model.min_image_multiple()
    batch: list[Pending] = []
    squashed = False
    for name, image, extra in items:
        if size:
            if not squashed and image.shape[-1] != image.shape[-2]:
                print(f"translate: --size {size} changes the aspect of images that are not square (the first: "
                      f"{name}, {image.shape[-1]}x{image.shape[-2]} px); without --size each keeps its size",
                      file=sys.stderr)  # fmt: skip
                squashed = True
            image = resize(image, size)
            extra = resize(extra, size, nearest=True) if gens.extra == "label" else extra
        if tiling and max(image.shape[-2:]) > tiling[0]:
            yield from translator.batch(batch) if batch else ()
            batch = []
            yield name, image, translator.tiled(image, extra, multiple, *tiling)
            continue
        padded, crop = pad_to_multiple(image, multiple)
        if gens.extra == "label":
            extra, _ = pad_to_multiple(extra, multiple)
        if batch and (len(batch) == batch_size or batch[0][2].shape != padded.shape or batch[0][4] != crop):
            yield from translator.batch(batch)
            batch = []
        batch.append((name, image, padded, extra, crop))
    if batch:
        yield from translator.batch(batch)


def _generator(gens: ExportedGenerators, direction: str) -> torch.nn.Module:
    net = gens.g_xy if direction == "x2y" else gens.g_yx
    if net is None:
        raise ConfigError(
            f"--direction {direction}: model.family={gens.model.family} trains one generator, X -> Y; use "
            "--direction x2y (translating Y -> X needs a CycleGAN, or a second run with X and Y swapped)"
        )
    return net


def padded_size(height: int, width: int, multiple: int) -> tuple[tuple[int, int], Crop]:
    """The size `pad_to_multiple` pads an image of height x width to, and the crop that takes it back."""
    extra_h, extra_w = (max(-side % multiple, 2 * multiple - side) for side in (height, width))
    return (height + extra_h, width + extra_w), (extra_h // 2, extra_w // 2, height, width)


def reflected(start: int, length: int, size: int) -> torch.Tensor:
    """Indices into an axis of `size` for positions start .. start + length - 1, mirrored at its ends as
    reflection padding mirrors them (-1 -> 1, size -> size - 2)."""
    position = torch.arange(start, start + length).abs()
    period = max(2 * (size - 1), 1)
    position = position % period
    return torch.where(position >= size, period - position, position)


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Crop]:
    """Integer pixels [C, H, W] padded evenly on each side by reflection (by repeating the edge where the image is
    too small to reflect) to the next multiple of `multiple`, and to at least twice it, so that the generator's
    narrowest layer keeps more than one pixel to normalize; with the crop that takes the output back."""
    height, width = image.shape[-2:]
    (padded_h, padded_w), crop = padded_size(height, width, multiple)
    if (padded_h, padded_w) == (height, width):
        return image, crop
    top, left = crop[:2]
    extra_h, extra_w = padded_h - height, padded_w - width
    pads = (left, extra_w - left, top, extra_h - top)
    mode = "reflect" if max(pads[:2]) < width and max(pads[2:]) < height else "replicate"
    padded = F.pad(image[None].float(), pads, mode=mode)[0].to(image.dtype)
    return padded, (top, left, height, width)


def save_image(pixels: torch.Tensor, out: Path, name: str, pixel_format: PixelFormat = RGB8) -> Path:
    """Write integer pixels [C, H, W] of `pixel_format` to out/name: in the format of the name's suffix where it
    holds them (8-bit grey and RGB: any; 16-bit grey: PNG or TIFF), else as PNG or TIFF under that suffix
    (shards.pixels.file_suffix); JPEG at quality 95. Returns the path written.

    Raises:
        ConfigError: `name` would lead outside `out` (through `..`, an absolute path or a symlink), or the file
            cannot be written.
    """
    path = out / name
    suffix = file_suffix(path.suffix, pixel_format)
    if suffix != path.suffix.lower():  # a name whose format cannot hold the pixels
        path = path.with_suffix(suffix)
    if not path.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"output {name!r:.120} would be written outside --out {out}; refusing")
    data = encode_file(pixels.permute(1, 2, 0).numpy().astype(DTYPES[pixel_format.bits]), suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as err:
        raise ConfigError(f"cannot write {err.filename or path}: {err.strerror or err}") from None
    return path


def side_by_side(image: torch.Tensor, output: torch.Tensor, source: PixelFormat, target: PixelFormat) -> torch.Tensor:
    """input | output as 8-bit RGB to look at (grey as grey, 16 bits scaled: observe.grids.display_channels)."""
    halves = [to_unit_range(pixels, fmt) for pixels, fmt in ((image, source), (output, target))]
    return from_unit_range(torch.cat([display_channels(half) for half in halves], dim=-1), RGB8)


def tile_and_halo(tile: int, halo: int, multiple: int) -> tuple[int, int] | None:
    """--tile and --halo rounded up to the generator's multiple (None for --tile 0).

    Raises:
        ConfigError: a negative value, or a tile without room for a core inside its halo.
    """
    if tile == 0:
        return None
    tile, halo = (-(-value // multiple) * multiple for value in (tile, halo))
    if halo < 0 or tile <= 2 * halo:
        raise ConfigError(
            f"--tile {tile} --halo {halo} (rounded up to multiples of {multiple}): the tile must be over twice the "
            "halo, which must be >= 0"
        )
    return tile, halo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Translate images with trained CycleGAN generators.")
    add_inference_arguments(parser)
    parser.add_argument("--direction", required=True, choices=["x2y", "y2x"], help="x2y: G, y2x: F")
    parser.add_argument("--input", required=True, help="image directory, shard directory or shard URL spec")
    parser.add_argument("--split", help="with a shard directory: the split (default x-test for x2y, y-test for y2x)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--size", type=int, help="resize to this square side (default, or 0: each image's own size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--side-by-side", action="store_true", help="also write input | output to OUT/compare/")
    parser.add_argument(
        "--tile", type=int, default=2048, help="translate images with a side over N px in tiles of N px, memory "
        "bounded by the tile (0: never)"
    )  # fmt: skip
    parser.add_argument(
        "--halo", type=int, default=112, help="context around each tile's core (rounded up to the generator's "
        "multiple); 7/8 of it covering the generator's receptive field gives the untiled result"
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = inference_device(args.device)
    count, skipped = 0, []
    try:
        if args.size is not None and args.size < 0:
            raise ConfigError(f"--size {args.size}: expected a side in pixels, or 0 for each image's own size")
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} exists and is not a directory")
        gens = load_inference_generators(args.weights, args.step, args.best)
        tiling = tile_and_halo(args.tile, args.halo, gens.model.min_image_multiple())
        source, target = gens.direction_formats(args.direction)
        items = read_inputs(args.input, args.direction, args.split, gens.extra, skipped, source)
        results = translate_batches(gens, args.direction, items, args.size, args.batch_size, device, args.bf16, tiling)
        for name, image, output in tqdm(results, desc=f"translate {args.direction}", unit="img", disable=None):
            save_image(output, args.out, name, target)
            if args.side_by_side:
                save_image(side_by_side(image, output, source, target), args.out / "compare", name)
            count += 1
    except (ConfigError, CheckpointError, ShardsError) as err:
        print(f"translate: {err}", file=sys.stderr)
        return 2
    if count == 0:
        why = f"{len(skipped)} skipped; the first: {skipped[0]}" if skipped else "it holds no samples"
        print(f"translate: nothing in --input {args.input} could be translated ({why})", file=sys.stderr)
        return 2
    for line in skipped:
        print(f"translate: skipped {line}", file=sys.stderr)
    print(
        f"translated {count} images ({args.direction}) into {args.out}"
        + (f"; skipped {len(skipped)}" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    exit_process(main())  # without the interpreter teardown of torch (about 0.6 s)
