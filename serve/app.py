"""The FastAPI app factory: ``create_app(settings)`` builds one app around a ServeState (serve/state.py, on
``app.state.serve``): a lifespan that opens and warms up the models, the limits/metrics middleware
(serve/middleware.py), the exception handlers that give every error one JSON shape (serve/errors.py), and the routes
of the routers in ROUTERS (the documentation routes too: FastAPI's own are off, so that they can require the API
key). ``app_from_env`` is the factory of ``--workers N`` processes.

No endpoint is defined here: each is a function in one router module of serve/routes/; the auth check is
serve/auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve.engine import tune_switch_interval
from serve.errors import ApiError, BodyTooLarge, error_response
from serve.inputs import harden_pillow
from serve.limits import BudgetSpent, memory_bound
from serve.middleware import Limits
from serve.oip import VERSION
from serve.protocol import RETRY_AFTER_S
from serve.repo import RepoWatcher, discover, open_model, start_batcher
from serve.routes import docs, inference, models, operations
from serve.settings import MB, Settings
from serve.state import Served, ServeState, state_of

log = logging.getLogger("serve")

ROUTERS = (inference.router, models.router, operations.router, docs.router)  # matched in this order



@asynccontextmanager
async def lifespan(app: FastAPI):
    """Open, warm up and start a batcher for every export; watch the model repository; ready until shutdown, then
    stop them."""
    state: ServeState = app.state.serve
    settings = state.settings
    exports = discover(settings.export_dirs, settings.model_repo)
    threads, streams = settings.parallelism()
    for found, export in exports:
        model = await asyncio.to_thread(open_model, export, settings)
        state.put(found.name, Served(model, await start_batcher(model, settings, state.metrics), found.version,
                                     export.manifest_sha256))  # the manifest the labels and model were read with
        log.info("serving %s%s from %s (%d inference streams x %d threads)", found.name,
                 "" if found.version == VERSION else f" version {found.version}", export.path, streams, threads)
    state.base_rss = resident_bytes()
    if state.base_rss:
        bound = memory_bound(settings, state.base_rss)
        log.info("worst-case memory of this process and its bulk process: %.0f MB (%s; docs/serve.md, Limits)",
                 bound["total"] / MB, ", ".join(f"{k} {v / MB:.0f}" for k, v in bound.items() if k != "total"))
    watcher = watch = None
    if settings.model_repo and settings.repo_poll_s > 0:
        static = {found.name for found, _ in exports[:len(settings.export_dirs)]}
        known = {(found.name, found.version): found.fingerprint for found, _ in exports[len(settings.export_dirs):]}
        watcher = RepoWatcher(state, Path(settings.model_repo), known, static)
        watch = asyncio.create_task(watcher.run(), name="model-repo-watcher")
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await watcher.close()
        for versions in state.versions.values():
            for entry in versions.values():
                await entry.batcher.stop()
        state.served.clear()
        state.versions.clear()
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
        state.bulk.stop()


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    state_of(request).metrics.rejected.labels(exc.kind).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _budget_spent(request: Request, exc: BudgetSpent) -> JSONResponse:
    state_of(request).metrics.rejected.labels("overloaded").inc()
    return error_response(503, "overloaded", str(exc), {"Retry-After": str(RETRY_AFTER_S)})


async def _bulk_died(request: Request, exc: BrokenProcessPool) -> JSONResponse:
    state_of(request).metrics.rejected.labels("overloaded").inc()
    return error_response(503, "overloaded", "the bulk process stopped (out of memory?); retry",
                          {"Retry-After": str(RETRY_AFTER_S)})


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """The client closed the connection while its body was read: nobody will read this answer (nginx's 499)."""
    state_of(request).metrics.rejected.labels("client_closed_request").inc()
    return error_response(499, "client_closed_request", "the client closed the connection")


async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    state = state_of(request)
    state.metrics.rejected.labels("body_too_large").inc()
    return error_response(413, "body_too_large", f"request body exceeds {state.settings.max_body_bytes:,} bytes")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
    return error_response(422, "invalid_parameter", details)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return error_response(500, "internal", "internal server error")


EXCEPTION_HANDLERS = {ApiError: _api_error, BodyTooLarge: _too_large, BudgetSpent: _budget_spent,
                      ClientDisconnect: _client_gone, BrokenProcessPool: _bulk_died,
                      StarletteHTTPException: _http_error, RequestValidationError: _validation_error,
                      Exception: _internal}


def fast_lanes(app: FastAPI) -> list[tuple]:
    """(route, ASGI handler) of the routes serve.middleware.Limits answers itself, past FastAPI's routing, dependency
    injection and exception middleware: :classify's two routes, which lead the route table (ROUTERS), so that the
    route the middleware matches is the one the router would have chosen."""
    lane = inference.classify_lane(EXCEPTION_HANDLERS)
    lanes = []
    for route in app.router.routes:
        if getattr(route, "endpoint", None) is not inference.classify:
            break
        lanes.append((route, lane))
    return lanes


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings``; models are opened and warmed up when the app starts (its lifespan)."""
    harden_pillow()
    app = FastAPI(title="transfer serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,  # serve.routes.docs serves them, behind the API key when there is one
                  description="Image classification with ONNX Runtime over models exported by `transfer export`.")
    state = app.state.serve = ServeState(settings)
    app.add_middleware(Limits, state=state, routes_of=lambda: app.routes, lanes_of=lambda: fast_lanes(app))
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    for router in ROUTERS:
        # Each router's routes join the app's own route table rather than app.include_router(router): recent FastAPI
        # keeps an included router as one nested route and matches every request through it twice (+9 us per
        # :classify request, +12 us per /healthz, measured in process). The routes are complete as declared (tags,
        # auth dependency, OpenAPI extras); only app.dependency_overrides does not reach them.
        app.router.routes.extend(router.routes)
    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` worker processes (settings from the environment)."""
    from serve.limits import tune_malloc

    tune_switch_interval()
    tune_malloc()
    app = create_app(Settings.from_env())
    app.state.serve.bulk.start()
    return app
