"""Operations routes for probes and scraping, open without the API key: ``/healthz`` (liveness), ``/readyz``
(every model loaded and warmed up), their Open Inference Protocol twins ``/v2/health/live`` and ``/v2/health/ready``,
and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.errors import error_response
from serve.state import NOT_READY, state_of

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Readiness: every model is loaded and warmed up; per model its versions, manifest sha256 and, where a newer
    export in the model repository failed to load, ``reload_error`` (the previous one still serves)."""
    state = state_of(request)
    if not state.ready:
        return error_response(503, "not_ready", NOT_READY)
    return {"status": "ready", "models": sorted(state.served), "detail": state.detail()}


@router.get("/v2/health/live")
async def live_v2():
    """Open Inference Protocol liveness: the process answers."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready_v2(request: Request):
    """Open Inference Protocol readiness: every model is loaded and warmed up (503 otherwise)."""
    if not state_of(request).ready:
        return error_response(503, "not_ready", NOT_READY)
    return {"ready": True}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    """Prometheus text exposition."""
    metrics = state_of(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)
