"""Hostile clients against `transfer serve` on loopback: the server's peak memory and well-behaved clients' latency
during each attack, side by side with a clean run.

    python benchmarks/hostile_clients.py [--export DIR] [--seconds 15] [--long-seconds 35] [--rss-cap-gb 3]

Starts `python -m serve EXPORT --port P` on 127.0.0.1 (defaults otherwise) with its open-file limit set to --nofile
(1024), then runs one phase per attack. In every phase --clients well-behaved clients (their own process) send
:classify requests of small PNGs over keep-alive connections at a steady --rate each, while the attack runs in an
attacker process at lower CPU priority (nice 10: on a network the attacker would not share the server's cores):

    clean          no attack
    large PNG      multipart requests of 16, 64 and 2 copies of a 6300x6300 single-colour PNG (131 KB each)
    half headers   --half-headers connections that send half a request head, then one byte every 2 s, reopened
                   when the server closes them (this phase and the next last --long-seconds)
    slow bodies    --slow-bodies requests whose 1 MB body arrives at 20 bytes/s (longer than the server's 30 s
                   request timeout)
    16 MB JSON     :predict requests with 16 MB JSON bodies (above --max-json-mb, under --max-body-mb)
    JSON at cap    :predict requests with JSON bodies just under --max-json-mb, as costly to parse as the server
                   lets JSON be (parsed in its JSON parser process)
    20% malformed  4 more clients at the well-behaved rate whose traffic is 80% valid :classify requests and 20%
                   malformed bodies (/v1, and the v2 protocol's JSON and binary tensors), parameters and HTTP (a
                   flood at full speed would measure capacity, not malformedness: benchmarks/serve_load.py measures
                   that)
    pipelined healthz  8 connections with a 2 KB receive buffer that each send 60,000 pipelined `GET /healthz` in
                   one go and never read an answer (no API key needed)
    pipelined openapi  130 such connections that each pipeline 3,000 `GET /openapi.json` (each holds a request in
                   progress while its answers do not drain: more than --max-concurrent-requests, 128)
    idle sockets   --idle-sockets (1,000) connections from another address, 127.0.0.2, that send nothing and are
                   reopened 0.1 s after the server closes one (more than the server's --max-connections, 960 at
                   this open-file limit); the well-behaved clients open a new connection for every request in this
                   phase and its clean run (every new client used to get 503 too_many_connections)
    130 slow bodies  as "slow bodies", from 127.0.0.2, with 130 connections (more than --max-concurrent-requests,
                   128), each reopened 0.1 s after the server answers it
    in-place reload  not a client attack but a careless deploy, on a server of its own (--model-repo, polled every
                   --race-poll-s 0.05 s): the served export's model.onnx, manifest.json and labels.txt are rewritten
                   in place (truncated and written, same inode) with export A, then B, then A ... (a random pause of
                   0-60 ms after each) while one client sends --race-requests :classify requests of one image. B is
                   A with its outputs permuted (other weights in effect) and other labels, so every answer says what
                   produced it: A's label for the image, B's, or a mix of one's labels and the other's weights.
                   Target: 0 mixed answers, and B (written last) served under its sha256 once the writer stops.

After each attack phase the server's resident memory is read again once the attacker has left (--settle seconds
later): "after" in the table, with the idle memory measured before the first phase.

Each attack runs right after a clean run of --seconds (no attack) and is compared with it: other work on the machine
changes latency from one minute to the next, so each pair shares its conditions (the load average is printed).

Printed per phase: the server's peak resident memory (VmHWM from /proc/PID/status, reset at the start of the phase
and read at its end, for the server process and for its children: the JSON parser process), the p50/p99 latency of
the well-behaved clients and how it compares to the clean run, their requests and failures, every 5xx that is not
a documented 503 (from what the clients saw and from the server's /metrics), what the attacker got, and whether the
server is alive at the end. Bounded: every phase ends by itself, every socket is on 127.0.0.1, the server is killed
if its memory (with its children) passes --rss-cap-gb or when the script ends. Linux only (/proc).

Without --export it trains and exports the serve tests' tiny LeNet-5 (tests/serve/serve_fixtures.py, about ten
seconds; TensorFlow is needed for that, in this process only). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serve")]

MB = 2**20
HOST = "127.0.0.1"
BIG_SIDE = 6300
ATTACKER = "127.0.0.2"  # the source address of the attacks that must come from another client than the good ones
ATTACKS = ("large PNG", "half headers", "slow bodies", "16 MB JSON", "JSON at cap", "20% malformed",
           "pipelined healthz", "pipelined openapi", "idle sockets", "130 slow bodies", "in-place reload")
SEPARATE = {"in-place reload"}  # runs on a server of its own (reload_race), not as a phase
# longer than the server's header (10 s) and request (30 s) timeouts
LONG_PHASES = {"half headers", "slow bodies", "idle sockets", "130 slow bodies"}
FRESH_CONNECTIONS = {"idle sockets"}  # the well-behaved clients open a connection per request (newcomers)
PIPELINING = {"pipelined healthz", "pipelined openapi"}  # also held to: memory back near idle, no good request lost
NO_LOSS = PIPELINING | {"idle sockets", "130 slow bodies"}  # held to: no well-behaved request refused or lost
DOCUMENTED_503 = {"overloaded", "timeout", "too_many_connections", "not_ready"}


# ---------------------------------------------------------------------------------------------- HTTP, minimal


class Connection:
    """One keep-alive HTTP/1.1 connection: (status, headers, body) per request; reconnects when the server closed."""

    def __init__(self, port: int, fresh: bool = False) -> None:
        self.port, self.reader, self.writer, self.fresh = port, None, None, fresh

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "image/png",
                      extra: str = "") -> tuple[int, dict, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        try:
            if self.fresh:
                extra += "Connection: close\r\n"
            self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
                              f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            raise
        if headers.get("connection") == "close":
            self.close()
        return int(lines[0].split()[1]), headers, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _kind(status: int, body: bytes) -> str:
    if status == 200:
        return "ok"
    try:
        return json.loads(body).get("type", "?")
    except ValueError:
        return "not-json"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def small_pngs(n: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [_png(np.clip(rng.integers(0, 256, 3) + rng.integers(-40, 40, (40 + i, 48, 3)), 0, 255).astype(np.uint8))
            for i in range(n)]


def multipart(blobs: list[bytes]) -> tuple[bytes, str]:
    boundary = "hostileboundary7e3f"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n" for i, blob in enumerate(blobs)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------- roles


async def well_behaved(port: int, model: str, clients: int, rate: float, seconds: float, fresh: bool = False) -> dict:
    """``clients`` keep-alive connections (``fresh``: a new connection per request), each sending a valid :classify
    request every 1/rate s."""
    blobs, path = small_pngs(), f"/v1/models/{model}:classify?top_k=1"
    latencies, statuses, errors = [], {}, 0
    stop = time.monotonic() + seconds

    async def client(k: int) -> None:
        nonlocal errors
        conn, i, next_at = Connection(port, fresh), k, time.monotonic() + k / (clients * rate)
        while next_at < stop:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / rate
            t0 = time.perf_counter()
            try:
                status, _, body = await asyncio.wait_for(conn.request("POST", path, blobs[i % len(blobs)]), 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                conn.close()
                continue
            key = f"{status} {_kind(status, body)}" if status != 200 else "200"
            statuses[key] = statuses.get(key, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            i += 1
        conn.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    lat = np.asarray(latencies or [float("nan")]) * 1000
    return {"ok": len(latencies), "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "statuses": statuses, "errors": errors}


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


async def _post_once(port: int, path: str, body: bytes, content_type: str, timeout: float = 60) -> str:
    """One request on a fresh connection: what came back, as a tally key."""
    conn = Connection(port)
    try:
        status, _, data = await asyncio.wait_for(conn.request("POST", path, body, content_type), timeout)
        return f"{status} {_kind(status, data)}"
    except (ConnectionResetError, BrokenPipeError):
        return "reset while sending (refused before the body was read)"
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        return f"error {type(exc).__name__}"
    finally:
        conn.close()


async def attack_large_png(port: int, model: str, seconds: float, tally: Tally) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (BIG_SIDE, BIG_SIDE), (200, 30, 30)).save(buf, "PNG")
    big = buf.getvalue()
    bodies = {n: multipart([big] * n) for n in (16, 64, 2)}
    stop, path = time.monotonic() + seconds, f"/v1/models/{model}:classify?top_k=1"

    async def attacker(start: int) -> None:
        k = start
        while time.monotonic() < stop:
            n = (16, 64, 2)[k % 3]
            body, ctype = bodies[n]
            tally.add(f"{n} copies: {await _post_once(port, path, body, ctype)}")
            k += 1

    await asyncio.gather(attacker(0), attacker(1))
    return {"png_bytes": len(big)}


async def _trickle(port: int, seconds: float, tally: Tally, count: int, head: bytes, drip: bytes,
                   every: float, source: str = HOST, pause: float = 0.0) -> dict:
    """``count`` connections from ``source`` that send ``head`` and then ``drip`` every ``every`` seconds (nothing,
    when ``drip`` is empty) until the server answers or closes (then they reconnect, ``pause`` s later); how long
    the server let them live."""
    stop = time.monotonic() + seconds
    lifetimes: list[float] = []  # connections the server ended
    open_at_end: list[float] = []  # ages of those still open when the phase ended

    async def one() -> None:
        while time.monotonic() < stop:
            opened = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            except OSError as exc:
                tally.add(f"connect failed: {type(exc).__name__}")
                await asyncio.sleep(0.5)
                continue
            writer.write(head)
            answer, ended = b"", False
            try:
                while time.monotonic() < stop:
                    try:
                        answer = await asyncio.wait_for(reader.read(4096), every)
                        ended = True
                        break  # the server answered (or closed)
                    except asyncio.TimeoutError:
                        if drip:
                            writer.write(drip)
                            await writer.drain()
            except OSError:
                ended = True
            if ended:
                lifetimes.append(time.monotonic() - opened)
                tally.add(answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer")
            else:
                open_at_end.append(time.monotonic() - opened)
            writer.close()
            if ended and pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(one() for _ in range(count)))
    return {"ended_by_server": len(lifetimes), "longest_lived_s": max(lifetimes, default=0.0),
            "oldest_open_at_end_s": max(open_at_end, default=0.0)}


async def attack_half_headers(port: int, model: str, seconds: float, tally: Tally, count: int) -> dict:
    head = f"POST /v1/models/{model}:classify HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
    return await _trickle(port, seconds, tally, count, head, b"a", 2.0)


async def attack_slow_bodies(port: int, model: str, seconds: float, tally: Tally, count: int) -> dict:
    head = (f"POST /v1/models/{model}:classify HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {MB}\r\n\r\n").encode()
    return await _trickle(port, seconds, tally, count, head, b"0123456789", 0.5)


async def attack_idle_sockets(port: int, model: str, seconds: float, tally: Tally, count: int) -> dict:
    """``count`` connections from ATTACKER that send nothing: they hold connections until the server closes them."""
    return await _trickle(port, seconds, tally, count, b"", b"", 1.0, source=ATTACKER, pause=0.1)


async def attack_slow_bodies_other_address(port: int, model: str, seconds: float, tally: Tally, count: int) -> dict:
    head = (f"POST /v1/models/{model}:classify HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {MB}\r\n\r\n").encode()
    return await _trickle(port, seconds, tally, count, head, b"0123456789", 0.5, source=ATTACKER, pause=0.1)


def _json_predict_body(size: int) -> bytes:
    """A :predict body of about ``size`` bytes that costs the parser as much as JSON that passes the server's array
    count can: one instance of about size/4 numbers (13 bytes of memory per byte, ~0.7 s per 8 MB here), refused
    for its shape only once it is parsed."""
    n = (size - 64) // 4
    return b'{"instances": [[' + b",".join([b"1e5"] * n) + b"]]}"


async def attack_json(port: int, model: str, seconds: float, tally: Tally, size: int) -> dict:
    body, stop = _json_predict_body(size), time.monotonic() + seconds
    path = f"/v1/models/{model}:predict"

    async def attacker() -> None:
        while time.monotonic() < stop:
            tally.add(await _post_once(port, path, body, "application/json"))

    await asyncio.gather(attacker(), attacker())
    return {"body_mb": len(body) / MB}


def _v2_binary(tensor: dict, data: bytes, header_length: int | None = None) -> tuple[bytes, str]:
    """An Open Inference Protocol body with the binary tensor data extension, and its extra header line."""
    text = json.dumps({"inputs": [tensor]}).encode()
    length = len(text) if header_length is None else header_length
    return text + data, f"Inference-Header-Content-Length: {length}\r\n"


def _malformed_bodies(model: str) -> list[tuple[str, bytes, str, str]]:
    """(path, body, content type, extra header lines) of requests the server must refuse with a 4xx."""
    red = _png(np.full((20, 20, 3), (220, 30, 30), np.uint8))
    bomb = _png(np.zeros((1, 1), np.uint8))
    header = bytearray(bomb)
    header[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width/height: a 900 MP header on a tiny body
    c = f"/v1/models/{model}:classify"
    v2 = f"/v2/models/{model}/infer"

    def v2_json(name: str, datatype: str, shape: list[int], data: list) -> bytes:
        return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}).encode()

    def b64(*blobs: bytes) -> list[str]:
        return [base64.b64encode(b).decode() for b in blobs]

    images = {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}
    bodies = [
        (c, b"definitely not an image", "image/png"),
        (c, red[: len(red) // 2], "image/png"),
        (c, b"", "image/png"),
        (c, bytes(header), "image/png"),
        (c, b"{broken json", "application/json"),
        (c, b'{"instances": [{"b64": "***"}]}', "application/json"),
        (c, json.dumps({"instances": [{"b64": base64.b64encode(b"text").decode()}]}).encode(), "application/json"),
        (c, b"abc", "text/plain"),
        (c + "?top_k=many", red, "image/png"),
        ("/v1/models/nope:classify", red, "image/png"),
        (f"/v1/models/{model}:predict", b'{"instances": [[1, 2]]}', "application/json"),
        (f"/v1/models/{model}:predict", b'{"instances": [[NaN]]}', "application/json"),
        # the Open Inference Protocol (v2): JSON tensors
        (v2, b"{broken json", "application/json"),
        (v2, v2_json("image", "INT32", [1, 2], [1, 2]), "application/json"),
        (v2, v2_json("image", "FP32", [1, 2, 2, 3], [0.0] * 12), "application/json"),
        (v2, v2_json("image_bytes", "BYTES", [1], b64(b"definitely not an image")), "application/json"),
        (v2, v2_json("image_bytes", "BYTES", [1], b64(bytes(header))), "application/json"),
        (v2, v2_json("image_bytes", "BYTES", [1], ["***"]), "application/json"),
        ("/v2/models/nope/infer", v2_json("image_bytes", "BYTES", [1], b64(red)), "application/json"),
        (f"/v2/models/{model}/versions/7/infer", v2_json("image_bytes", "BYTES", [1], b64(red)), "application/json"),
    ]
    binary = [  # and the binary tensor data extension
        _v2_binary(images, b"\3\0\0\0abc" * 10),  # more bytes than binary_data_size
        _v2_binary(images, b"\3\0\0\0abc", header_length=10**6),  # header length past the body
        _v2_binary(images, b"\xff\xff\xff\x7fabc"),  # an element longer than the data
        _v2_binary(images, b"\x03\0\0\0abc"),  # not an image
    ]
    return [(*b, "") for b in bodies] + [(v2, body, "application/octet-stream", extra) for body, extra in binary]


GARBAGE_HTTP = [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n"]


async def attack_malformed(port: int, model: str, seconds: float, tally: Tally, rate: float) -> dict:
    blobs, bad = small_pngs(), _malformed_bodies(model)
    stop, rng = time.monotonic() + seconds, np.random.default_rng(1)
    path = f"/v1/models/{model}:classify?top_k=1"

    async def garbage(data: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(data)
            answer = await asyncio.wait_for(reader.read(4096), 15)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            tally.add(f"raw {head.split(b' ')[1].decode() if head else 'closed'} {_kind(0, body)}")
        except (OSError, asyncio.TimeoutError, IndexError) as exc:
            tally.add(f"raw error {type(exc).__name__}")

    async def worker(k: int) -> None:
        conn, i, next_at = Connection(port), 0, time.monotonic() + k / (4 * rate)
        while next_at < stop:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / rate
            draw = rng.random()
            if draw < 0.05:
                await garbage(GARBAGE_HTTP[int(rng.integers(len(GARBAGE_HTTP)))])
                continue
            if draw < 0.2:
                p, body, ctype, extra = bad[int(rng.integers(len(bad)))]
            else:
                p, body, ctype, extra = path, blobs[i % len(blobs)], "image/png", ""
            i += 1
            try:
                status, _, data = await asyncio.wait_for(conn.request("POST", p, body, ctype, extra), 60)
                tally.add(f"{status} {_kind(status, data)}" if status != 200 else "200")
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                tally.add(f"error {type(exc).__name__}")
                conn.close()
        conn.close()

    await asyncio.gather(*(worker(k) for k in range(4)))
    return {}


async def attack_pipelining(port: int, seconds: float, tally: Tally, conns: int, requests: int,
                            path: str) -> dict:
    """``conns`` connections with a 2 KB receive buffer that each send ``requests`` pipelined ``GET path`` at once
    and never read: how many bytes the server took of each (the rest waits in the kernel), how many it closed."""
    loop = asyncio.get_running_loop()
    burst = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() * requests
    stop = time.monotonic() + seconds
    sent: list[int] = []

    async def one() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST, port))
        except OSError as exc:
            tally.add(f"connect failed: {type(exc).__name__}")
            sock.close()
            return
        view, done, outcome = memoryview(burst), 0, "still open at the end (never read)"
        try:
            while done < len(burst) and time.monotonic() < stop:
                try:
                    n = sock.send(view[done:])  # never recv: the answers pile up on the server's side
                except BlockingIOError:
                    await asyncio.sleep(0.05)
                    continue
                done += n
            while time.monotonic() < stop:  # keep it open, unread, until the phase ends or the server closes it
                await asyncio.sleep(0.25)
                if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1:  # tcpi_state: not ESTABLISHED
                    outcome = "closed by the server"
                    break
        except OSError:
            outcome = "closed by the server"
        sent.append(done)
        tally.add(outcome)
        sock.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    return {"sent_mb_per_conn": sum(sent) / max(1, len(sent)) / MB}


def role_main(args) -> int:
    """A client process: ``--role good`` or ``--role attack --attack NAME``; prints one JSON line."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.role == "good":
        result = asyncio.run(well_behaved(args.port, args.model, args.clients, args.rate, args.seconds,
                                          args.fresh))
    else:
        tally = Tally()
        attacks = {
            "large PNG": lambda: attack_large_png(args.port, args.model, args.seconds, tally),
            "half headers": lambda: attack_half_headers(args.port, args.model, args.seconds, tally,
                                                        args.half_headers),
            "slow bodies": lambda: attack_slow_bodies(args.port, args.model, args.seconds, tally, args.slow_bodies),
            "16 MB JSON": lambda: attack_json(args.port, args.model, args.seconds, tally, 16 * MB - 4096),
            "JSON at cap": lambda: attack_json(args.port, args.model, args.seconds, tally,
                                               int(args.max_json_mb * MB) - 4096),
            "20% malformed": lambda: attack_malformed(args.port, args.model, args.seconds, tally, args.rate),
            "pipelined healthz": lambda: attack_pipelining(args.port, args.seconds, tally, 8, 60_000, "/healthz"),
            "pipelined openapi": lambda: attack_pipelining(args.port, args.seconds, tally, 130, 3_000,
                                                           "/openapi.json"),
            "idle sockets": lambda: attack_idle_sockets(args.port, args.model, args.seconds, tally,
                                                        args.idle_sockets),
            "130 slow bodies": lambda: attack_slow_bodies_other_address(args.port, args.model, args.seconds, tally,
                                                                        130),
        }
        result = asyncio.run(attacks[args.attack]()) | {"tally": tally.counts}
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- in-place reload


def reload_race(args, export_dir: Path, work: Path, env: dict) -> dict:
    """The "in-place reload" run (see the module docstring): how many answers mixed one export's labels with the
    other's weights, and whether what is served once the writer stops is the last export written."""
    import hashlib
    import random
    import urllib.request

    from serve_fixtures import permuted_copy, relabel_copy, rewrite_in_place
    from serve_load import _free_port

    from export.contract import ExportDir

    classes = ExportDir.open(export_dir).classes
    shift = (*range(1, len(classes)), 0)
    a = relabel_copy(export_dir, work / "race-a", classes)
    b = permuted_copy(export_dir, work / "race-b", shift, tuple(f"b-{classes[i]}" for i in shift))
    repo = work / "race-repo"
    repo.mkdir()
    relabel_copy(export_dir, repo / "alpha", classes)
    port = _free_port()
    log = open(work / "race-server.log", "w+")  # noqa: SIM115  (read back on failure)
    server = subprocess.Popen([sys.executable, "-m", "serve", "--model-repo", str(repo), "--repo-poll-s",
                               str(args.race_poll_s), "--host", HOST, "--port", str(port), "--log-level", "error"],
                              cwd=ROOT, env=env, stdout=log, stderr=log)
    image = _png(np.tile(np.array([220, 30, 30], np.uint8), (20, 20, 1)))
    path = "/v1/models/alpha:classify?top_k=1"
    done, rewrites = threading.Event(), [0]

    def writer() -> None:
        rng = random.Random(0)
        while not done.is_set():
            rewrite_in_place(repo / "alpha", (a, b)[rewrites[0] % 2])
            rewrites[0] += 1
            time.sleep(rng.uniform(0, 0.06))
        rewrite_in_place(repo / "alpha", b)

    async def ask(conn: Connection) -> str:
        status, _, body = await asyncio.wait_for(conn.request("POST", path, image), 60)
        return json.loads(body)["predictions"][0][0]["label"] if status == 200 else f"{status} {_kind(status, body)}"

    async def client() -> tuple[str, dict, str]:
        conn = Connection(port)
        first = await ask(conn)  # A's answer for the image; B's is "b-" + it
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        answers: dict[str, int] = {}
        try:
            for _ in range(args.race_requests):
                try:
                    label = await ask(conn)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    label = "connection error"
                    conn.close()
                answers[label] = answers.get(label, 0) + 1
        finally:
            done.set()
            await asyncio.to_thread(thread.join, 30)
        final, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline and final != f"b-{first}":
            await asyncio.sleep(0.1)
            final = await ask(conn)
        conn.close()
        return first, answers, final

    try:
        _wait_started(server, port, log, "the in-place reload server")
        first, answers, final = asyncio.run(client())
        served = json.loads(urllib.request.urlopen(f"http://{HOST}:{port}/v1/models/alpha/metadata",
                                                   timeout=10).read())["model"]["sha256"]
        metrics = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()

    def counter(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + "{"))

    consistent = {first, f"b-{first}"}
    labels = set(classes) | {f"b-{c}" for c in classes}
    return {"requests": sum(answers.values()), "consistent": sum(n for k, n in answers.items() if k in consistent),
            "mixed": sum(n for k, n in answers.items() if k in labels - consistent),
            "other": {k: n for k, n in answers.items() if k not in labels}, "rewrites": rewrites[0],
            "reloads": counter("serve_model_reloads_total"),
            "refused": counter("serve_model_reload_failures_total"), "final": final,
            "final_is_b": final == f"b-{first}" and served == hashlib.sha256((b / "model.onnx").read_bytes())
            .hexdigest()}


# ---------------------------------------------------------------------------------------------- the orchestra


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


class MemoryWatch:
    """Peak resident memory of the server and its children over a phase; kills the server past ``cap`` bytes."""

    def __init__(self, server: subprocess.Popen, cap: int) -> None:
        self.server, self.cap, self.killed = server, cap, False
        self._stop = threading.Event()
        self._sampled_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        return [self.server.pid, *_descendants(self.server.pid)]

    def reset(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._sampled_peak = 0

    def peaks(self) -> tuple[int, int]:
        """(server process VmHWM, its children's VmHWM summed) since the last reset, at least what was sampled."""
        main, children = 0, 0
        for pid in self._pids():
            try:
                hwm = _status(pid)["VmHWM"]
            except (OSError, KeyError):
                continue
            if pid == self.server.pid:
                main = hwm
            else:
                children += hwm
        return max(main, self._sampled_peak - children), children

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            total = 0
            for pid in self._pids():
                with contextlib.suppress(OSError, KeyError):
                    total += _status(pid)["VmRSS"]
            self._sampled_peak = max(self._sampled_peak, total)
            if total > self.cap and self.server.poll() is None:
                self.killed = True
                self.server.kill()

    def stop(self) -> None:
        self._stop.set()


def _metrics_5xx(port: int) -> dict[str, float]:
    """serve_requests_total samples with a 5xx status, from the server's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("serve_requests_total{") and 'status="5' in line:
            out[line.split("{", 1)[1].rsplit("}", 1)[0]] = float(line.split()[-1])  # labels hold "{name}" too
    return out


def _wait_started(server, port: int, log, what: str) -> None:
    """Wait (at most 120 s) until the server answers on ``port``; exit with its log's tail if it dies or never does."""
    deadline = time.monotonic() + 120
    while not _alive(port):
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise SystemExit(f"{what} did not start:\n{log.read()[-3000:]}")
        time.sleep(0.2)


def _alive(port: int) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5).status == 200
    except OSError:
        return False


def _undocumented_5xx(counts: dict[str, int]) -> int:
    total = 0
    for key, n in counts.items():
        parts = key.replace("raw ", "").split()
        if parts and parts[0].isdigit() and int(parts[0]) >= 500 and not (
                int(parts[0]) == 503 and len(parts) > 1 and parts[1] in DOCUMENTED_503):
            total += n
    return total


def run_phase(args, phase: str, port: int, model: str, watch: MemoryWatch, env: dict, like: str = "") -> dict:
    """One phase: the well-behaved clients, and the attack ``phase`` unless it is "clean" (a clean run ``like`` an
    attack's phase: with its kind of well-behaved connections)."""
    seconds = args.long_seconds if phase in LONG_PHASES else args.seconds
    me = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--model", model,
          "--seconds", str(seconds)]
    watch.reset()
    fresh = ["--fresh"] if (like or phase) in FRESH_CONNECTIONS else []
    good = subprocess.Popen([*me, "--role", "good", "--clients", str(args.clients), "--rate", str(args.rate),
                             *fresh], stdout=subprocess.PIPE, env=env)
    attacker = None
    if phase != "clean":
        attacker = subprocess.Popen(["nice", "-n", "10", *me, "--role", "attack", "--attack", phase,
                                     "--half-headers", str(args.half_headers), "--slow-bodies", str(args.slow_bodies),
                                     "--idle-sockets", str(args.idle_sockets),
                                     "--max-json-mb", str(args.max_json_mb), "--rate", str(args.rate)],
                                    stdout=subprocess.PIPE, env=env)
    limit = seconds + 90
    try:
        good_out = json.loads(good.communicate(timeout=limit)[0].decode().strip().splitlines()[-1])
        attack_out = (json.loads(attacker.communicate(timeout=limit)[0].decode().strip().splitlines()[-1])
                      if attacker else {"tally": {}})
    finally:
        for p in (good, attacker):
            if p is not None and p.poll() is None:
                p.kill()
    time.sleep(0.5)  # what the phase left running (a decode, a parse) finishes inside the phase's peak
    main_peak, child_peak = watch.peaks()
    after = 0
    if phase != "clean":
        time.sleep(args.settle)  # the attacker has left: what the server keeps
        with contextlib.suppress(OSError, KeyError):
            after = _status(watch.server.pid)["VmRSS"]
    return {"phase": phase, "good": good_out, "attack": attack_out, "main_peak": main_peak, "child_peak": child_peak,
            "after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="export directory to serve (default: build the serve tests' tiny LeNet-5)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--long-seconds", type=float, default=35.0,
                        help="length of the half-headers and slow-bodies phases (beyond the server's timeouts)")
    parser.add_argument("--clients", type=int, default=4, help="well-behaved clients")
    parser.add_argument("--rate", type=float, default=25.0, help="requests per second of each well-behaved client")
    parser.add_argument("--half-headers", type=int, default=300)
    parser.add_argument("--slow-bodies", type=int, default=50)
    parser.add_argument("--idle-sockets", type=int, default=1000, help="connections of the idle-sockets attack")
    parser.add_argument("--max-json-mb", type=float, default=8.0, help="the server's --max-json-mb (its default)")
    parser.add_argument("--nofile", type=int, default=1024, help="open-file limit of the server process")
    parser.add_argument("--rss-cap-gb", type=float, default=3.0, help="kill the server past this much memory")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after an attack before the server's memory is read again")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset of the attacks")
    parser.add_argument("--race-requests", type=int, default=2000,
                        help="in-place reload: :classify requests while the export is rewritten")
    parser.add_argument("--race-poll-s", type=float, default=0.05, help="in-place reload: the server's --repo-poll-s")
    # client roles (this script runs itself as the well-behaved and the attacking processes)
    parser.add_argument("--role", choices=("good", "attack"), help=argparse.SUPPRESS)
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return role_main(args)
    attacks = [a.strip() for a in args.attacks.split(",")]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"--attacks: unknown {unknown} (choices: {', '.join(ATTACKS)})")

    tmp = tempfile.TemporaryDirectory(prefix="hostile-")
    if args.export:
        export_dir = Path(args.export)
    else:
        from serve_fixtures import build_export

        export_dir = build_export(Path(tmp.name) / "tiny", formats=("onnx",))
    from export.contract import ExportDir

    model = ExportDir.open(export_dir).name
    race_failures = []
    if "in-place reload" in attacks:
        print("in-place reload ...", file=sys.stderr, flush=True)
        race = reload_race(args, export_dir, Path(tmp.name), {**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"\nin-place reload: {race['requests']} :classify answers while the export was rewritten in place "
              f"{race['rewrites']} times (server polling every {args.race_poll_s:g} s: {race['reloads']:.0f} "
              f"reloads, {race['refused']:.0f} refused): {race['consistent']} consistent, {race['mixed']} mixed "
              f"(one export's labels with the other's weights), other {race['other'] or 'none'}; after the writer "
              f"stopped, the last export written is served under its sha256: {'yes' if race['final_is_b'] else 'NO'}")
        if race["mixed"]:
            race_failures.append(f"in-place reload: {race['mixed']} mixed answers")
        if not race["final_is_b"]:
            race_failures.append(f"in-place reload: the last export written is not what is served ({race['final']})")
        attacks = [a for a in attacks if a not in SEPARATE]
        if not attacks:
            tmp.cleanup()
            if race_failures:
                print("\nMISSED: " + "; ".join(race_failures))
            return 1 if race_failures else 0
    from serve_load import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(Path(tmp.name) / "server.log", "w+")  # noqa: SIM115  (read back on failure)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    server = subprocess.Popen([sys.executable, "-m", "serve", str(export_dir), "--host", HOST, "--port", str(port),
                               "--max-json-mb", str(args.max_json_mb), "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=log, stderr=log, preexec_fn=limits)
    watch = MemoryWatch(server, int(args.rss_cap_gb * 2**30))
    rows, alive, idle = [], False, 0
    try:
        _wait_started(server, port, log, "the server")
        asyncio.run(well_behaved(port, model, args.clients, args.rate, 2.0))  # warm connections and caches
        idle = _status(server.pid)["VmRSS"]
        loads = [os.getloadavg()[0]]
        for attack in attacks:
            if server.poll() is not None:
                break
            print(f"clean, then {attack} ...", file=sys.stderr, flush=True)
            clean = run_phase(args, "clean", port, model, watch, env, like=attack)
            rows.append(run_phase(args, attack, port, model, watch, env) | {"clean": clean})
            loads.append(os.getloadavg()[0])
        alive = server.poll() is None and _alive(port)
        metrics_5xx = _metrics_5xx(port) if alive else {}
    finally:
        watch.stop()
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        log.seek(0)
        server_log = log.read()
        log.close()
        tmp.cleanup()

    print(f"\nmodel {model} ({export_dir}); server: python -m serve, defaults, open-file limit {args.nofile}; "
          f"{args.clients} well-behaved clients x {args.rate:g} req/s; phases of {args.seconds:g} s (half headers, "
          f"the slow-body and idle-socket attacks {args.long_seconds:g} s); {os.cpu_count()} CPUs shared by the "
          "server, the clients and "
          f"whatever else runs here (1-minute load average {min(loads):.1f} to {max(loads):.1f})\n")
    print(f"server idle RSS before the first phase: {idle / MB:.0f} MB\n")
    print("| attack | server peak RSS MB (server + bulk process) | server RSS MB after | clean p50 / p99 ms "
          "| attacked p50 / p99 ms | p99 vs clean | good ok / failed | undocumented 5xx | attacker got |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for r in rows:
        g, c, tally = r["good"], r["clean"]["good"], r["attack"]["tally"]
        failed = g["errors"] + sum(n for k, n in g["statuses"].items() if k != "200")
        bad5xx = (_undocumented_5xx(g["statuses"]) + _undocumented_5xx(tally)
                  + _undocumented_5xx(c["statuses"]))
        peak = r["main_peak"] + r["child_peak"]
        ratio = g["p99"] / c["p99"]
        got = "; ".join(f"{k}: {n}" for k, n in sorted(tally.items(), key=lambda kv: -kv[1])[:6]) or "-"
        extra = {k: v for k, v in r["attack"].items() if k != "tally"}
        if extra:
            got += " (" + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in extra.items()) + ")"
        print(f"| {r['phase']} | {peak / MB:.0f} ({r['main_peak'] / MB:.0f} + {r['child_peak'] / MB:.0f}) | "
              f"{r['after'] / MB:.0f} | {c['p50']:.1f} / {c['p99']:.1f} | {g['p50']:.1f} / {g['p99']:.1f} | "
              f"{ratio:.2f}x | {g['ok']} / {failed} | {bad5xx} | {got} |")
        if peak > 2**30:
            failures.append(f"{r['phase']}: peak RSS {peak / MB:.0f} MB > 1024 MB")
        if ratio > 3:
            failures.append(f"{r['phase']}: p99 {ratio:.1f}x the clean run's")
        if bad5xx:
            failures.append(f"{r['phase']}: {bad5xx} undocumented 5xx")
        if r["phase"] in PIPELINING and r["after"] > idle + 100 * MB:
            failures.append(f"{r['phase']}: {r['after'] / MB:.0f} MB after the attack > idle + 100 MB")
        if r["phase"] in NO_LOSS and (failed or not g["ok"]):
            failures.append(f"{r['phase']}: well-behaved :classify got {g['ok']} 200s, {failed} failures")
    undocumented = {k: v for k, v in metrics_5xx.items() if 'status="503"' not in k}
    print(f"\nserver alive at the end: {'yes' if alive else 'NO'}; killed by the memory watchdog: "
          f"{'YES' if watch.killed else 'no'}; 5xx in the server's /metrics: {metrics_5xx or 'none'}")
    if not alive:
        failures.append("the server is not alive at the end")
    if undocumented:
        failures.append(f"undocumented 5xx in /metrics: {undocumented}")
    failures += race_failures
    if failures:
        print("\nMISSED: " + "; ".join(failures))
        print("\nserver log (tail):\n" + server_log[-3000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
