"""Decoding the parts of a sample read from a shard, which is data (untrusted): the image (in its split's pixel
format, see shards.pixels; 8-bit RGB from any PIL format by conversion; a pixel limit checked from the header
before anything is decoded), the label map and the colour histogram. Every way a part can be wrong ends in one
`BadSample` naming what is wrong, which callers count; nothing here is fatal and nothing is unpickled."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from shards.encoding import IMAGE_EXTENSIONS
from shards.pixels import RGB8, PixelFormat, format_of, read_pixels

DEFAULT_MAX_PIXELS = 1 << 26
"""Largest image (width x height) decoded by default: 67 megapixels, e.g. 8192 x 8192. PIL itself refuses more than
twice its own limit (179 megapixels) whatever this is set to."""
HIST_BINS = 24
"""Length of a colour histogram (hist.npy): 8 bins for each of R, G, B."""


class BadSample(ValueError):
    """A sample that cannot be used: `kind` is "missing" (a part is absent) or "corrupt" (a part does not decode)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def convert(image: Image.Image, mode: str) -> Image.Image:
    """`image` converted to `mode` ("RGB" or "L"; always a new, loaded image). For RGB, 16-bit grey ("I;16*") is
    scaled to 8 bits first (value >> 8), and so is 32-bit integer grey ("I", how some PIL versions and formats
    hold 16-bit grey; values clipped to 0..65535): PIL's own conversion clips both at 255, a white image. Label
    maps ("L") keep their values, which are class ids, not intensities."""
    if mode == "RGB" and (image.mode == "I" or image.mode.startswith("I;16")):
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    return image.convert(mode)


def _open_pixels(data: bytes, mode: str, max_pixels: int, part: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    limit = f"over the limit of {max_pixels} (max_image_pixels)"
                    raise BadSample("corrupt", f"{part} is {width}x{height} pixels, {limit}")
                return np.asarray(image if image.mode == mode else convert(image, mode))
    except BadSample:
        raise
    except UnidentifiedImageError:
        raise BadSample("corrupt", f"{part} is in no format PIL can identify") from None
    except Exception as err:  # a hostile file can make PIL raise anything: one bad sample
        raise BadSample("corrupt", f"{part} does not decode ({type(err).__name__}: {err!s:.100})") from None


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, part: str = "image") -> np.ndarray:
    """An encoded image as uint8 [H, W, 3] (grey, 16-bit grey, RGBA and palette images converted to RGB: see
    `convert`)."""
    pixels = _open_pixels(data, "RGB", max_pixels, part)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise BadSample("corrupt", f"{part} decodes to an array of shape {pixels.shape}")
    return pixels


def decode_image(
    data: bytes, expected: PixelFormat | None, max_pixels: int = DEFAULT_MAX_PIXELS, part: str = "image"
) -> np.ndarray:
    """An encoded image as [H, W, C] of the format `expected`: 8-bit RGB is decoded as `decode_rgb` converts
    (shards written before formats were recorded hold grey, RGBA and palette images too); any other format must be
    the image's own; None takes the image's own, whatever it is.

    Raises:
        BadSample: ("corrupt") the image does not decode, is over `max_pixels`, or is of another format.
    """
    if expected == RGB8:
        return decode_rgb(data, max_pixels, part)
    try:
        pixels = read_pixels(data, max_pixels, part)
    except ValueError as err:
        raise BadSample("corrupt", str(err)) from None
    if expected is not None and format_of(pixels) != expected:
        raise BadSample("corrupt", f"{part} is {format_of(pixels).describe()}; its split is {expected.describe()}")
    return pixels


def decode_label(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label map (label.png) as uint8 [H, W]."""
    return _open_pixels(data, "L", max_pixels, "label.png")


def decode_hist(data: bytes) -> np.ndarray:
    """A colour histogram (hist.npy, no pickles) as float32 [HIST_BINS] of finite values."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # a malformed .npy of any kind: one bad sample
        raise BadSample("corrupt", f"hist.npy does not load ({type(err).__name__}: {err!s:.100})") from None
    if array.shape != (HIST_BINS,) or array.dtype.kind not in "fiu":
        raise BadSample("corrupt", f"hist.npy is {array.dtype} of shape {array.shape}, expected ({HIST_BINS},) numbers")
    hist = array.astype(np.float32)
    if not np.isfinite(hist).all():
        raise BadSample("corrupt", "hist.npy holds non-finite values")
    return hist


def image_extension(sample: dict[str, Any]) -> str:
    """The key under which the sample carries its image.

    Raises:
        BadSample: ("missing") the sample has no image.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("missing", "no image")
    return ext


EXTRA_PARTS = {"hist": "hist.npy", "label": "label.png"}
"""The sample part holding each kind of per-sample extra."""


def decode_extra(sample: dict[str, Any], kind: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The sample's extra of `kind` (hist or label).

    Raises:
        BadSample: the part is missing ("missing") or does not decode ("corrupt").
    """
    part = EXTRA_PARTS[kind]
    if part not in sample:
        raise BadSample("missing", f"no {part}")
    return decode_hist(sample[part]) if kind == "hist" else decode_label(sample[part], max_pixels)
