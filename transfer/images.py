"""Image decoding shared by training folders, `transfer predict` and the server: Pillow and NumPy, no TensorFlow."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# What Pillow raises for files that are not images, truncated or otherwise unreadable.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageTooLarge(ValueError):
    """The image header announces more pixels than allowed (a decompression bomb or a huge photo)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: transparency composited on white, 16/32-bit and float greyscale scaled to 8 bits."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: Path | str | BinaryIO, *, max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None) -> Image.Image:
    """An image opened lazily: only its header is read, so the caller can see its size before paying to decode it.

    With ``max_pixels``, an image whose header announces more pixels raises ImageTooLarge; ``formats`` limits which
    Pillow plugins may open the data (untrusted input should not reach every plugin Pillow has). Raises the
    decoder's exception (one of DECODE_ERRORS) for data that is no image.
    """
    image = Image.open(source, formats=formats)
    if max_pixels is not None and image.width * image.height > max_pixels:
        image.close()
        raise ImageTooLarge(f"image is {image.width}x{image.height} pixels; at most {max_pixels:,} are accepted")
    return image


def image_to_array(image: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """An opened image (closed here) as uint8 RGB: EXIF-rotated, first frame, bilinear resize to ``size``.

    ``size`` is a square side or ``(height, width)``. Raises one of DECODE_ERRORS for truncated or corrupt data.
    """
    height, width = (size, size) if isinstance(size, int) else size
    try:
        image.draft("RGB", (width, height))  # JPEG only: decode at a reduced scale that is still >= size
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        rgb = image if image.mode == "RGB" else to_rgb(image)  # convert("RGB") of an RGB image is a copy
        return np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    finally:
        image.close()  # frees the decoded pixels at once (`with image:` only closes the file in Pillow 13)


def decode_image(source: Path | str | BinaryIO, size: int | tuple[int, int], *, max_pixels: int | None = None,
                 formats: tuple[str, ...] | None = None) -> np.ndarray:
    """One image (a path or a binary file object) as a uint8 RGB array: ``open_image`` then ``image_to_array``."""
    return image_to_array(open_image(source, max_pixels=max_pixels, formats=formats), size)
