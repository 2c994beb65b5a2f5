"""Connection hygiene under uvicorn: uvicorn's HTTP protocols with a request-head deadline, a cap on request-head
size and on open connections, and the project's JSON error shape for what uvicorn answers in plain text.

uvicorn has a keep-alive timeout (``timeout_keep_alive``: idle between requests) but no deadline for a request's
head: a connection that sends half a request line, or one header byte every few seconds, stays open for ever, and
enough of them exhaust the open-file limit. Here every request head must be complete ``header_timeout_s`` after the
connection opened or the previous response was sent (408, closed); a head larger than ``max_header_bytes`` is a 431
(httptools; uvicorn's h11 limit answers 400); a connection beyond ``max_connections`` is answered 503 with
Retry-After and closed; a request that is not HTTP is a 400 — all in the ``{"error", "type", "status"}`` shape.

The limits come from the Settings of the app being served (its ServeState), so ``--workers N`` processes, which
build their app from the environment, get the same ones. serve/cli.py passes ``protocol_class()`` to uvicorn.
"""

from __future__ import annotations

import http
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.limits import connection_limit

RETRY_AFTER_S = 1


def raw_response(status: int, kind: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the JSON error body, for writing to a transport."""
    body = json.dumps({"error": message, "type": kind, "status": status}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _serve_state(app):
    """The ServeState of ``app`` (through uvicorn's wrappers), or None for an app that is not ours."""
    for _ in range(8):
        state = getattr(getattr(app, "state", None), "serve", None)
        if state is not None:
            return state
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; ``send_400_response`` then writes the chosen reply."""


class _Guard:
    """What both protocols add; mixed in before uvicorn's protocol class."""

    header_timeout_s = 10.0
    max_header_bytes = 32 * 1024
    max_connections = 1000

    def _guard_init(self) -> None:
        state = _serve_state(self.app)
        self._metrics = state.metrics if state is not None else None
        if state is not None:
            settings = state.settings
            self.header_timeout_s, self.max_header_bytes = settings.header_timeout_s, settings.max_header_bytes
            self.max_connections = connection_limit(settings)
        self._head_timer = None
        self._head_bytes = 0
        self._reply: tuple[int, str, str, tuple] | None = None

    # -- connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._answer_and_close(503, "too_many_connections",
                                   f"the server has {self.max_connections} connections open; retry later",
                                   (("retry-after", str(RETRY_AFTER_S)),))
            return
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    # -- the request-head deadline

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's head is late while a response is being written: no room for a reply.
            self._count("header_timeout")
            self.transport.close()
            return
        self._answer_and_close(408, "header_timeout",
                               f"the request head did not arrive within {self.header_timeout_s:g} s")

    # -- replies written by the protocol itself

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected.labels(reason).inc()

    def _answer_and_close(self, status: int, kind: str, message: str, headers: tuple = ()) -> None:
        self._disarm_head_timer()
        self._count(kind)
        if not self.transport.is_closing():
            self.transport.write(raw_response(status, kind, message, headers))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in the JSON shape (or the reply a callback chose)."""
        status, kind, message, headers = self._reply or (
            400, "malformed_http", "the request is not valid HTTP/1.1 (request line or headers malformed)", ())
        self._answer_and_close(status, kind, message, headers)


try:  # httptools is in the serve extra; uvicorn falls back to h11 without it, and so do we
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:
    HttpToolsProtocol = None

if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with the guards of this module (module level: --workers N pickles it)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._guard_init()

        def _count_head(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > self.max_header_bytes:
                self._reply = (431, "headers_too_large",
                               f"the request line and headers exceed {self.max_header_bytes:,} bytes", ())
                raise _Refused

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

else:
    GuardedHttpToolsProtocol = None


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with the guards of this module (head size: uvicorn's h11_max_incomplete_event_size)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard_init()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a new request begins (or is still arriving)
            self._arm_head_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._disarm_head_timer()


def protocol_class(kind: str = "auto"):
    """The guarded protocol for uvicorn's ``http=``: httptools when installed (``auto``), else h11."""
    if kind == "h11" or (kind == "auto" and GuardedHttpToolsProtocol is None):
        return GuardedH11Protocol
    if GuardedHttpToolsProtocol is None:
        raise ImportError("httptools is not installed")
    return GuardedHttpToolsProtocol
