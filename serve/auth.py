"""The one authentication check of the /v1 and /v2 APIs: ``Authorization: Bearer <api key>`` when the server has a
key.

Routes that FastAPI runs declare it as a dependency (``Depends(authorize)``); the hot ``:classify`` route, which
bypasses FastAPI's dependency injection, awaits it directly. /healthz, /readyz, /v2/health/* and /metrics stay open
for probes.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from serve.errors import ApiError
from serve.state import state_of


async def authorize(request: Request) -> None:  # async: FastAPI would run a plain def in a thread pool
    """Raise a 401 ApiError unless the request carries the server's bearer token (no-op without --api-key)."""
    api_key = state_of(request).settings.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <api key>)")
