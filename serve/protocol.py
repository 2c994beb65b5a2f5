"""Connection hygiene under uvicorn: uvicorn's HTTP protocols with a request-head deadline, a cap on request-head
size, on open connections and on pipelined requests, a deadline for answers to drain, and the project's JSON error
shape for what uvicorn answers in plain text.

uvicorn has a keep-alive timeout (``timeout_keep_alive``: idle between requests) but no deadline for a request's
head: a connection that sends half a request line, or one header byte every few seconds, stays open for ever, and
enough of them exhaust the open-file limit. Here every request head must be complete ``header_timeout_s`` after the
connection opened or the previous response was sent (408, closed); a head larger than ``max_header_bytes`` is a 431
(httptools; uvicorn's h11 limit answers 400); a request that is not HTTP is a 400 — all in the
``{"error", "type", "status"}`` shape.

Connections by client (serve.clients): a connection beyond ``max_connections`` makes room by closing an idle
connection of the client address that holds the most (at least as many as the newcomer's): one that has not yet sent
a complete request head is answered 503 ``too_many_connections`` with Retry-After, one idle between requests is just
closed, as the keep-alive timeout would; a connection whose answers do not drain counts as idle. Only when no client
has such a connection is the newcomer itself answered 503 and closed. So 1,000 idle sockets from one address cost
their owner its own sockets, not other clients their service, and a lone reverse proxy is refused only when every
one of its connections is busy. Each request's scope gets its client's key (``serve.clients.CLIENT_KEY``), from the
socket's peer address, for the per-client cap on requests in progress (serve.middleware).

Pipelining: uvicorn's httptools protocol parses every request of what it read at once and queues them all (60,000
``GET /healthz`` in one send were 60,000 queued requests, 1 GB), and nothing closes a connection whose answers the
client never reads. Here the httptools protocol feeds its parser in slices small enough that at most
``max_pipelined`` requests (with at most ``max_header_bytes`` of heads) wait behind the one being answered, keeps
the rest of what it read and stops reading until answers have been sent (uvicorn's h11 protocol already parses one
request at a time); and a connection whose written answers have not drained ``write_timeout_s`` after its transport
asked to stop writing is dropped, its unsent answers with it.

The limits come from the Settings of the app being served (its ServeState), so ``--workers N`` processes, which
build their app from the environment, get the same ones. serve/cli.py passes ``protocol_class()`` to uvicorn.
"""

from __future__ import annotations

import http
import json

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.clients import CLIENT_KEY, ClientConnections, client_key
from serve.limits import connection_limit

RETRY_AFTER_S = 1
# The fewest bytes a complete request takes ("PUT / HTTP/1.1\n\n"): a slice of k times this completes at most k
# requests (and one begun before it), which is how the parser is fed no more requests than there is room for.
MIN_REQUEST_BYTES = 16


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


def _clients_of(server_state) -> ClientConnections:
    """The connections by client of one uvicorn server (kept on its ServerState, shared by its protocols)."""
    clients = getattr(server_state, "serve_clients", None)
    if clients is None:
        clients = server_state.serve_clients = ClientConnections()
    return clients


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; ``send_400_response`` then writes the chosen reply."""


class _Guard:
    """What both protocols add; mixed in before uvicorn's protocol class."""

    header_timeout_s = 10.0
    max_header_bytes = 32 * 1024
    max_connections = 1000
    max_pipelined = 16
    write_timeout_s = 10.0

    def _guard_init(self) -> None:
        state = _serve_state(self.app)
        self._metrics = state.metrics if state is not None else None
        if state is not None:
            settings = state.settings
            self.header_timeout_s, self.max_header_bytes = settings.header_timeout_s, settings.max_header_bytes
            self.max_connections = connection_limit(settings)
            self.max_pipelined, self.write_timeout_s = settings.max_pipelined, settings.write_timeout_s
        self._head_timer = None
        self._write_timer = None
        self._head_bytes = 0
        self._reply: tuple[int, str, str, tuple] | None = None
        self._clients = _clients_of(self.server_state)
        self._client = None  # the client key of the peer (set when connected)
        self._awaiting_head = False  # a request head has begun and is not complete
        self._heads_done = False  # a complete request head has arrived on this connection

    # -- connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._client = client_key(self.client[0] if self.client else None)
        self._clients.add(self, self._client)
        if len(self.connections) > self.max_connections:
            victim = self._clients.victim(self, self._client, _Guard._evictable)
            if victim is None:
                self._answer_and_close(503, "too_many_connections",
                                       f"the server has {self.max_connections} connections open; retry later",
                                       (("retry-after", str(RETRY_AFTER_S)),))
                return
            victim._evict()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._clients.discard(self, self._client)
        self._disarm_head_timer()
        self._disarm_write_timer()
        self._abandon_answer()
        super().connection_lost(exc)

    def _abandon_answer(self) -> None:
        """Tell the request being answered that its client is gone (uvicorn tells only the last request parsed,
        which is not the one being answered on a pipelining connection: that one then wrote to a closed transport)."""
        cycle = getattr(self, "_active_cycle", None) or self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()

    # -- making room at max_connections

    def _evictable(self) -> bool:
        """Whether this connection may be closed to make room: open, and answering no request (idle between
        requests, or its next head not complete), or its answers are not draining."""
        if self.transport is None or self.transport.is_closing():
            return False
        if self._write_timer is not None:
            return True
        answering = (self.cycle is not None and not self.cycle.response_complete) or bool(getattr(self, "pipeline",
                                                                                                 ()))
        return not answering

    def _evict(self) -> None:
        """Close this connection for a newcomer (see the module docstring)."""
        self._count("connection_evicted")
        if self._write_timer is not None:  # answers that do not drain: dropped with them, as at the write deadline
            self._disarm_write_timer()
            self._abandon_answer()
            self.transport.abort()
        elif self._awaiting_head or not self._heads_done:  # a request may be on its way: tell it why
            self._answer_and_close(503, "too_many_connections",
                                   f"the server has {self.max_connections} connections open and this client address "
                                   "holds the most; retry later", (("retry-after", str(RETRY_AFTER_S)),),
                                   counted=False)
        else:
            self._disarm_head_timer()
            self.transport.close()

    # -- the write deadline: answers the client does not read

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of unsent answers: they must drain in time."""
        super().pause_writing()
        if self._write_timer is None and not self.transport.is_closing():
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._disarm_write_timer()
        super().resume_writing()

    def _disarm_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self._count("write_timeout")
        self._abandon_answer()  # now, not when the loop reports the loss: nothing more is written
        self.transport.abort()  # close() would wait for the unsent answers to drain first: for ever

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

    def _answer_and_close(self, status: int, kind: str, message: str, headers: tuple = (),
                          counted: bool = True) -> None:
        self._disarm_head_timer()
        if counted:
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

class _HeldFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while the protocol ``holds`` input (it has read
    more than it has room to parse): uvicorn resumes reading whenever a request reads its body or an answer is sent."""

    def __init__(self, transport, holds) -> None:
        super().__init__(transport)
        self._holds = holds

    def resume_reading(self) -> None:
        if not self._holds():
            super().resume_reading()


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with the guards of this module (module level: --workers N pickles it)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._guard_init()
            self._unread = b""  # read but not parsed: no room for the requests it may hold
            self._active_cycle = None
            self._body_left = 0  # Content-Length bytes of the request being parsed still to come
            self._queued_head_bytes = 0  # heads of the requests waiting in uvicorn's pipeline

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.flow = _HeldFlow(transport, self._holds)

        def connection_lost(self, exc) -> None:
            self._unread = b""
            super().connection_lost(exc)

        # -- the pipelining cap

        def _room(self) -> int:
            """How many more requests may be parsed now: queued ones count against ``max_pipelined`` and their heads
            against ``max_header_bytes``."""
            if self._queued_head_bytes >= self.max_header_bytes:
                return 0
            return self.max_pipelined - len(self.pipeline)

        def _holds(self) -> bool:
            return bool(self._unread) or self._room() <= 0

        def data_received(self, data: bytes) -> None:
            if self._unread:  # in order behind what is held (reading is paused: not expected)
                data, self._unread = self._unread + data, b""
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            """Parse ``data`` in slices that complete at most as many requests as there is room for; keep the rest
            (and stop reading) when there is none."""
            view, start = memoryview(data), 0
            while start < len(view):
                if self.parser is None or self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # closed or refused (a 400 was sent), or upgraded
                room = self._room()
                if room <= 0:
                    self._unread = bytes(view[start:])
                    self.flow.pause_reading()
                    return
                end = start + self._body_left + room * MIN_REQUEST_BYTES
                super().data_received(view[start:end])
                start = end

        def _feed_held(self) -> None:
            if self.parser is None or self.transport.is_closing():
                return
            data, self._unread = self._unread, b""
            if data:
                self._feed(data)
            self.flow.resume_reading()  # a no-op while something is still held

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts the next queued request, if any: room for one more
            if not self.transport.is_closing() and not self._holds():
                self.flow.resume_reading()
            elif self._unread and self._room() > 0:
                self.loop.call_soon(self._feed_held)  # not inside the sending request's task

        def _start_asgi_task(self, cycle, app) -> None:
            self._queued_head_bytes -= getattr(cycle, "serve_queued_head_bytes", 0)
            self._active_cycle = cycle  # the request being answered (self.cycle is the last one parsed)
            super()._start_asgi_task(cycle, app)

        # -- parser callbacks

        def _count_head(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > self.max_header_bytes:
                self._reply = (431, "headers_too_large",
                               f"the request line and headers exceed {self.max_header_bytes:,} bytes", ())
                raise _Refused

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[CLIENT_KEY] = self._client
            self._awaiting_head = True
            self._head_bytes = 0
            self._body_left = 0
            self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            self._awaiting_head, self._heads_done = False, True
            super().on_headers_complete()
            lengths = [value for name, value in self.headers if name in (b"content-length", b"transfer-encoding")]
            if len(lengths) == 1 and lengths[0].isdigit() and len(lengths[0]) <= 18:  # a Content-Length alone
                self._body_left = int(lengths[0])
            if self.pipeline and self.pipeline[0][0] is self.cycle:  # queued behind a request being answered
                self.cycle.serve_queued_head_bytes = self._head_bytes
                self._queued_head_bytes += self._head_bytes

        def on_body(self, body: bytes) -> None:
            self._body_left = max(0, self._body_left - len(body))
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_left = 0
            super().on_message_complete()

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
            self._awaiting_head = bool(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()  # starts at most one request (h11 parses one at a time): its scope is self.scope
        if self.scope is not None:
            self.scope.setdefault(CLIENT_KEY, self._client)  # before its task first runs
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._disarm_head_timer()
            self._awaiting_head, self._heads_done = False, True


def protocol_class(kind: str = "auto"):
    """The guarded protocol for uvicorn's ``http=``: httptools when installed (``auto``), else h11."""
    if kind == "h11" or (kind == "auto" and GuardedHttpToolsProtocol is None):
        return GuardedH11Protocol
    if GuardedHttpToolsProtocol is None:
        raise ImportError("httptools is not installed")
    return GuardedHttpToolsProtocol
