"""Inference routes: ``POST /v1/models/{name}:classify`` (images in, top-k labels out) and ``:predict`` (TF-Serving
JSON on decoded pixels). Both read the body, decode and queue the images on the model's Batcher within the request
timeout.

This router has no router-level auth dependency, so that :classify can await ``authorize`` itself (see there): a new
route here declares ``dependencies=[Depends(authorize)]`` as :predict does.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serve.auth import authorize
from serve.engine import Overloaded
from serve.errors import ApiError
from serve.inputs import (
    INLINE_PIXELS,
    b64_images,
    decode_opened,
    open_images,
    parse_json,
    pixel_batch,
    pixel_count,
)
from serve.settings import Settings
from serve.state import Served, ServeState, state_of

router = APIRouter(tags=["inference"])

_TOP_K_MAX = 100_000
_CLASSIFY_OPENAPI = {
    "parameters": [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "description": "model name"},
        {"name": "top_k", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": _TOP_K_MAX},
         "description": "labels per image (default 5, at most the number of classes)"},
    ],
    "requestBody": {"content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "instances": {"type": "array", "items": {"type": "object", "properties": {"b64": {"type": "string"}}}}}}},
    }},
}

_PREDICT_BODY = {"requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "instances": {"type": "array", "description": "rows: [H][W][3] float pixels 0..255, or {input_name: ...}"},
    "inputs": {"description": "columns: [N][H][W][3], or {input_name: [N][H][W][3]}"},
    "signature_name": {"type": "string", "default": "serving_default"}}}}}}}


def _top_k(value: str | None) -> int | None:
    """The ``top_k`` query parameter: None when absent, else an integer 1.._TOP_K_MAX (422 otherwise)."""
    if value is None:
        return None
    if not value.strip().isdecimal() or not 1 <= int(value) <= _TOP_K_MAX:
        raise ApiError(422, "invalid_parameter", f"top_k={value!r} must be an integer from 1 to {_TOP_K_MAX}")
    return int(value)


async def _bounded(coro, stage: list[str], timeout_s: float):
    """``coro`` within the request timeout: 408 while the body is still being read, 503 after."""
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except asyncio.TimeoutError as exc:
        if stage[0] == "reading":
            raise ApiError(408, "timeout", "the request body did not arrive in time") from exc
        raise ApiError(503, "timeout", f"no answer within {timeout_s:g} s; retry later") from exc


async def _run(state: ServeState, entry: Served, expectation, images: np.ndarray) -> np.ndarray:
    """Probabilities of ``images`` from the model's batcher (503 when its queue is full), counted per model."""
    try:
        probabilities = await entry.batcher.infer(images, expectation)
    except Overloaded as exc:
        raise ApiError(503, "overloaded", str(exc)) from exc
    state.metrics.images.labels(entry.model.name).inc(len(images))
    return probabilities


async def _read_images(request: Request, settings: Settings) -> list[bytes]:
    """The image bytes of a classify body: raw image, multipart files or JSON base64 instances."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        body = await request.body()
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty; send an image")
        return [body]
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 16,
                                  max_part_size=settings.max_body_bytes)
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if len(files) > settings.max_images:
            raise ApiError(413, "too_many_images", f"at most {settings.max_images} images per request")
        if not files:
            raise ApiError(400, "no_images", "the multipart body holds no files")
        return [await f.read() for f in files]
    if content_type == "application/json":
        return b64_images(parse_json(await request.body()), settings.max_images)
    raise ApiError(415, "unsupported_media_type",
                   f"unsupported Content-Type {content_type!r}; send image/*, multipart/form-data or JSON")


# The hot path takes its parameters from the request itself, not through FastAPI's dependency injection and
# validation, and returns ready-made JSON: together they were about a third of the event loop's time per request.
# So it awaits the auth check itself instead of declaring Depends(authorize), and documents its parameters in
# openapi_extra.
@router.post("/v1/models/{name}:classify", openapi_extra=_CLASSIFY_OPENAPI)
async def classify(request: Request) -> JSONResponse:
    """Top-k labels and scores for one or many images (raw bytes, multipart files, or JSON base64)."""
    await authorize(request)
    state = state_of(request)
    settings = state.settings
    top_k = _top_k(request.query_params.get("top_k"))
    name = request.path_params["name"]
    entry = state.lookup(name)
    stage = ["reading"]

    async def work():
        with entry.batcher.expect() as expectation:
            blobs = await _read_images(request, settings)
            stage[0] = "decoding"
            opened = open_images(blobs, settings.max_pixels)
            size = entry.model.export.size
            if pixel_count(opened) <= INLINE_PIXELS:
                images = decode_opened(opened, size)
            else:  # large images decode off the event loop
                images = await asyncio.get_running_loop().run_in_executor(state.decode_pool, decode_opened, opened,
                                                                          size)
            stage[0] = "inference"
            return await _run(state, entry, expectation, images)

    probabilities = await _bounded(work(), stage, settings.request_timeout_s)
    classes = entry.model.export.classes
    k = min(top_k or settings.default_top_k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probabilities, order, axis=1).tolist()
    return JSONResponse({"model": name, "predictions": [
        [{"label": classes[j], "index": j, "score": score} for j, score in zip(top, row, strict=True)]
        for top, row in zip(order.tolist(), scores, strict=True)
    ]})


@router.post("/v1/models/{name}:predict", dependencies=[Depends(authorize)], openapi_extra=_PREDICT_BODY)
async def predict(name: str, request: Request):
    """TensorFlow-Serving-style predict on decoded pixels; rows answer "predictions", columns "outputs"."""
    state = state_of(request)
    settings = state.settings
    entry = state.lookup(name)
    stage = ["reading"]
    export = entry.model.export
    input_name = export.manifest.get("input", {}).get("name", "image")

    async def work():
        with entry.batcher.expect() as expectation:
            body = await request.body()
            stage[0] = "parsing"
            batch, columnar = pixel_batch(parse_json(body), input_name, export.input_shape, settings.max_images)
            stage[0] = "inference"
            return await _run(state, entry, expectation, batch), columnar

    probabilities, columnar = await _bounded(work(), stage, settings.request_timeout_s)
    return {"outputs" if columnar else "predictions": probabilities.tolist()}
