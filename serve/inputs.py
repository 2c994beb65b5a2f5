"""Image bytes to model inputs with bounded memory, every failure an ApiError (JSON payloads: serve/jsonparse.py).

A request's images are checked on their headers before anything is decoded (each against ``--max-pixels``, all
together against ``--max-request-pixels``, each one's decoding cost against ``--decode-memory-mb``), then decoded one
at a time into a preallocated batch; each image's pixels are freed as soon as it is resized. ``decode_cost`` is what
one decode may hold at its peak, by the mode of the image (measured; tests/serve hold it to the real peak).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from serve.errors import ApiError
from serve.settings import MB
from transfer.images import DECODE_ERRORS, ImageTooLarge, image_to_array, open_image

# Pillow plugins the server lets untrusted bytes reach (no PostScript/EPS, which would run Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


@functools.cache
def image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build can open."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


# Images up to this many pixels (as their headers announce) decode on the event loop: faster than handing them to a
# thread, and short enough (well under a millisecond) not to hold other requests up.
INLINE_PIXELS = 256 * 256

# Peak bytes per pixel of one decode (transfer.images.image_to_array: load, EXIF transpose, to RGB, resize; the image's
# own pixels included) by the mode of the image as it will be decoded, measured with Pillow 13 on large single-colour
# images (tests/serve: test_decode_cost_bounds_the_real_peak). Pillow keeps RGB in 4 bytes per pixel, and both the
# EXIF step and the conversion to RGB copy the image; modes with alpha composite on white through three more copies;
# 16- and 32-bit modes go through float64 NumPy arrays.
BYTES_PER_PIXEL = {"1": 7, "L": 7, "P": 7, "RGB": 13, "YCbCr": 13, "CMYK": 13, "LAB": 13, "HSV": 13,
                   "RGBA": 25, "RGBa": 25, "LA": 25, "La": 25, "PA": 25, "I": 33, "F": 33}
BYTES_PER_PIXEL_16BIT = 31  # I;16, I;16B, I;16L, I;16N
BYTES_PER_PIXEL_P_ALPHA = 19  # palette images with a transparent colour
BYTES_PER_PIXEL_UNKNOWN = 48
WEBP_EXTRA = 8  # WebP decodes through one more full-size buffer
PNG_TEXT_MEMORY = 2 * MB  # text chunks Pillow may decompress from one PNG (its default, 64 MB, set in harden_pillow)
DECODE_OVERHEAD = PNG_TEXT_MEMORY + 2 * MB  # text chunks, the resized array, the decoder's own buffers
INLINE_COST = INLINE_PIXELS * BYTES_PER_PIXEL_UNKNOWN + DECODE_OVERHEAD  # a small image decoded on the event loop


@contextlib.contextmanager
def _decode_errors(index: int):
    """Pillow's exceptions for image ``index`` as ApiErrors (413 for oversized images, 400 otherwise)."""
    try:
        yield
    except ImageTooLarge as exc:
        raise ApiError(413, "image_too_large", f"image {index}: {exc}") from exc
    except DECODE_ERRORS as exc:
        if "decompression bomb" in str(exc).lower():
            raise ApiError(413, "image_too_large", f"image {index}: {exc}") from exc
        if "cannot identify image file" in str(exc):  # Pillow's message would show a BytesIO repr
            raise ApiError(400, "invalid_image", f"image {index} is not an image in a supported format "
                           f"({', '.join(image_formats())})") from exc
        raise ApiError(400, "invalid_image",
                       f"image {index} could not be decoded (not a supported image, or truncated): {exc}") from exc


def harden_pillow() -> None:
    """Process-wide Pillow limits of a server: text chunks of one PNG decompress to at most PNG_TEXT_MEMORY."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY


@dataclass(frozen=True)
class Header:
    """What an image's header announces, and what decoding it will cost; a small image stays open (``image``), so
    that decoding it on the event loop does not read its header a second time."""

    width: int
    height: int
    mode: str
    cost: int  # bytes its decode may hold at its peak
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_cost(image: Image.Image) -> int:
    """Peak bytes that decoding ``image`` (opened, not loaded, after ``draft``) may hold."""
    mode = image.mode
    per_pixel = BYTES_PER_PIXEL.get(mode) or (BYTES_PER_PIXEL_16BIT if mode.startswith("I;16") else
                                              BYTES_PER_PIXEL_UNKNOWN)
    if mode == "P" and "transparency" in image.info:
        per_pixel = BYTES_PER_PIXEL_P_ALPHA
    if image.format == "WEBP":
        per_pixel += WEBP_EXTRA
    return image.width * image.height * per_pixel + DECODE_OVERHEAD


def _open(data: bytes, index: int, max_pixels: int) -> Image.Image:
    if not data:
        raise ApiError(400, "empty_image", f"image {index} is empty")
    return open_image(io.BytesIO(data), max_pixels=max_pixels, formats=image_formats())


def read_header(data: bytes, index: int, size: tuple[int, int], max_pixels: int, keep_small: bool = False) -> Header:
    """Image ``index``'s header, checked against ``max_pixels``; nothing is decoded. With ``keep_small``, an image of
    at most INLINE_PIXELS stays open in the Header (decode it with ``decode_opened``)."""
    with _decode_errors(index):
        image = _open(data, index, max_pixels)
        keep = False
        try:
            width, height = image.size
            image.draft("RGB", (size[1], size[0]))  # JPEG: the reduced scale decoding will use, as image_to_array
            keep = keep_small and width * height <= INLINE_PIXELS
            return Header(width, height, image.mode, decode_cost(image), image if keep else None)
        finally:
            if not keep:
                image.close()


class HeaderCheck:
    """The limits a request's images are held to on their headers, one image at a time (``add``), so that a body
    read as it arrives can be refused at the first image that breaks one: 413 when an image is too large, the images
    are too many, their pixels add up to more than ``max_request_pixels``, or one would need more than ``max_cost``
    bytes (the whole decode budget) to decode."""

    def __init__(self, size: tuple[int, int], max_pixels: int, max_request_pixels: int, max_images: int,
                 max_cost: int) -> None:
        self.size, self.max_pixels, self.max_request_pixels = size, max_pixels, max_request_pixels
        self.max_images, self.max_cost = max_images, max_cost
        self.headers: list[Header] = []
        self.pixels = 0

    def add(self, index: int, data: bytes) -> Header:
        if index >= self.max_images:
            raise ApiError(413, "too_many_images", f"at most {self.max_images} images per request")
        header = read_header(data, index, self.size, self.max_pixels, keep_small=True)
        self.pixels += header.pixels
        if self.pixels > self.max_request_pixels:
            raise ApiError(413, "too_many_pixels", f"the images of this request announce more than "
                           f"{self.max_request_pixels:,} pixels together (image {index} brings them to "
                           f"{self.pixels:,}); send fewer or smaller images")
        if header.cost > self.max_cost:
            raise ApiError(413, "image_too_large", f"image {index} ({header.width}x{header.height}, {header.mode}) "
                           f"needs {header.cost / MB:,.0f} MB to decode; this server decodes at most "
                           f"{self.max_cost / MB:,.0f} MB at once (--decode-memory-mb)")
        self.headers.append(header)
        return header


def decode_opened(image: Image.Image, index: int, size: tuple[int, int]) -> np.ndarray:
    """An opened image (closed here) decoded exactly like the training pipeline: uint8 (H, W, 3). Its decoded pixels
    are freed before this returns: ``image_to_array`` leaves them on the image object (its ``with image:`` releases
    nothing in Pillow 13), ``close`` does."""
    with _decode_errors(index):
        try:
            return image_to_array(image, size)
        finally:
            image.close()


def decode_array(data: bytes, index: int, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Image ``index`` opened and decoded (``decode_opened``). A module-level function: large images run it in the
    bulk process."""
    with _decode_errors(index):
        image = _open(data, index, max_pixels)
    return decode_opened(image, index, size)


def decode_all(blobs: Sequence[bytes], size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Image bytes as one float32 (N, H, W, 3) batch, decoded one at a time (benchmarks; the server decodes through
    its decode budget)."""
    batch = np.empty((len(blobs), *size, 3), np.float32)
    for i, data in enumerate(blobs):
        batch[i] = decode_array(data, i, size, max_pixels)
    return batch
