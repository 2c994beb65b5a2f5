"""Pure ASGI middleware around the whole app: how many requests may be in progress, the request body size limit,
the buffer budget that bodies count against as they arrive, and the per-request metrics; and the fast lanes: routes
(``:classify``) whose requests it hands straight to an ASGI handler instead of through FastAPI's routing, dependency
injection and exception middleware (serve.routes.inference.classify_lane), which cost more per request than the
route's own work on small models."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match

from serve.clients import client_of
from serve.errors import BodyTooLarge, error_response, whole_number
from serve.limits import HELD_KEY, Held, client_request_limit
from serve.protocol import RETRY_AFTER_S

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scraping are never refused for load: a busy server is alive, and says so.
UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


def _expects_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    return (length is not None and length.strip() not in (b"", b"0")) or b"chunked" in headers.get(
        b"transfer-encoding", b"").lower()


class Limits:
    """Requests in progress (503 with Retry-After beyond ``max_concurrent_requests``, 429 with Retry-After beyond
    ``client_request_limit`` for one client address, serve.clients; a request stops being in progress when its
    answer starts, not when the client has read it: serve.protocol's write deadline bounds that wait), body size
    (Content-Length checked up front, streamed bytes counted), the buffer budget (received body
    bytes held until the request ends) and request metrics by route. An error answered before the body was read in
    full closes the connection, so the rest of the body is never read."""

    def __init__(self, app, state, routes_of: Callable[[], Sequence[BaseRoute]],
                 lanes_of: Callable[[], Sequence[tuple[BaseRoute, Callable]]] | None = None) -> None:
        self.app, self.state, self.routes_of, self.lanes_of = app, state, routes_of, lanes_of
        self.settings, self.metrics = state.settings, state.metrics
        self.per_client = client_request_limit(self.settings)
        self._lanes: Sequence[tuple[BaseRoute, Callable]] | None = None

    def _lane(self, scope) -> Callable | None:
        """The fast-lane handler of the route this request matches, with the route and its path parameters put in the
        scope as the router would; None for every other request. Only routes that come first in the route table have
        lanes (serve.app), so a route matched here is the one the router would have chosen."""
        if self._lanes is None:
            self._lanes = tuple(self.lanes_of()) if self.lanes_of is not None else ()
        for route, handler in self._lanes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                scope["route"] = route
                return handler
        return None

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
        headers = dict(scope["headers"])
        body_done = [not _expects_body(headers)]
        slot = [False]  # whether this request holds one of the in-progress slots
        state = self.state
        client = client_of(scope)
        by_client = state.in_flight_by_client

        def give_back_slot() -> None:
            slot[0] = False
            state.in_flight -= 1
            left = by_client[client] - 1
            if left:
                by_client[client] = left
            else:
                del by_client[client]  # the table holds only clients with requests in progress

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                # Its answer is ready: the request no longer holds a slot while the answer waits for the client (a
                # client that pipelines requests and never reads the answers holds nothing but its connection).
                if slot[0]:
                    give_back_slot()
                status[0] = message["status"]
                if not body_done[0] and message["status"] >= 400:  # unread body: close rather than read it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        counted = scope["path"] not in UNCOUNTED_PATHS
        held = scope[HELD_KEY] = Held(state.buffers)
        try:
            if counted and state.in_flight >= self.settings.max_concurrent_requests:
                self.metrics.rejected.labels("overloaded").inc()
                response = error_response(503, "overloaded", f"{state.in_flight} requests are in progress; retry later",
                                          {"Retry-After": str(RETRY_AFTER_S)})
                await response(scope, receive, send_and_record)
                return
            if counted and by_client.get(client, 0) >= self.per_client:  # room, but not for this client
                self.metrics.rejected.labels("too_many_requests").inc()
                response = error_response(429, "too_many_requests",
                                          f"this client address already has {by_client[client]} requests in "
                                          "progress (--max-requests-per-client); retry later",
                                          {"Retry-After": str(RETRY_AFTER_S)})
                await response(scope, receive, send_and_record)
                return
            length = headers.get(b"content-length")
            limit = self.settings.max_body_bytes
            size = whole_number(length) if length is not None else None
            if length is not None and (size is None or size > limit):
                response = (error_response(413, "body_too_large", f"request body exceeds {limit:,} bytes")
                            if length.strip().isdigit() else error_response(400, "invalid_request",
                                                                            "malformed Content-Length"))
                await response(scope, receive, send_and_record)
                return
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    chunk = len(message.get("body", b""))
                    seen += chunk
                    if seen > limit:
                        raise BodyTooLarge
                    held.take(chunk)  # BudgetSpent: 503 (serve.app)
                    if not message.get("more_body", False):
                        body_done[0] = True
                return message

            if counted:
                state.in_flight += 1
                by_client[client] = by_client.get(client, 0) + 1
                slot[0] = True
            try:
                lane = self._lane(scope) if self._lanes != () else None
                await (lane or self.app)(scope, limited_receive, send_and_record)
            finally:
                if slot[0]:
                    give_back_slot()
        finally:
            held.give_back_all()
            # The router leaves the matched route in the scope; only requests refused before routing are matched here.
            route = getattr(scope.get("route"), "path", None) or self._route(scope)
            method = scope.get("method", "")
            method = method if method in _METHODS else "OTHER"  # clients choose methods: keep label values bounded
            self.metrics.observe_request(route, method, status[0], time.perf_counter() - started)
