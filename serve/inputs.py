"""Request payloads to model inputs: image bytes, base64 JSON and TF-Serving pixel arrays, every failure an ApiError."""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from serve.errors import ApiError
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


def open_images(blobs: Sequence[bytes], max_pixels: int) -> list[Image.Image]:
    """Every image opened with its header checked (format, pixel count); nothing is decoded yet."""
    opened: list[Image.Image] = []
    try:
        for i, data in enumerate(blobs):
            if not data:
                raise ApiError(400, "empty_image", f"image {i} is empty")
            with _decode_errors(i):
                opened.append(open_image(io.BytesIO(data), max_pixels=max_pixels, formats=image_formats()))
    except BaseException:
        for image in opened:
            image.close()
        raise
    return opened


def pixel_count(images: Sequence[Image.Image]) -> int:
    """Pixels the opened images' headers announce."""
    return sum(image.width * image.height for image in images)


def decode_opened(images: Sequence[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Opened images decoded exactly like the training pipeline, as one float32 (N, H, W, 3) batch; closes them."""
    arrays = []
    try:
        for i, image in enumerate(images):
            with _decode_errors(i):
                arrays.append(image_to_array(image, size))
    finally:
        for image in images[len(arrays):]:
            image.close()
    return np.stack(arrays).astype(np.float32)


def decode_all(blobs: Sequence[bytes], size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Image bytes as one float32 (N, H, W, 3) batch (open, check, decode)."""
    return decode_opened(open_images(blobs, max_pixels), size)


def parse_json(body: bytes) -> object:
    """JSON from a request body; malformed, non-UTF-8 or absurdly nested documents are a 400."""
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send JSON")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(exc)[:200]}") from exc


def b64_images(payload: object, max_images: int) -> list[bytes]:
    """Image bytes from ``{"instances": [{"b64": ...} | {"image": {"b64": ...}} | "<b64>", ...]}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise ApiError(400, "invalid_request", 'expected {"instances": [{"b64": "<base64 image>"}, ...]}')
    instances = payload["instances"]
    _check_count(len(instances), max_images)
    blobs = []
    for i, inst in enumerate(instances):
        if isinstance(inst, dict) and isinstance(inst.get("image"), dict):
            inst = inst["image"]
        text = inst.get("b64") if isinstance(inst, dict) else inst
        if not isinstance(text, str):
            raise ApiError(400, "invalid_request", f'instance {i} must be {{"b64": "<base64 image>"}}')
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "invalid_base64", f"instance {i} is not valid base64: {exc}") from exc
    return blobs


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ApiError(400, "no_images", "the request holds no images")
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request; at most {max_images} are accepted")


def _pixels(value: object, what: str) -> np.ndarray:
    """Nested lists of numbers as a float32 array; strings, booleans, ragged lists, NaN/Inf are refused."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ApiError(400, "invalid_pixels", f"{what} is not a rectangular array of numbers") from exc
    if array.dtype.kind not in "iuf":
        raise ApiError(400, "invalid_dtype", f"{what} must hold numbers (float32 pixels 0..255), got {array.dtype}")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ApiError(400, "non_finite", f"{what} holds NaN or infinite values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ApiError(400, "out_of_range", f"{what} has values outside the model's input range 0..255")
    return array


def pixel_batch(payload: object, input_name: str, shape: tuple[int, int, int], max_images: int
                ) -> tuple[np.ndarray, bool]:
    """A float32 (N, H, W, 3) batch from a TF-Serving predict body, and whether it was columnar (``inputs``)."""
    if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
        raise ApiError(400, "invalid_request", 'expected exactly one of "instances" (rows) or "inputs" (columns)')
    signature = payload.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise ApiError(400, "invalid_request", f"unknown signature_name {signature!r}; the model has serving_default")
    columnar = "inputs" in payload
    data = payload["inputs"] if columnar else payload["instances"]
    if isinstance(data, dict):
        if set(data) != {input_name}:
            raise ApiError(400, "invalid_request", f"named inputs must be exactly {{{input_name!r}: ...}}")
        data = data[input_name]
    if not columnar:
        if not isinstance(data, list):
            raise ApiError(400, "invalid_request", '"instances" must be a list')
        data = [inst[input_name] if isinstance(inst, dict) and set(inst) == {input_name} else inst for inst in data]
        if any(isinstance(inst, dict) for inst in data):
            raise ApiError(400, "invalid_request", f"named instances must be exactly {{{input_name!r}: [[...]]}}")
    if not isinstance(data, list):
        raise ApiError(400, "invalid_shape", f"expected a batch of images shaped [N, {', '.join(map(str, shape))}]")
    _check_count(len(data), max_images)
    batch = _pixels(data, '"inputs"' if columnar else '"instances"')
    if batch.shape[1:] != shape:
        raise ApiError(400, "invalid_shape", f"pixel arrays must be shaped [N, {', '.join(map(str, shape))}] "
                       f"(the model's input size), got {list(batch.shape)}")
    return batch, columnar
