"""The FastAPI app: `create_app(settings)` loads and warms up models in its lifespan and serves the /v1 API."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from export.contract import NAME_PATTERN
from serve.engine import Batcher, Overloaded, tune_switch_interval
from serve.inputs import (
    INLINE_PIXELS,
    ApiError,
    b64_images,
    decode_opened,
    open_images,
    parse_json,
    pixel_batch,
    pixel_count,
)
from serve.metrics import Metrics
from serve.model import OnnxModel, discover
from serve.settings import Settings

log = logging.getLogger("serve")


class BodyTooLarge(Exception):
    """The request body grew past ``max_body_bytes`` while it was read."""


@dataclass
class Served:
    """A loaded model and its batcher."""

    model: OnnxModel
    batcher: Batcher


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind, "status": status}, status_code=status, headers=headers)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Limits:
    """Pure ASGI middleware: body size limit (Content-Length checked up front, streamed bytes counted) and metrics."""

    def __init__(self, app, settings: Settings, metrics: Metrics, routes_of) -> None:
        self.app, self.settings, self.metrics, self.routes_of = app, settings, metrics, routes_of

    def _route(self, scope) -> str:
        for route in self.routes_of():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            limit = self.settings.max_body_bytes
            if length is not None and (not length.isdigit() or int(length) > limit):
                response = (_error(413, "body_too_large", f"request body exceeds {limit:,} bytes")
                            if length.isdigit() else _error(400, "invalid_request", "malformed Content-Length"))
                await response(scope, receive, send_and_record)
                return
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge
                return message

            await self.app(scope, limited_receive, send_and_record)
        finally:
            # The router leaves the matched route in the scope; only requests refused before routing are matched here.
            route = getattr(scope.get("route"), "path", None) or self._route(scope)
            method = scope.get("method", "")
            method = method if method in _METHODS else "OTHER"  # clients choose methods: keep label values bounded
            self.metrics.observe_request(route, method, status[0], time.perf_counter() - started)


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


def _top_k(value: str | None) -> int | None:
    """The ``top_k`` query parameter: None when absent, else an integer 1.._TOP_K_MAX (422 otherwise)."""
    if value is None:
        return None
    if not value.strip().isdecimal() or not 1 <= int(value) <= _TOP_K_MAX:
        raise ApiError(422, "invalid_parameter", f"top_k={value!r} must be an integer from 1 to {_TOP_K_MAX}")
    return int(value)


_PREDICT_BODY = {"requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "instances": {"type": "array", "description": "rows: [H][W][3] float pixels 0..255, or {input_name: ...}"},
    "inputs": {"description": "columns: [N][H][W][3], or {input_name: [N][H][W][3]}"},
    "signature_name": {"type": "string", "default": "serving_default"}}}}}}}


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings``; models are opened and warmed up when the app starts (its lifespan)."""
    metrics = Metrics()
    served: dict[str, Served] = {}
    state = {"ready": False}
    decode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        exports = discover(settings.export_dirs, settings.model_repo)
        threads, streams = settings.parallelism()
        for export in exports:
            model = await asyncio.to_thread(OnnxModel, export, threads)
            if settings.warmup:
                await asyncio.to_thread(model.warm_up, tuple(sorted({1, settings.max_batch})))
            batcher = Batcher(model, settings.max_batch, settings.batch_timeout_ms / 1000, metrics,
                              settings.max_queue_images, streams)
            await batcher.start()
            served[export.name] = Served(model, batcher)
            log.info("serving %s from %s (%d inference streams x %d threads)", export.name, export.path, streams,
                     threads)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for entry in served.values():
                await entry.batcher.stop()
            served.clear()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="transfer serve", version="1", lifespan=lifespan,
                  description="Image classification with ONNX Runtime over models exported by `transfer export`.")
    app.state.settings, app.state.metrics, app.state.served = settings, metrics, served
    app.add_middleware(_Limits, settings=settings, metrics=metrics, routes_of=lambda: app.routes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.rejected.labels(exc.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        metrics.rejected.labels("body_too_large").inc()
        return _error(413, "body_too_large", f"request body exceeds {settings.max_body_bytes:,} bytes")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, "invalid_parameter", details)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal", "internal server error")

    async def authorize(request: Request) -> None:  # async: FastAPI would run a plain def in a thread pool
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <api key>)")

    def lookup(name: str) -> Served:
        if not NAME_PATTERN.match(name):
            raise ApiError(400, "invalid_model_name", "model names are letters, digits, '.', '_' and '-' only")
        if name not in served:
            raise ApiError(404, "unknown_model", f"no model named {name!r}; GET /v1/models lists them")
        return served[name]

    async def bounded(coro, stage: list[str]):
        try:
            return await asyncio.wait_for(coro, settings.request_timeout_s)
        except asyncio.TimeoutError as exc:
            if stage[0] == "reading":
                raise ApiError(408, "timeout", "the request body did not arrive in time") from exc
            raise ApiError(503, "timeout", f"no answer within {settings.request_timeout_s:g} s; retry later") from exc

    async def run(entry: Served, expectation, images: np.ndarray) -> np.ndarray:
        try:
            probabilities = await entry.batcher.infer(images, expectation)
        except Overloaded as exc:
            raise ApiError(503, "overloaded", str(exc)) from exc
        metrics.images.labels(entry.model.name).inc(len(images))
        return probabilities

    async def read_images(request: Request) -> list[bytes]:
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
    @app.post("/v1/models/{name}:classify", tags=["inference"], openapi_extra=_CLASSIFY_OPENAPI)
    async def classify(request: Request) -> JSONResponse:
        """Top-k labels and scores for one or many images (raw bytes, multipart files, or JSON base64)."""
        await authorize(request)
        top_k = _top_k(request.query_params.get("top_k"))
        name = request.path_params["name"]
        entry = lookup(name)
        stage = ["reading"]

        async def work():
            with entry.batcher.expect() as expectation:
                blobs = await read_images(request)
                stage[0] = "decoding"
                opened = open_images(blobs, settings.max_pixels)
                size = entry.model.export.size
                if pixel_count(opened) <= INLINE_PIXELS:
                    images = decode_opened(opened, size)
                else:  # large images decode off the event loop
                    images = await asyncio.get_running_loop().run_in_executor(decode_pool, decode_opened, opened, size)
                stage[0] = "inference"
                return await run(entry, expectation, images)

        probabilities = await bounded(work(), stage)
        classes = entry.model.export.classes
        k = min(top_k or settings.default_top_k, len(classes))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(probabilities, order, axis=1).tolist()
        return JSONResponse({"model": name, "predictions": [
            [{"label": classes[j], "index": j, "score": score} for j, score in zip(top, row, strict=True)]
            for top, row in zip(order.tolist(), scores, strict=True)
        ]})

    @app.post("/v1/models/{name}:predict", tags=["inference"], dependencies=[Depends(authorize)],
              openapi_extra=_PREDICT_BODY)
    async def predict(name: str, request: Request):
        """TensorFlow-Serving-style predict on decoded pixels; rows answer "predictions", columns "outputs"."""
        entry = lookup(name)
        stage = ["reading"]
        export = entry.model.export
        input_name = export.manifest.get("input", {}).get("name", "image")

        async def work():
            with entry.batcher.expect() as expectation:
                body = await request.body()
                stage[0] = "parsing"
                batch, columnar = pixel_batch(parse_json(body), input_name, export.input_shape, settings.max_images)
                stage[0] = "inference"
                return await run(entry, expectation, batch), columnar

        probabilities, columnar = await bounded(work(), stage)
        return {"outputs" if columnar else "predictions": probabilities.tolist()}

    @app.get("/v1/models", tags=["models"], dependencies=[Depends(authorize)])
    async def list_models():
        """Every served model with its classes and input shape."""
        return {"models": [{"name": n, "state": "AVAILABLE", "classes": len(e.model.export.classes),
                            "input_shape": list(e.model.export.input_shape)} for n, e in served.items()]}

    @app.get("/v1/models/{name}", tags=["models"], dependencies=[Depends(authorize)])
    async def model_status(name: str):
        """TensorFlow-Serving-style model status."""
        lookup(name)
        return {"name": name, "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/v1/models/{name}/metadata", tags=["models"], dependencies=[Depends(authorize)])
    async def model_metadata(name: str):
        """Classes, input shape and dtype, preprocessing, model sha256, source run and export time."""
        return lookup(name).model.metadata()

    @app.get("/healthz", tags=["operations"])
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        """Readiness: every model is loaded and warmed up."""
        if not state["ready"]:
            return _error(503, "not_ready", "models are not loaded yet (or the server is stopping)")
        return {"status": "ready", "models": sorted(served)}

    @app.get("/metrics", tags=["operations"])
    async def prometheus_metrics():
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` worker processes (settings from the environment)."""
    tune_switch_interval()
    return create_app(Settings.from_env())
