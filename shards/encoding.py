"""Sample parts: the image extensions a sample may carry; byte encodings of PNG images and label maps, numpy
arrays and colour histograms."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shards.pixels import NPY_PART

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", NPY_PART)
"""Extensions under which a sample carries its image, in the order they are looked for."""


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of an [H, W, 3] (or [H, W] grey) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def colour_histogram(image: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per-channel histograms of an [H, W, 3] uint8 image, each normalized to sum 1: float32 [3 * bins]."""
    hists = [np.histogram(image[..., c], bins=bins, range=(0, 256))[0] for c in range(3)]
    return (np.concatenate(hists) / (image.shape[0] * image.shape[1])).astype(np.float32)
