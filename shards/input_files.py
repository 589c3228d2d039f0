"""Reading the image files a user points at (shards.write's folders, translate's and evaluate's inputs), which are
data: only regular files (or symlinks to them) are opened, never blocking on a FIFO, socket or device, and every
way a file can be unusable is an `Unreadable` with one line saying why."""

from __future__ import annotations

import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shards.bounded_read import file_kind
from shards.decode import convert
from shards.pixels import TIFF_MAGIC, pil_pixels, tiff_pixels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
"""What PIL raises for corrupt or truncated image data."""


class Unreadable(Exception):
    """An input that cannot be packed; the message says why."""


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be an image, judged without opening it (a FIFO or device could block the open or the
    read); None for a non-empty regular file or a symlink to one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "a dangling symlink, not a regular file" if path.is_symlink() else "does not exist"
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{file_kind(info.st_mode)}, not a regular file"
    if info.st_size == 0:
        return "zero bytes"
    return None


def open_nonblocking(path: str, flags: int) -> int:
    """An opener for open(): a file swapped for a FIFO after the check reads as empty instead of blocking."""
    return os.open(path, flags | os.O_NONBLOCK)


def read_image(path: Path, label: bool = False) -> np.ndarray:
    """Decode every pixel of the image at `path`: [H, W, C] as it is (shards.pixels; TIFF through tifffile, so a
    multi-page or multi-band file is one image of many channels), or a label map's class ids (8-bit grey [H, W]).

    Raises:
        Unreadable: not a non-empty regular file, not an image, a decompression bomb (over PIL's
            `Image.MAX_IMAGE_PIXELS`), floating-point pixels, or corrupt/truncated data.
    """
    problem = file_problem(path)
    if problem:
        raise Unreadable(problem)
    try:
        handle = open(path, "rb", opener=open_nonblocking)  # noqa: SIM115 (closed by the with below)
    except OSError as err:
        raise Unreadable(f"cannot open: {err.strerror}") from None
    with handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if handle.read(4) in TIFF_MAGIC and not label:
                handle.seek(0)
                return tiff_pixels(handle.read(), Image.MAX_IMAGE_PIXELS, "the TIFF")
            handle.seek(0)
            with Image.open(handle) as image:
                return np.asarray(convert(image, "L")) if label else pil_pixels(image)  # loads all pixels
        except UnidentifiedImageError:
            raise Unreadable("not an image PIL can identify") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Unreadable(f"decompression bomb: {err}") from None
        except DECODE_ERRORS as err:  # ValueError: from shards.pixels too
            raise Unreadable(f"corrupt or truncated image: {err}") from None
