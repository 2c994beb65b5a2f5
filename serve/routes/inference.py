"""Inference routes: ``POST /v1/models/{name}[/versions/{version}]:classify`` (images in, top-k labels out),
``:predict`` (TF-Serving JSON on decoded pixels) and ``POST /v2/models/{name}[/versions/{version}]/infer`` (the
Open Inference Protocol, serve/oip.py: pixels like :predict, or encoded images decoded through :classify's path).
Each reads the body, decodes and queues the images on the model's Batcher within the request timeout. Images are
checked on their headers first, then decoded one at a time into a batch the request holds against the server's buffer
budget: small ones on the event loop, larger ones on the decode threads and the largest in the bulk process
(serve/bulk.py), within the decode budget (serve/limits.py); a request that times out or whose client has gone stops
decoding. Large JSON bodies are parsed in the bulk process too. Each holds its model version (``Served.hold``)
while it runs, so a reload of the model repository that replaces or removes it lets the request finish on it
(serve/repo.py).

This router has no router-level auth dependency, so that :classify can await ``authorize`` itself (see there): a new
route here declares ``dependencies=[Depends(authorize)]`` as :predict does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Mapping

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serve.auth import authorize
from serve.engine import Overloaded
from serve.errors import ApiError, whole_number
from serve.inputs import INLINE_PIXELS, Header, HeaderCheck, decode_array, decode_opened
from serve.jsonparse import b64_payload, parse_body, predict_payload
from serve.limits import HELD_KEY, BudgetSpent
from serve.multipart import read_files
from serve.oip import HEADER_LENGTH, attach_binary, encode_response, parse_header, split_body
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


_timeout = getattr(asyncio, "timeout", None)


def _top_k(value: str | None) -> int | None:
    """The ``top_k`` query parameter: None when absent, else an integer 1.._TOP_K_MAX (422 otherwise)."""
    if value is None:
        return None
    k = whole_number(value)
    if k is None or not 1 <= k <= _TOP_K_MAX:
        raise ApiError(422, "invalid_parameter", f"top_k={value[:40]!r} must be an integer from 1 to {_TOP_K_MAX}")
    return k


async def _bounded(coro, stage: list[str], timeout_s: float):
    """``coro`` within the request timeout: 408 while the body is still being read, 503 after. (asyncio.timeout where
    there is one, 3.11+: wait_for runs the coroutine as one more task per request.)"""
    try:
        if _timeout is None:
            return await asyncio.wait_for(coro, timeout_s)
        async with _timeout(timeout_s):
            return await coro
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
    entry.batcher.images_counter.inc(len(images))  # serve_images_total{model}
    return probabilities


def _hold(request: Request, n: int) -> None:
    """Count ``n`` more bytes against the server's buffer budget for this request (503 when it is spent)."""
    held = request.scope.get(HELD_KEY)
    if held is not None:
        try:
            held.take(n)
        except BudgetSpent as exc:
            raise ApiError(503, "overloaded", str(exc)) from exc


async def _read_body(request: Request, limit: int, what: str, flag: str) -> bytes:
    """The body, refused with 413 (on Content-Length when given) past ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, "body_too_large", f"{what} exceeds {limit:,} bytes ({flag})")
    digits = length.strip()
    if digits.isdigit() and (len(digits) > 18 or int(digits) > limit):  # (checked before int(): 5,000 digits)
        raise too_large
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request: Request, state: ServeState, check: HeaderCheck) -> list[bytes]:
    """The image bytes of a classify body (raw image, multipart files or JSON base64 instances), each checked on its
    header by ``check`` (multipart files as soon as each arrives: a refusal reads no more of the body)."""
    settings = state.settings
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        body = await request.body()
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty; send an image")
        blobs = [body]
    elif content_type == "multipart/form-data":
        return await read_files(request, check.add)
    elif content_type == "application/json":
        body = await _read_body(request, settings.max_json_bytes, "a JSON body", "--max-json-mb")
        blobs = await parse_body(state.bulk, b64_payload, body, settings.max_images)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"unsupported Content-Type {content_type!r}; send image/*, multipart/form-data or JSON")
    for i, data in enumerate(blobs):
        check.add(i, data)
    return blobs


async def _decode(request: Request, state: ServeState, blobs: list[bytes], headers: list[Header],
                  size: tuple[int, int]) -> np.ndarray:
    """The images as one float32 batch, decoded one at a time (small ones on the event loop, large ones on the decode
    pool within the decode budget); stops when the client has gone."""
    settings, budget = state.settings, state.decode_budget
    _hold(request, len(blobs) * size[0] * size[1] * 3 * 4)
    batch = np.empty((len(blobs), *size, 3), np.float32)
    for i, (data, header) in enumerate(zip(blobs, headers, strict=True)):
        if header.image is not None:  # small: kept open by the header check, decoded here on the event loop
            batch[i] = decode_opened(header.image, i, size)
            continue
        if await request.is_disconnected():
            raise ApiError(499, "client_closed_request", "the client closed the connection")
        batch[i] = await budget.run(header.cost, decode_array, data, i, size, settings.max_pixels)
    return batch


def _header_check(state: ServeState, entry: Served) -> HeaderCheck:
    """The limits on the images of one request to ``entry``'s model (serve.inputs.HeaderCheck)."""
    settings = state.settings
    return HeaderCheck(entry.model.export.size, settings.max_pixels, settings.max_request_pixels, settings.max_images,
                       state.decode_budget.total)


async def _classify_images(request: Request, state: ServeState, entry: Served, blobs: list[bytes],
                           check: HeaderCheck, stage: list[str]) -> np.ndarray:
    """Probabilities of encoded images that passed ``check``: decoded (``_decode``) and run on the model's batcher.
    The one decode path of :classify and of the v2 protocol's BYTES input."""
    stage[0] = "decoding"
    headers = check.headers
    # The batch being formed waits (up to --batch-timeout-ms) for requests decoding on the event loop, whose images
    # are moments away; not for large images, nor for bodies still arriving (a slow client would make every batch
    # wait).
    small = all(h.pixels <= INLINE_PIXELS for h in headers)
    with entry.batcher.expect() if small else contextlib.nullcontext() as expectation:
        images = await _decode(request, state, blobs, headers, entry.model.export.size)
        stage[0] = "inference"
        return await _run(state, entry, expectation, images)


# The hot path takes its parameters from the request itself, not through FastAPI's dependency injection and
# validation, and returns ready-made JSON: together they were about a third of the event loop's time per request.
# So it awaits the auth check itself instead of declaring Depends(authorize), and documents its parameters in
# openapi_extra.
@router.post("/v1/models/{name}:classify", openapi_extra=_CLASSIFY_OPENAPI)
@router.post("/v1/models/{name}/versions/{version}:classify", openapi_extra=_CLASSIFY_OPENAPI)
async def classify(request: Request) -> JSONResponse:
    """Top-k labels and scores for one or many images (raw bytes, multipart files, or JSON base64)."""
    await authorize(request)
    state = state_of(request)
    settings = state.settings
    top_k = _top_k(request.query_params.get("top_k")) if request.scope.get("query_string") else None
    name = request.path_params["name"]
    entry = state.lookup_version(name, request.path_params.get("version"))
    stage = ["reading"]

    async def work():
        check = _header_check(state, entry)
        blobs = await _read_images(request, state, check)
        return await _classify_images(request, state, entry, blobs, check, stage)

    with entry.hold():  # a reload that replaces or removes the model lets this request finish on it
        probabilities = await _bounded(work(), stage, settings.request_timeout_s)
    classes = entry.model.export.classes
    k = min(top_k or settings.default_top_k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probabilities, order, axis=1).tolist()
    if all(math.isfinite(score) for row in scores for score in row):
        return Response(_classify_json(name, classes, order.tolist(), scores), media_type="application/json")
    return JSONResponse({"model": name, "predictions": [  # refuses NaN and infinities (a 500), as it always did
        [{"label": classes[j], "index": j, "score": score} for j, score in zip(top, row, strict=True)]
        for top, row in zip(order.tolist(), scores, strict=True)
    ]})


_ENTRY_PREFIXES: dict[tuple[str, ...], list[str]] = {}


def _classify_json(name: str, classes: tuple[str, ...], order: list[list[int]], scores: list[list[float]]) -> bytes:
    """:classify's answer, byte for byte what JSONResponse renders (compact separators, UTF-8, floats as ``repr``),
    from per-class prefixes ``{"label":...,"index":j,"score":`` made once per label set: json.dumps of the nested
    dicts was a tenth of the event loop's time per request on small models."""
    prefixes = _ENTRY_PREFIXES.get(classes)
    if prefixes is None:
        if len(_ENTRY_PREFIXES) > 64:  # label sets of models loaded and unloaded by hot reloads
            _ENTRY_PREFIXES.clear()
        prefixes = _ENTRY_PREFIXES[classes] = [
            '{"label":' + json.dumps(label, ensure_ascii=False) + f',"index":{j},"score":'
            for j, label in enumerate(classes)]
    rows = ",".join("[" + ",".join(prefixes[j] + repr(score) + "}" for j, score in zip(top, row, strict=True)) + "]"
                    for top, row in zip(order, scores, strict=True))
    return ('{"model":' + json.dumps(name, ensure_ascii=False) + ',"predictions":[' + rows + "]}").encode()


def classify_lane(handlers: Mapping[type, Callable]) -> Callable:
    """:classify as a plain ASGI handler, for the fast lane of serve.middleware.Limits: the endpoint above called on a
    Request of the scope (the middleware has matched the route and put its path parameters in the scope), with the
    app's exception ``handlers`` answering its refusals as FastAPI's exception middleware would (the handler of the
    closest class in the exception's MRO); anything else propagates to the server-error middleware (a 500)."""
    caught = tuple(cls for cls in handlers if cls is not Exception)

    async def lane(scope, receive, send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await classify(request)
        except caught as exc:
            handler = next(handlers[cls] for cls in type(exc).__mro__ if cls in handlers)
            response = await handler(request, exc)
        await response(scope, receive, send)

    return lane


@router.post("/v1/models/{name}:predict", dependencies=[Depends(authorize)], openapi_extra=_PREDICT_BODY)
@router.post("/v1/models/{name}/versions/{version}:predict", dependencies=[Depends(authorize)],
             openapi_extra=_PREDICT_BODY)
async def predict(name: str, request: Request):
    """TensorFlow-Serving-style predict on decoded pixels; rows answer "predictions", columns "outputs"."""
    state = state_of(request)
    settings = state.settings
    entry = state.lookup_version(name, request.path_params.get("version"))
    stage = ["reading"]
    export = entry.model.export
    input_name = entry.model.api_input

    async def work():
        body = await _read_body(request, settings.max_json_bytes, "a JSON body", "--max-json-mb")
        stage[0] = "parsing"
        batch, columnar = await parse_body(state.bulk, predict_payload, body, input_name, export.input_shape,
                                           settings.max_images)
        _hold(request, batch.nbytes)
        stage[0] = "inference"
        return await _run(state, entry, None, batch), columnar

    with entry.hold():
        probabilities, columnar = await _bounded(work(), stage, settings.request_timeout_s)
    return {"outputs" if columnar else "predictions": probabilities.tolist()}


_INFER_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "description": 'one tensor: {"name": "image", "datatype": "FP32", "shape": '
                   '[N, H, W, 3], "data": [...]} or {"name": "image_bytes", "datatype": "BYTES", "shape": [N], '
                   '"data": ["<base64 image>", ...]}'},
        "outputs": {"type": "array", "description": '[{"name": "probabilities", "parameters": {"classification": k, '
                    '"binary_data": false}}]'},
        "parameters": {"type": "object"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": f"binary tensor data extension: JSON header ({HEADER_LENGTH} "
                                 "bytes), then the tensors' bytes"},
}}}


@router.post("/v2/models/{name}/infer", dependencies=[Depends(authorize)], openapi_extra=_INFER_BODY)
@router.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Depends(authorize)],
             openapi_extra=_INFER_BODY)
async def infer_v2(name: str, request: Request):
    """Open Inference Protocol (KServe v2 / Triton) inference: FP32 pixels or BYTES encoded images in, FP32
    probabilities or top-k classification strings out, as JSON or binary tensor data (serve/oip.py)."""
    state = state_of(request)
    settings = state.settings
    entry = state.lookup_version(name, request.path_params.get("version"))
    model = entry.model
    stage = ["reading"]
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported; send the body "
                       "uncompressed")

    async def work():
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is None:
            body = await _read_body(request, settings.max_json_bytes, "a JSON body", "--max-json-mb")
        else:
            body = await _read_body(request, settings.max_body_bytes, "the request body", "--max-body-mb")
        header, data = split_body(body, header_length, settings.max_json_bytes)
        stage[0] = "parsing"
        parsed = await parse_body(state.bulk, parse_header, header, model.api_input, model.export.input_shape,
                                  settings.max_images)
        attach_binary(parsed, data)
        if parsed.pixels is not None:
            _hold(request, parsed.pixels.nbytes)
            stage[0] = "inference"
            return parsed, await _run(state, entry, None, parsed.pixels)
        check = _header_check(state, entry)
        for i, blob in enumerate(parsed.blobs):
            check.add(i, blob)
        return parsed, await _classify_images(request, state, entry, parsed.blobs, check, stage)

    with entry.hold():
        parsed, probabilities = await _bounded(work(), stage, settings.request_timeout_s)
    content, header_size = encode_response(parsed, name, probabilities, model.export.classes, entry.version)
    if header_size is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_size)})
