"""Operations routes for probes and scraping, open without the API key: ``/healthz`` (liveness), ``/readyz``
(every model loaded and warmed up) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.errors import error_response
from serve.state import state_of

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Readiness: every model is loaded and warmed up."""
    state = state_of(request)
    if not state.ready:
        return error_response(503, "not_ready", "models are not loaded yet (or the server is stopping)")
    return {"status": "ready", "models": sorted(state.served)}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    """Prometheus text exposition."""
    metrics = state_of(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)
