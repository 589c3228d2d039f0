"""What an image's pixels are, and their lossless forms.

A `PixelFormat` is a channel count (1 grey, 3 RGB, 4 RGBA, or N bands) and a bit depth (8 or 16, unsigned
integers). Images are arrays [H, W, C] of uint8 or uint16, read from any file PIL knows or from TIFF (tifffile:
multi-page and multi-band files, each page or sample a channel), stored in shards as PNG or JPEG where those hold
them and as a .npy array otherwise, and converted between channel counts or bit depths only when asked. Every
reader here takes data (untrusted): sizes and channel counts are checked from the header before pixels are
decoded, nothing is unpickled, and every failure is a ValueError with one line saying what is wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_CHANNELS = 64
"""Most channels (bands) an image may have."""
BIT_DEPTHS = (8, 16)
NPY_PART = "pixels.npy"
"""The sample part of an image that neither PNG nor JPEG holds (2 or over 4 channels, 16-bit colour)."""
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DTYPES = {8: np.uint8, 16: np.uint16}


@dataclass(frozen=True)
class PixelFormat:
    """A channel count and a bit depth."""

    channels: int = 3
    bits: int = 8

    @property
    def max_value(self) -> int:
        """The value of full intensity: 255 or 65535."""
        return (1 << self.bits) - 1

    def describe(self) -> str:
        return f"{self.bits}-bit with {self.channels} channel{'s' if self.channels != 1 else ''}"

    def to_json(self) -> dict[str, int]:
        return {"channels": self.channels, "bits": self.bits}

    @staticmethod
    def from_json(record: Any, where: str) -> PixelFormat:
        """A format from its manifest or export record (data: checked).

        Raises:
            ValueError: one line naming `where` and what is wrong.
        """
        channels = record.get("channels") if isinstance(record, dict) else None
        bits = record.get("bits") if isinstance(record, dict) else None
        if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS or bits not in BIT_DEPTHS:
            raise ValueError(f"{where}: format {record!r:.80} is not {{channels: 1..{MAX_CHANNELS}, bits: 8 or 16}}")
        return PixelFormat(channels, bits)


RGB8 = PixelFormat(3, 8)
"""The format of photographs, and of every shard written before formats were recorded."""


def format_of(pixels: np.ndarray) -> PixelFormat:
    """The format of an array [H, W, C] of uint8 or uint16."""
    return PixelFormat(pixels.shape[2], 16 if pixels.dtype == np.uint16 else 8)


def _check_size(height: int, width: int, channels: int, max_pixels: int, part: str) -> None:
    if height * width > max_pixels:
        raise ValueError(f"{part} is {width}x{height} pixels, over the limit of {max_pixels} (max_image_pixels)")
    if not 1 <= channels <= MAX_CHANNELS or 0 in (height, width):
        raise ValueError(f"{part} is {width}x{height} pixels with {channels} channels; expected 1 to {MAX_CHANNELS}")


def pil_pixels(image: Image.Image, part: str = "image") -> np.ndarray:
    """The pixels of a PIL image as they are: grey (and 1-bit) -> 1 channel, grey + alpha -> 2, RGB -> 3, RGBA -> 4,
    8 bits; 16-bit grey -> 1 channel of 16 bits (32-bit integer grey, how PIL opens some 16-bit files, is clipped
    to 16 bits); palette images become RGB (RGBA when the palette has transparency); CMYK, YCbCr, LAB and HSV
    become RGB.

    Raises:
        ValueError: floating-point pixels.
    """
    mode = image.mode
    if mode == "F":
        raise ValueError(f"{part} has 32-bit floating-point pixels; expected 8- or 16-bit integers")
    if mode == "I" or mode.startswith("I;16"):
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)[..., None]
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("La", "RGBa"):
        image = image.convert(mode.upper())
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def tiff_pixels(data: bytes, max_pixels: int, part: str = "image") -> np.ndarray:
    """The first image series of a TIFF file as [H, W, C]: every axis other than height and width (samples,
    planes, pages) is a channel, so a multi-page grey TIFF is one multi-band image. Sizes are checked before the
    pixels are decoded.

    Raises:
        ValueError: not a TIFF tifffile reads, over `max_pixels`, too many channels, or pixels that are not 8- or
            16-bit unsigned integers.
    """
    import tifffile  # only for TIFF files (0.2 s)

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            axes, shape, dtype = series.axes, series.shape, np.dtype(series.dtype)
            if "Y" not in axes or "X" not in axes:
                raise ValueError(f"{part} is a TIFF of axes {axes}, without height and width")
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            channels = int(np.prod([n for a, n in zip(axes, shape) if a not in "YX"]))
            _check_size(height, width, channels, max_pixels, part)
            if dtype not in (np.uint8, np.uint16):
                raise ValueError(f"{part} is a TIFF of {dtype} pixels; expected 8- or 16-bit unsigned integers")
            array = series.asarray()
    except ValueError:
        raise
    except Exception as err:  # a hostile file can make tifffile raise anything
        raise ValueError(f"{part} is not a readable TIFF ({type(err).__name__}: {err!s:.100})") from None
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
    return np.ascontiguousarray(array.transpose(order).reshape(height, width, channels))


def npy_shape(data: bytes, part: str = NPY_PART) -> tuple[int, ...]:
    """The shape of an image stored as .npy (uint8 or uint16 [H, W, C]), from its header alone.

    Raises:
        ValueError: not such an array.
    """
    handle = io.BytesIO(data)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(handle)
        if version not in read_header:
            raise ValueError(f"version {version}, expected 1.0 or 2.0")
        shape, _, dtype = read_header[version](handle)
    except Exception as err:  # a malformed header of any kind
        raise ValueError(f"{part} is not a .npy array ({type(err).__name__}: {err!s:.100})") from None
    if len(shape) != 3 or dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{part} is {dtype} of shape {shape}; expected uint8 or uint16 [H, W, C]")
    return shape


def npy_pixels(data: bytes, max_pixels: int, part: str = NPY_PART) -> np.ndarray:
    """An image stored as .npy (see `npy_shape`); its header is checked before the array is read and nothing is
    unpickled.

    Raises:
        ValueError: not such an array, or over `max_pixels`.
    """
    shape = npy_shape(data, part)
    _check_size(shape[0], shape[1], shape[2], max_pixels, part)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # truncated data
        raise ValueError(f"{part} does not load ({type(err).__name__}: {err!s:.100})") from None


def read_pixels(data: bytes, max_pixels: int, part: str = "image") -> np.ndarray:
    """Any encoded image (.npy, TIFF, or a format PIL identifies) as [H, W, C] of its own format.

    Raises:
        ValueError: one line naming `part` and why it cannot be read.
    """
    if data.startswith(b"\x93NUMPY"):
        return npy_pixels(data, max_pixels, part)
    if data[:4] in TIFF_MAGIC:
        return tiff_pixels(data, max_pixels, part)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                _check_size(height, width, 1, max_pixels, part)
                return pil_pixels(image, part)
    except ValueError:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"{part} is in no format PIL can identify") from None
    except Exception as err:  # a hostile file can make PIL raise anything
        raise ValueError(f"{part} does not decode ({type(err).__name__}: {err!s:.100})") from None


def encode_pixels(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> tuple[str, bytes]:
    """(sample part, bytes) storing `pixels` [H, W, C]: `fmt` (jpg or png) for 8-bit grey and RGB, PNG for 8-bit
    RGBA and 16-bit grey, .npy for the rest; all lossless but JPEG."""
    pixel_format = format_of(pixels)
    buffer = io.BytesIO()
    if pixel_format.bits == 8 and pixel_format.channels in (1, 3, 4) or pixel_format == PixelFormat(1, 16):
        image = Image.fromarray(pixels[..., 0] if pixel_format.channels == 1 else pixels)
        if fmt == "jpg" and pixel_format.bits == 8 and pixel_format.channels != 4:
            image.save(buffer, format="JPEG", quality=quality)
            return "jpg", buffer.getvalue()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return NPY_PART, buffer.getvalue()


def convert_pixels(pixels: np.ndarray, target: PixelFormat) -> np.ndarray:
    """`pixels` in the format `target`: bit depth by scaling (x 257 up, rounded / 257 down); to one channel by the
    luma of the first three (ITU-R 601) or the single one; from one channel by repeating it; otherwise the first
    `target.channels` channels, padded by repeating the last."""
    source = format_of(pixels)
    values = pixels.astype(np.float64) * (target.max_value / source.max_value)
    channels = source.channels
    if target.channels == 1 and channels >= 3:
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114])[:, None]
    elif target.channels != channels:
        picked = [min(c, channels - 1) for c in range(target.channels)]
        values = values[..., picked]
    return np.clip(np.round(values), 0, target.max_value).astype(DTYPES[target.bits])


def resize_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of [H, W, C]: PIL's own for 8-bit grey, RGB and RGBA, channel by channel in floating point
    for the rest."""
    pixel_format = format_of(pixels)
    if pixel_format.bits == 8 and pixel_format.channels in (1, 3, 4):
        image = Image.fromarray(pixels[..., 0] if pixel_format.channels == 1 else pixels)
        out = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        return out[..., None] if out.ndim == 2 else out
    planes = [
        np.asarray(Image.fromarray(pixels[..., c].astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC))
        for c in range(pixel_format.channels)
    ]
    return np.clip(np.round(np.stack(planes, -1)), 0, pixel_format.max_value).astype(pixels.dtype)


def display_rgb(pixels: np.ndarray) -> np.ndarray:
    """8-bit RGB for looking at [H, W, C]: 16 bits scaled to 8, one channel (or any count but 3 and 4) shown as
    grey from the first, RGBA without its alpha."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.shape[2] in (3, 4):
        return np.ascontiguousarray(pixels[..., :3])
    return np.repeat(pixels[..., :1], 3, axis=2)


PIL_FORMATS = {(8, 1), (8, 3), (8, 4), (16, 1)}
"""(bits, channels) PIL writes and reads back as they are (with a suffix whose format holds them)."""
HOLDS_ALPHA = {".png", ".tif", ".tiff", ".webp"}
HOLDS_16_BITS = {".png", ".tif", ".tiff"}


def file_suffix(suffix: str, pixel_format: PixelFormat) -> str:
    """The suffix (lower case) an image of `pixel_format` is written under when asked for `suffix`: that one where
    its format holds the pixels (8-bit grey and RGB: any PIL writes; RGBA: PNG, TIFF, WebP; 16-bit grey: PNG,
    TIFF), else .png for 8-bit grey, RGB, RGBA and 16-bit grey, and .tif for the rest."""
    suffix = suffix.lower()
    key = (pixel_format.bits, pixel_format.channels)
    if key in ((8, 1), (8, 3)):
        return suffix if suffix in Image.registered_extensions() else ".png"
    if key in ((8, 4), (16, 1)):
        return suffix if suffix in (HOLDS_ALPHA if key == (8, 4) else HOLDS_16_BITS) else ".png"
    return suffix if suffix in (".tif", ".tiff") else ".tif"


def encode_file(pixels: np.ndarray, suffix: str, quality: int = 95) -> bytes:
    """The bytes of an image file of `pixels` [H, W, C] in the format of `suffix` (from `file_suffix`): PIL for
    what it holds, TIFF through tifffile for the rest (16-bit colour, N bands). JPEG at `quality`."""
    pixel_format = format_of(pixels)
    buffer = io.BytesIO()
    if (pixel_format.bits, pixel_format.channels) in PIL_FORMATS:
        fmt = Image.registered_extensions()[suffix]
        image = Image.fromarray(pixels[..., 0] if pixel_format.channels == 1 else pixels)
        image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        return buffer.getvalue()
    import tifffile  # only for TIFF files (0.2 s)

    photometric = "rgb" if pixel_format.channels == 3 else "minisblack"
    tifffile.imwrite(buffer, pixels, photometric=photometric, planarconfig="contig")
    return buffer.getvalue()
