"""shards.pixels: formats kept losslessly, hostile headers refused before any pixel is decoded, the conversions
shards.write --channels/--bits ask for; the manifest's format records; shards.write's refusals."""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from shards.manifest import read_manifest, split_format, write_manifest
from shards.pixels import (
    NPY_PART,
    RGB8,
    PixelFormat,
    convert_pixels,
    encode_file,
    encode_pixels,
    file_suffix,
    format_of,
    pil_pixels,
    read_pixels,
    resize_pixels,
)
from shards.urls import ShardsError
from shards.write import main as write_main

FORMATS = [PixelFormat(c, b) for c in (1, 2, 3, 4, 7) for b in (8, 16)]


def random_pixels(pixel_format: PixelFormat, shape=(5, 7)) -> np.ndarray:
    dtype = np.uint16 if pixel_format.bits == 16 else np.uint8
    return np.random.default_rng(0).integers(0, pixel_format.max_value + 1, (*shape, pixel_format.channels), dtype)


@pytest.mark.parametrize("pixel_format", FORMATS, ids=str)
def test_every_format_is_stored_and_written_losslessly(pixel_format):
    pixels = random_pixels(pixel_format)
    part, data = encode_pixels(pixels, "png")
    expected = "png" if (pixel_format.bits, pixel_format.channels) in {(8, 1), (8, 3), (8, 4), (16, 1)} else NPY_PART
    assert part == expected
    np.testing.assert_array_equal(read_pixels(data, 1000), pixels)
    suffix = file_suffix(".png", pixel_format)
    np.testing.assert_array_equal(read_pixels(encode_file(pixels, suffix), 1000), pixels)
    assert format_of(read_pixels(encode_file(pixels, ".tif"), 1000)) == pixel_format


def test_an_output_suffix_changes_only_where_its_format_cannot_hold_the_pixels():
    assert file_suffix(".JPG", RGB8) == ".jpg" and file_suffix(".jpg", PixelFormat(1, 8)) == ".jpg"
    assert file_suffix(".jpg", PixelFormat(4, 8)) == ".png" and file_suffix(".webp", PixelFormat(4, 8)) == ".webp"
    assert file_suffix(".jpg", PixelFormat(1, 16)) == ".png" and file_suffix(".tiff", PixelFormat(1, 16)) == ".tiff"
    assert file_suffix(".png", PixelFormat(3, 16)) == ".tif" and file_suffix(".png", PixelFormat(5, 8)) == ".tif"


def test_tiff_pages_and_samples_are_channels():
    pages = random_pixels(PixelFormat(5, 16)).transpose(2, 0, 1)  # 5 pages of one band
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pages, photometric="minisblack")
    np.testing.assert_array_equal(read_pixels(buffer.getvalue(), 1000), pages.transpose(1, 2, 0))


def npy_with_header(shape, descr="|u1") -> bytes:
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (npy_with_header((100000, 100000, 3)), "100000x100000 pixels, over the limit of 1000"),
        (npy_with_header((4, 4, 200)), "with 200 channels; expected 1 to 64"),
        (npy_with_header((4, 4)), "of shape (4, 4); expected uint8 or uint16 [H, W, C]"),
        (npy_with_header((2, 2, 1), "<f4"), "float32 of shape (2, 2, 1)"),
        (npy_with_header((2, 2, 1), "|O"), "object of shape (2, 2, 1)"),
        (npy_with_header((20, 20, 3)), "does not load"),  # 64 bytes where 1200 belong
        (b"\x93NUMPY\x03\x00" + b"\0" * 40, "version (3, 0), expected 1.0 or 2.0"),
    ],
    ids=["bomb", "channels", "2d", "float", "pickle", "truncated", "version"],
)
def test_a_hostile_npy_image_is_one_line_before_its_data_is_read(data, message):
    with pytest.raises(ValueError, match=r"^image ") as err:
        read_pixels(data, 1000)
    assert message in str(err.value) and "\n" not in str(err.value)


def tiff_claiming(width: int, height: int, bits: int = 16, sample_format: int = 1) -> bytes:
    """A one-strip grey TIFF whose header describes width x height pixels (unsigned integers, or floats with
    sample_format 3) without any pixel data."""
    strip = width * height * bits // 8 & 0xFFFFFFFF
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, strip), (339, 3, sample_format)]  # fmt: skip
    data = struct.pack("<2sHIH", b"II", 42, 8, len(entries))
    for tag, kind, value in entries:
        data += (
            struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        )
    return data + struct.pack("<I", 0)


def test_a_hostile_tiff_is_refused_from_its_header():
    start = time.monotonic()
    with pytest.raises(ValueError, match="50000x50000 pixels, over the limit of 1000"):
        read_pixels(tiff_claiming(50000, 50000), 1000)
    assert time.monotonic() - start < 5  # 5 GB of pixels never decoded
    with pytest.raises(ValueError, match="TIFF of float32 pixels; expected 8- or 16-bit unsigned integers"):
        read_pixels(tiff_claiming(4, 4, 32, 3), 1000)
    with pytest.raises(ValueError, match="is not a readable TIFF"):
        read_pixels(b"II*\x00" + b"\xff" * 20, 1000)


def test_pil_images_keep_their_mode_and_float_is_refused():
    palette = Image.new("P", (3, 2))
    palette.info["transparency"] = 0
    assert format_of(read_pixels(encode(palette), 100)) == PixelFormat(4, 8)
    assert format_of(read_pixels(encode(Image.new("LA", (3, 2))), 100)) == PixelFormat(2, 8)
    assert format_of(read_pixels(encode(Image.new("I;16", (3, 2))), 100)) == PixelFormat(1, 16)
    with pytest.raises(ValueError, match="32-bit floating-point pixels"):
        pil_pixels(Image.new("F", (3, 2)))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_conversions_between_channel_counts_and_depths():
    rgb = np.array([[[200, 100, 50]]], np.uint8)
    assert convert_pixels(rgb, PixelFormat(1, 8)).item() == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    np.testing.assert_array_equal(convert_pixels(rgb[..., :1], RGB8), [[[200, 200, 200]]])
    np.testing.assert_array_equal(convert_pixels(np.array([[[1, 2, 3, 4]]], np.uint8), RGB8), [[[1, 2, 3]]])
    assert convert_pixels(np.array([[[255]]], np.uint8), PixelFormat(1, 16)).item() == 65535
    assert convert_pixels(np.array([[[257 * 7 + 128]]], np.uint16), PixelFormat(1, 8)).item() == 7
    grey16 = random_pixels(PixelFormat(2, 16), (9, 9))
    resized = resize_pixels(grey16, 4, 6)
    assert resized.shape == (4, 6, 2) and resized.dtype == np.uint16


def test_a_manifest_format_record_is_checked(tmp_path):
    split = {"samples": 0, "shards": []}
    write_manifest(tmp_path, {"x-train": {**split, "format": {"channels": 1, "bits": 16}}, "y-train": split})
    manifest = read_manifest(tmp_path)
    assert split_format(manifest, "x-train") == PixelFormat(1, 16) and split_format(manifest, "y-train") == RGB8
    for bad in ({"channels": 0, "bits": 8}, {"channels": 3, "bits": 12}, {"channels": True, "bits": 8}, [3, 8]):
        write_manifest(tmp_path, {"x-train": {**split, "format": bad}})
        with pytest.raises(ShardsError, match=r"manifest.json: split x-train: format .* is not \{channels: 1\.\.64"):
            read_manifest(tmp_path)


def test_a_domain_mixing_formats_is_refused_naming_two_files_unless_converted(tmp_path, capsys):
    x, y = tmp_path / "x", tmp_path / "y"
    for folder in (x, y):
        folder.mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    Image.new("L", (8, 8), 99).save(x / "b.png")
    args = ["--x", str(x), "--y", str(y), "--out", str(tmp_path / "out"), "--workers", "1"]
    with pytest.raises(SystemExit) as err:
        write_main(args)
    assert str(err.value) == (
        f"shards.write: {x} mixes image formats: a.png is 8-bit with 3 channels, b.png is 8-bit with 1 channel; "
        "convert them with --channels N and/or --bits 8|16"
    )
    write_main([*args, "--channels", "1", "--bits", "16"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["x-train"]["format"] == {"channels": 1, "bits": 16}
    with pytest.raises(SystemExit, match=r"b\.png is 8-bit with 1 channel: --extra hist stores colour histograms"):
        write_main([*args[:-2], "--out", str(tmp_path / "hist"), "--extra", "hist"])


def test_a_load_size_that_changes_the_aspect_says_so_once(tmp_path, capsys):
    x, y = tmp_path / "x", tmp_path / "y"
    for folder in (x, y):
        folder.mkdir()
        Image.new("RGB", (12, 12)).save(folder / "square.png")
    Image.new("RGB", (20, 10)).save(x / "wide.png")
    Image.new("RGB", (10, 30)).save(x / "tall.png")
    write_main(["--x", str(x), "--y", str(y), "--out", str(tmp_path / "out"), "--workers", "1", "--load-size", "8"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "aspect" in line]
    assert lines == [
        "shards.write: --load-size 8 changed the aspect of 2 image(s) that are not square (the first: x-train: "
        "tall.png, 10x30); each is stored as 8x8"
    ]
    sizes = read_manifest(tmp_path / "out")["splits"]["x-train"]["sizes"]
    assert sizes == {"min": [8, 8], "max": [8, 8], "square": True}  # as stored
    write_main(["--x", str(x), "--y", str(y), "--out", str(tmp_path / "own"), "--workers", "1"])
    assert read_manifest(tmp_path / "own")["splits"]["x-train"]["sizes"] == {
        "min": [10, 10], "max": [30, 20], "square": False
    }  # fmt: skip
    assert "aspect" not in capsys.readouterr().err
