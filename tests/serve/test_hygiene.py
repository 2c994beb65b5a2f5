"""serve/ connection hygiene and leaks: a real uvicorn server on loopback (in a thread of this process) closes
half-sent and slowly trickled request heads, idle keep-alive connections and oversized heads, caps connections,
answers malformed HTTP in the JSON error shape; the API documentation needs the API key when there is one; no answer
holds a path of the server; `transfer serve` fails with one line before loading anything when it cannot listen or an
export is corrupt.

Everything here is checked by statuses, bodies and whether a connection is closed; nothing by time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from serve_fixtures import CLASSES, relabel_copy

from serve.app import create_app
from serve.cli import bind_socket, main, uvicorn_options
from serve.settings import Settings

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

PROTOCOLS = ["httptools", "h11"]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), (220, 30, 30), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def live_server(export_dir: Path, http: str = "auto", **overrides):
    """A real uvicorn server with the production options (serve.cli.uvicorn_options) on 127.0.0.1; yields its port."""
    with live_uvicorn(export_dir, http, **overrides) as (port, _):
        yield port


@contextlib.contextmanager
def live_uvicorn(export_dir: Path, http: str = "auto", **overrides):
    """``live_server`` that yields (port, the uvicorn.Server): its connections can be looked at."""
    settings = Settings(export_dirs=(str(export_dir),), **overrides)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings, "warning", http)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection to the server from ``source`` (any 127.x.y.z: another client address on loopback)."""
    return socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _json_answer(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


# ---------------------------------------------------------------------------------------------- connections


@pytest.mark.parametrize("http", PROTOCOLS)
def test_half_sent_silent_and_trickled_heads_are_closed_with_a_408(export_dir, http):
    with live_server(export_dir, http, header_timeout_s=0.5, keep_alive_s=30) as port:
        half = _connect(port)
        half.sendall(b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
        silent = _connect(port)  # connects and sends nothing at all
        trickle = _connect(port)
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        trickled_until_closed = 0
        with contextlib.suppress(OSError):
            for _ in range(200):  # one header byte every 20 ms: never idle, never complete
                trickle.sendall(b"X")
                trickled_until_closed += 1
                time.sleep(0.02)
        for conn in (half, silent):
            status, headers, body = _json_answer(_read_all(conn))
            assert status == 408 and body["type"] == "header_timeout" and headers["connection"] == "close"
        assert trickled_until_closed < 200  # closed mid-trickle, not when the client stopped
        # a well-behaved client on a fresh connection is unaffected
        ok = _connect(port)
        ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 200 OK" in _read_all(ok).split(b"\r\n", 1)[0]


@pytest.mark.parametrize("http", PROTOCOLS)
def test_keep_alive_connections_serve_requests_then_close_when_idle(export_dir, http):
    with live_server(export_dir, http, header_timeout_s=5, keep_alive_s=0.3) as port:
        conn = _connect(port)
        for _ in range(3):  # the head deadline applies to each request's head, not to the connection's age
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = conn.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
        assert _read_all(conn) == b""  # idle past the keep-alive timeout: closed


def test_oversized_head_is_a_431_and_malformed_http_a_json_400(export_dir):
    with live_server(export_dir, max_header_bytes=4096) as port:
        big = _connect(port)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        status, headers, body = _json_answer(_read_all(big))
        assert status == 431 and body["type"] == "headers_too_large" and "4,096" in body["error"]
        garbage_requests = (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                            b"POST /x HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
        for garbage in garbage_requests:
            conn = _connect(port)
            conn.sendall(garbage)
            status, headers, body = _json_answer(_read_all(conn))
            assert status == 400 and body == {"error": body["error"], "type": "malformed_http", "status": 400}
            assert headers["content-type"] == "application/json"


def _slow_body(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` whose :classify request has its head and 10 of its 1,000 body bytes sent: a
    request in progress for as long as the test keeps it open (below --request-timeout)."""
    conn = _connect(port, source)
    conn.sendall(b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 1000\r\n\r\n0123456789")
    return conn


@pytest.mark.parametrize("http", PROTOCOLS)
def test_connections_beyond_the_cap_get_a_json_503_with_retry_after(export_dir, http):
    """When every open connection is answering a request (none is idle to make room), a newcomer is refused."""
    with live_uvicorn(export_dir, http, max_connections=2, header_timeout_s=10) as (port, server):
        held = [_slow_body(port) for _ in range(2)]
        app_state = server.config.app.state.serve
        _wait_for(lambda: app_state.in_flight == 2, "both requests are in progress")
        extra = _connect(port)
        status, headers, body = _json_answer(_read_all(extra))
        assert status == 503 and body["type"] == "too_many_connections" and headers["retry-after"] == "1"
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed connections, then takes new ones again
            conn = _connect(port)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = _read_all(conn)
            if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200")


def _pipeliner(port: int, path: str, count: int) -> socket.socket:
    """A connection with a 2 KB receive buffer that sends ``count`` pipelined ``GET path`` and never reads: as many
    as the server takes before it stops reading (until writing blocks for 2 s in a row, or the server drops it)."""
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.connect(("127.0.0.1", port))
    conn.setblocking(False)
    burst = memoryview(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * count)
    import select

    with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # dropped mid-burst (the write deadline)
        while burst and select.select([], [conn], [], 2.0)[1]:
            with contextlib.suppress(BlockingIOError):
                burst = burst[conn.send(burst):]
    return conn


def _wait_for(condition, what: str, seconds: float = 30) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``seconds`` (a bound, not a measurement)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _classify(port: int, source: str = "127.0.0.1") -> int:
    conn = _connect(port, source)
    body = _png()
    conn.sendall(b"POST /v1/models/tiny:classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return _json_answer(_read_all(conn))[0]


@pytest.mark.parametrize("http", PROTOCOLS)
def test_pipelining_without_reading_is_capped_and_holds_no_request_slot(export_dir, http):
    """Connections that pipeline thousands of requests and never read the answers: each has at most
    ``max_pipelined`` requests queued (the server stops reading it), none holds one of the in-progress slots while
    its answers wait, and a well-behaved :classify is answered 200 meanwhile."""
    with live_uvicorn(export_dir, http, max_pipelined=4, max_concurrent_requests=2, write_timeout_s=600) as (
            port, server):
        attackers = [_pipeliner(port, "/openapi.json", 3000) for _ in range(3)]  # more than the 2 slots
        _wait_for(lambda: len(server.server_state.connections) == 3 and all(
            p.flow.write_paused for p in server.server_state.connections), "every attacker's answers block")
        for protocol in server.server_state.connections:
            if http == "httptools":
                assert len(protocol.pipeline) <= 4 + 1  # the cap (and one begun in the last slice)
                assert len(protocol._unread) <= 256 * 1024  # at most one read held, the rest left in the kernel
                assert protocol.flow.read_paused
            else:  # h11 parses one request at a time: what it read waits in its buffer, at most a read or two
                assert len(protocol.conn.trailing_data[0]) <= 512 * 1024
        assert server.server_state.total_requests < 3 * 3000
        assert _classify(port) == 200  # the 3 stuck answers hold no slot
        for conn in attackers:
            conn.close()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_answers_that_do_not_drain_close_the_connection_at_the_write_deadline(export_dir, http):
    with live_uvicorn(export_dir, http, write_timeout_s=0.5) as (port, server):
        attacker = _pipeliner(port, "/healthz", 60_000)
        # still open on the client's side, unread: the server drops it, its unsent answers with it
        _wait_for(lambda: not server.server_state.connections, "the server drops the connection")
        assert _classify(port) == 200
        attacker.close()


# ---------------------------------------------------------------------------------------------- per client

ATTACKER = "127.0.0.2"  # another client address on loopback; the well-behaved client is 127.0.0.1


def _closed_with(conn: socket.socket) -> tuple[int, str] | None:
    """(status, error type) the server answered on ``conn`` before closing it, (0, "") for a close without an answer,
    or None if it is still open."""
    conn.setblocking(False)
    try:
        first = conn.recv(65536)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return 0, ""
    finally:
        conn.setblocking(True)
    if not first:
        return 0, ""
    status, _, body = _json_answer(first + _read_all(conn))
    return status, body["type"]


@pytest.mark.parametrize("http", PROTOCOLS)
def test_one_clients_idle_sockets_do_not_lock_out_another(export_dir, http):
    """Issue 19: one address holding every connection the server allows, idle, used to make every other client's
    connection a 503 until the head deadline closed them (and the attacker reconnected). Now a newcomer makes room by
    closing an idle connection of the address that holds the most; that address's own newcomers close its own oldest
    (a lone reverse proxy is not refused)."""
    with live_uvicorn(export_dir, http, max_connections=12, header_timeout_s=120) as (port, server):
        def open_connections(n: int) -> None:
            _wait_for(lambda: len(server.server_state.connections) == n, f"{n} connections open")

        idle = [_connect(port, ATTACKER) for _ in range(12)]
        open_connections(12)  # the attacker holds every connection
        for _ in range(3):  # repeatably: each well-behaved newcomer takes one of the attacker's idle sockets
            assert _classify(port) == 200
            open_connections(11)  # the socket it took and the well-behaved one (Connection: close) are gone
            idle.append(_connect(port, ATTACKER))  # the attacker reconnects: every connection is its again
            open_connections(12)
        outcomes = [_closed_with(conn) for conn in idle]
        closed = [o for o in outcomes if o is not None]
        assert closed == [(503, "too_many_connections")] * 3  # never sent a request: told why, with Retry-After
        assert outcomes[:3] == closed  # the oldest first
        # the attacker's own newcomer is not refused either: it closes the attacker's oldest idle socket
        newcomer = _connect(port, ATTACKER)
        newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(newcomer).startswith(b"HTTP/1.1 200")
        assert _closed_with(idle[3]) == (503, "too_many_connections")
        registry = server.config.app.state.serve.metrics.registry
        assert registry.get_sample_value("serve_rejected_total", {"reason": "connection_evicted"}) == 4
        for conn in idle:
            conn.close()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_a_keep_alive_connection_between_requests_is_closed_without_an_answer_to_make_room(export_dir, http):
    """An idle keep-alive connection is closed as its keep-alive timeout would close it: no unsolicited answer."""
    with live_uvicorn(export_dir, http, max_connections=2, keep_alive_s=120, header_timeout_s=120) as (port, _):
        kept = [_connect(port, ATTACKER) for _ in range(2)]
        for conn in kept:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        assert _classify(port) == 200
        assert [_closed_with(conn) for conn in kept] == [(0, ""), None]
        for conn in kept:
            conn.close()


@pytest.mark.parametrize("per_client, other_gets", [(0, 200), (4, 503)])
def test_one_clients_slow_bodies_leave_room_for_another(export_dir, per_client, other_gets):
    """Issue 19: slow bodies from one address used to fill every request slot (for --request-timeout, 30 s) and every
    other client got 503. One address now holds at most 3/4 of the slots (auto): its next requests get 429 with
    Retry-After and another address still gets 200. --max-requests-per-client at --max-concurrent-requests turns
    this off (the old behaviour, which the second case shows)."""
    with live_uvicorn(export_dir, max_concurrent_requests=4, max_requests_per_client=per_client) as (port, server):
        app_state = server.config.app.state.serve
        held = [_slow_body(port, ATTACKER) for _ in range(3 if per_client == 0 else 4)]
        _wait_for(lambda: app_state.in_flight == len(held), "the attacker's requests are in progress")
        if per_client == 0:  # auto: 3 of the 4 slots
            assert app_state.in_flight_by_client == {ATTACKER: 3}
            status, headers, body = _json_answer(_read_all(_slow_body(port, ATTACKER)))
            assert status == 429 and body["type"] == "too_many_requests" and headers["retry-after"] == "1"
            assert "--max-requests-per-client" in body["error"]
        assert _classify(port) == other_gets
        for conn in held:
            conn.close()
        _wait_for(lambda: app_state.in_flight == 0 and not app_state.in_flight_by_client, "every slot is given back")


def test_clients_are_addresses_ipv6_by_slash_64():
    from serve.clients import UNKNOWN, ClientConnections, client_key

    assert client_key("127.0.0.2") == "127.0.0.2" != client_key("127.0.0.1")
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key(None) == client_key("") == UNKNOWN

    conns = ClientConnections()
    for name, client in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C")):
        conns.add(name, client)
    idle = {"a2", "a3", "b1", "c1"}
    assert conns.victim("c1", "C", idle.__contains__) == "a2"  # the oldest idle of the client holding the most
    conns.add("c2", "C")
    conns.add("c3", "C")
    assert conns.victim("c3", "C", idle.__contains__) == "c1"  # a tie: the newcomer's own client makes room
    assert conns.victim("b2", "B", set().__contains__) is None  # nothing idle: the newcomer is refused
    conns.add("b2", "B")
    conns.add("b3", "B")
    conns.add("b4", "B")
    assert conns.victim("b4", "B", {"a2", "c1"}.__contains__) is None  # never from a client holding fewer
    for name, client in (("a1", "A"), ("a2", "A"), ("a3", "A")):
        conns.discard(name, client)
    assert "A" not in conns.by_client


def test_a_refusal_before_the_body_is_read_closes_the_connection(export_dir):
    with live_server(export_dir, max_json_bytes=1024) as port:
        conn = _connect(port)
        conn.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n")
        status, headers, body = _json_answer(_read_all(conn))  # closed: the 5000 bytes are never read
        assert status == 413 and headers["connection"] == "close" and "--max-json-mb" in body["error"]


# ---------------------------------------------------------------------------------------------- leaks


def test_docs_and_schema_need_the_key_when_there_is_one(export_dir):
    with TestClient(create_app(Settings(export_dirs=(str(export_dir),), api_key="s3cret"))) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["type"] == "unauthorized", path
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        schema = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert "/v1/models/{name}:classify" in schema["paths"] and "/docs" not in schema["paths"]
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scraping stay open
            assert c.get(path).status_code == 200, path
    with TestClient(create_app(Settings(export_dirs=(str(export_dir),)))) as c:
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_no_answer_holds_a_path_of_the_server(export_dir, tmp_path):
    """Every route, and the errors of each, with the key: no absolute path of the server in any answer."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    secrets = {str(export_dir.resolve()), str(export_dir.resolve().parent), manifest["export"]["source_run"],
               str(Path.cwd()), str(Path.home()), str(tmp_path.parent), os.environ.get("TMPDIR") or "/tmp/"}
    auth = {"Authorization": "Bearer k"}
    png = _png()
    with TestClient(create_app(Settings(export_dirs=(str(export_dir),), api_key="k"))) as c:
        answers = []
        for route in c.app.routes:
            path = route.path.replace("{name}", "tiny")
            for method in sorted(getattr(route, "methods", None) or ()):
                if method == "POST":
                    for content, ctype in ((png, "image/png"), (b"junk", "image/png"), (b"{", "application/json"),
                                           (b'{"instances": [[1]]}', "application/json"), (b"x", "text/plain")):
                        answers.append(c.post(path, content=content, headers={**auth, "content-type": ctype}))
                else:
                    answers.append(c.request(method, path, headers=auth))
                answers.append(c.request(method, path))  # without the key
                answers.append(c.request(method, path.replace("tiny", "../../etc"), headers=auth))
        answers += [c.get("/no/such/route"), c.post("/v1/models/tiny:classify", headers=auth,
                                                    files={"files": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)})]
    assert len(answers) > 30
    for r in answers:
        text = r.text
        leaked = [s for s in secrets if s and s in text]
        assert not leaked, (r.request.method, r.request.url, r.status_code, leaked)


# ---------------------------------------------------------------------------------------------- the command line


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_busy_port_is_one_line_exit_2_before_serving(export_dir, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert main([str(export_dir), "--port", str(port)]) == 2
    finally:
        busy.close()
    line = _one_line(capsys.readouterr().err)
    assert f"port {port}" in line and "already in use" in line and "--port" in line
    assert "serving" not in line


@pytest.mark.parametrize("host, needle", [("256.1.1.1", "not a valid IPv4 address"),
                                          ("no-such-host.invalid", "resolve"),
                                          ("192.0.2.1", "not an address of this machine")])
def test_a_bad_host_is_one_line_exit_2(export_dir, capsys, host, needle):
    assert main([str(export_dir), "--host", host, "--port", "0"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert host in line and needle in line


def test_a_corrupt_export_is_one_line_exit_2_before_listening(export_dir, tmp_path, capsys):
    tampered = relabel_copy(export_dir, tmp_path / "tampered", CLASSES)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main([str(tampered), "--port", "0"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "sha256" in line and "re-export" in line


@pytest.mark.parametrize("argv, needle", [(["--max-json-mb", "0"], "--max-json-mb 0"),
                                          (["--decode-memory-mb", "nan"], "--decode-memory-mb nan"),
                                          (["--header-timeout", "0"], "header-timeout=0"),
                                          (["--max-header-bytes", "10"], "max-header-bytes=10"),
                                          (["--max-connections", "0"], "max-connections=0"),
                                          (["--max-requests-per-client", "-1"], "max-requests-per-client=-1")])
def test_bad_limits_are_one_line_exit_2(export_dir, capsys, argv, needle):
    assert main([str(export_dir), *argv]) == 2
    assert needle in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                               ("127.0.0.1", None, False)])
def test_a_reachable_address_without_a_key_is_warned_about_in_one_line(export_dir, monkeypatch, capsys, host, key,
                                                                       warned):
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # everything but serving
    monkeypatch.delenv("TRANSFER_SERVE_API_KEY", raising=False)
    assert main([str(export_dir), "--host", host, "--port", "0", *(["--api-key", key] if key else [])]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == (1 if warned else 0), err
    if warned:
        assert "--api-key" in warnings[0] and host in warnings[0]
    assert "serving tiny on" in err
