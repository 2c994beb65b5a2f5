"""JSON request bodies: ``{"instances": [{"b64": ...}]}`` image payloads and TF-Serving pixel arrays, every failure an
ApiError. Bodies up to ``INLINE_JSON_BYTES`` (a few milliseconds at worst) are parsed on the event loop; larger ones,
up to ``--max-json-mb``, in the bulk process (serve/bulk.py: ``json.loads`` holds the GIL for the whole document), after
a count of their arrays and objects that refuses, before parsing, what would cost far more memory than pixel data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import numpy as np

from serve.errors import ApiError

# Bodies up to this size are parsed on the event loop: at worst (a document of empty lists) ~2 ms.
INLINE_JSON_BYTES = 32 * 1024


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


def _check_arrays(body: bytes, most: int, what: str, per_number: float | None = None) -> None:
    """Refuse, before parsing, a body with more arrays and objects than ``what`` can hold (or, with ``per_number``,
    more of them per comma than pixel data has: one ``[r, g, b]`` per three numbers). They are what makes parsing
    costly: ``[[],[],...]`` costs 36 bytes of memory per byte of text and seconds per 8 MB, and counting them costs a
    few milliseconds. What passes costs at most about JSON_EXPANSION bytes per byte (serve.limits)."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > most:
        raise ApiError(400, "invalid_request", f"the body holds {containers:,} arrays and objects; {what} need at most "
                       f"{most:,}")
    if per_number is not None and containers > per_number * body.count(b",") + 64:
        raise ApiError(400, "invalid_request", f"the body holds {containers:,} arrays and objects for "
                       f"{body.count(b','):,} commas: not pixel arrays")


def b64_payload(body: bytes, max_images: int) -> list[bytes]:
    """The image bytes of a JSON ``:classify`` body."""
    _check_arrays(body, 3 * max_images + 16, f'{max_images} {{"b64": ...}} instances')
    return b64_images(parse_json(body), max_images)


def predict_payload(body: bytes, input_name: str, shape: tuple[int, int, int], max_images: int
                    ) -> tuple[np.ndarray, bool]:
    """The float32 batch of a ``:predict`` body and whether it was columnar."""
    height, width, _ = shape
    _check_arrays(body, max_images * (2 + height + height * width) + 16,
                  f"{max_images} images of [{height}, {width}, 3]", per_number=0.5)
    return pixel_batch(parse_json(body), input_name, shape, max_images)


async def parse_body(bulk, fn, body: bytes, *args):
    """``fn(body, *args)``: on the event loop for bodies up to INLINE_JSON_BYTES, else in the bulk process."""
    if len(body) <= INLINE_JSON_BYTES:
        return fn(body, *args)
    return await asyncio.wrap_future(bulk.submit(fn, body, *args))
