"""Pure ASGI middleware around the whole app: the request body size limit and the per-request metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match

from serve.errors import BodyTooLarge, error_response
from serve.metrics import Metrics
from serve.settings import Settings

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Limits:
    """Body size limit (Content-Length checked up front, streamed bytes counted) and request metrics by route."""

    def __init__(self, app, settings: Settings, metrics: Metrics, routes_of: Callable[[], Sequence[BaseRoute]]) -> None:
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
                response = (error_response(413, "body_too_large", f"request body exceeds {limit:,} bytes")
                            if length.isdigit() else error_response(400, "invalid_request", "malformed Content-Length"))
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
