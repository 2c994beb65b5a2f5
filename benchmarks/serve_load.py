"""Load test of `transfer serve` on loopback: throughput and latency percentiles at several concurrencies against raw
in-process ONNX Runtime throughput, then a soak with malformed requests mixed in (expects zero 5xx): 20 % malformed
bodies, to :classify and to the v2 protocol's infer, the valid ones half :classify and half v2 BYTES requests.

    python benchmarks/serve_load.py [--export DIR] [--requests 3000] [--seconds 10] [--workers N] [--image-format png]

Without --export it trains and exports a small CNN (fashion-mnist-cnn baseline, 64x64 input) with
tests/serve/serve_fixtures.py (needs TensorFlow once).
Bounded: at most --requests requests and --seconds seconds per level; the server binds 127.0.0.1 only.

"Raw" is the best of two in-process ways to run the model at --max-batch with every core busy: one session stream
using all intra-op threads, and one single-threaded stream per core (the server's default layout). Both are
printed; ratios use the higher. The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams, so
that on a small machine its own CPU (printed) takes as little as possible from the server it shares the cores with.

CPU per request (Linux /proc, utime + stime deltas over a level divided by its requests): "server ms/req" is every
server process (with --workers N, all of them; bulk processes not counted) and thread, inference included; "loop
ms/req" only their main threads, the event loops that do HTTP, decoding, batching and JSON (inference runs on other
threads); "client ms/req" is the load generator's. On a shared machine these are steadier than requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serve")]

from export.contract import ExportDir  # noqa: E402
from serve.inputs import decode_all  # noqa: E402
from serve.model import OnnxModel  # noqa: E402
from serve.settings import available_cores  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: tuple[int, int], image_format: str = "png") -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-50, 50, (*size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, image_format.upper())
        out.append(buf.getvalue())
    return out


# (route, body, Content-Type): "classify" posts to :classify, "v2" to the Open Inference Protocol's infer
MALFORMED = [
    ("classify", b"definitely not an image", "image/png"),
    ("classify", b"", "image/png"),
    ("classify", b'{"instances": [{"b64": "***"}]}', "application/json"),
    ("classify", b"{broken json", "application/json"),
    ("classify", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
    ("v2", b"{broken json", "application/json"),
    ("v2", b'{"inputs": []}', "application/json"),
    ("v2", b'{"inputs": [{"name": "image", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}',
     "application/json"),
    ("v2", b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0.5]}]}',
     "application/json"),
    ("v2", b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["***"]}]}',
     "application/json"),
    ("v2", b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
           b'"data": ["ZGVmaW5pdGVseSBub3Q="]}]}', "application/json"),  # base64 of "definitely not"
]


def v2_body(blob: bytes, input_name: str) -> bytes:
    """A v2 infer request of one encoded image (a BYTES tensor, base64 in JSON) asking for the top-1 class."""
    import base64

    return json.dumps({"inputs": [{"name": input_name, "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(blob).decode()]}],
                       "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}).encode()


def _top1(route: str, data: bytes) -> tuple[str, float]:
    """(label, score) of the first image's best class in a :classify or a v2 classification answer."""
    answer = json.loads(data)
    if route == "v2":  # Triton's "score:index:label" string, score as C's %f
        score, _, label = answer["outputs"][0]["data"][0].split(":", 2)
        return label, float(score)
    top = answer["predictions"][0][0]
    return top["label"], top["score"]


def raw_throughput(model: OnnxModel, batch: int, streams: int = 1, seconds: float = 3.0) -> float:
    """Images per second of session.run at ``batch`` in this process, ``streams`` threads calling it at once."""
    x = np.random.default_rng(0).uniform(0, 255, (batch, *model.export.input_shape)).astype(np.float32)
    model.run(x)
    done, stop = [0] * streams, time.perf_counter() + seconds

    def stream(i: int) -> None:
        while time.perf_counter() < stop:
            model.run(x)
            done[i] += batch

    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


class Connection:
    """One keep-alive HTTP/1.1 connection: requests in, (status, body) out; reconnects if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        if "content-length" not in headers:
            raise RuntimeError(f"response without Content-Length: {lines[0]}")
        data = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            self.writer.close()
        return int(lines[0].split()[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(port: int, paths: dict[str, str], blobs: list[bytes], expected: list[tuple[str, float]],
               concurrency: int, requests: int, seconds: float, malformed: float = 0.0,
               v2_bodies: list[bytes] | None = None) -> dict:
    """One level: ``requests`` requests (at most ``seconds``) from ``concurrency`` keep-alive connections. With
    ``malformed`` that share of them are MALFORMED bodies; with ``v2_bodies`` every other valid request is the same
    image as a v2 infer request."""
    rng = np.random.default_rng(concurrency)
    plan = [("bad", int(rng.integers(len(MALFORMED)))) if rng.random() < malformed else ("ok", i % len(blobs))
            for i in range(requests)]
    latencies, statuses, wrong = [], {}, 0
    cursor = 0
    deadline = time.monotonic() + seconds

    async def worker():
        nonlocal cursor, wrong
        conn = Connection("127.0.0.1", port)
        try:
            while cursor < len(plan) and time.monotonic() < deadline:
                kind, i = plan[cursor]
                route = "v2" if v2_bodies is not None and cursor % 2 else "classify"
                cursor += 1
                if kind == "ok":
                    body, ctype = (v2_bodies[i], "application/json") if route == "v2" else (blobs[i], "image/png")
                else:
                    route, body, ctype = MALFORMED[i]
                t0 = time.perf_counter()
                status, data = await conn.post(paths[route], body, ctype)
                statuses[status] = statuses.get(status, 0) + 1
                if kind == "ok":
                    latencies.append(time.perf_counter() - t0)
                    label, score = _top1(route, data) if status == 200 else (None, 0.0)
                    # v2's score is printed with 6 decimals (C's %f)
                    if label != expected[i][0] or abs(score - expected[i][1]) > (1e-5 if route == "classify" else 2e-6):
                        wrong += 1
                elif status < 400 or status >= 500:
                    wrong += 1
        finally:
            conn.close()

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "valid": len(latencies),
            "throughput": len(latencies) / wall, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "statuses": statuses, "wrong": wrong, "wall": wall,
            "client_cpu": (time.process_time() - cpu) / wall, "5xx": sum(v for k, v in statuses.items() if k >= 500)}


def _cpu_seconds(pid: int, main_thread_only: bool = False) -> float:
    """User + system CPU seconds of a process, or of its main thread (Linux /proc), 0 where that is not available."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _server_pids(pid: int, workers: int) -> list[int]:
    """The processes that answer requests: the server itself, or with --workers N its N worker processes (children of
    the supervisor that are not its bulk processes)."""
    if workers == 1:
        return [pid]
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]
    return [c for c in children if b"serve.bulk" not in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()][:workers] or [pid]


def _cpu(pids: list[int]) -> tuple[float, float]:
    """(all threads, main threads) CPU seconds of ``pids`` together."""
    return sum(_cpu_seconds(p) for p in pids), sum(_cpu_seconds(p, main_thread_only=True) for p in pids)


def _batch_stats(text: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram in a /metrics text."""
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("serve_batch_size_sum", "serve_batch_size_count"))}
    return values.get("serve_batch_size_sum", 0.0), values.get("serve_batch_size_count", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export directory to serve (default: build a small CNN export)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per level (bound)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per level (bound)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="server --threads (default auto)")
    parser.add_argument("--streams", type=int, default=0, help="server --streams (default auto)")
    parser.add_argument("--workers", type=int, default=1, help="server --workers (processes sharing the port)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                        help="server --precision; the raw baseline runs the same artifact")
    parser.add_argument("--image-format", default="png", choices=("png", "jpeg"), help="how the requests' images are "
                        "encoded (default png)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    if args.export:
        export_dir = Path(args.export)
    else:
        from serve_fixtures import build_export

        export_dir = build_export(Path(tmp.name) / "bench", formats=("onnx",), image_size=64,
                                  baseline="fashion-mnist-cnn")
    export = ExportDir.open(export_dir)
    cores = available_cores()
    all_threads = OnnxModel(export, threads=cores, precision=args.precision)
    one_thread = OnnxModel(export, threads=1, precision=args.precision)
    blobs = _images(64, export.size, args.image_format)
    probs = all_threads.run(decode_all(blobs, export.size, 10**8))
    expected = [(export.classes[int(p.argmax())], float(p.max())) for p in probs]

    def raw_now(seconds: float) -> dict[str, float]:
        return {"1 stream x all threads": raw_throughput(all_threads, args.max_batch, 1, seconds),
                f"{cores} streams x 1 thread": raw_throughput(one_thread, args.max_batch, cores, seconds)}

    raw_batch1 = raw_throughput(all_threads, 1)
    first_raw = raw_now(3.0)

    port = _free_port()
    cmd = [sys.executable, "-m", "serve", str(export_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--batch-timeout-ms", str(args.batch_timeout_ms),
           "--threads", str(args.threads), "--streams", str(args.streams), "--workers", str(args.workers),
           "--precision", args.precision, "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        from serve.client import ServeClient

        api, deadline = ServeClient(f"http://127.0.0.1:{port}"), time.monotonic() + 60
        while not api.health():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        paths = {"classify": f"/v1/models/{export.name}:classify?top_k=1", "v2": f"/v2/models/{export.name}/infer"}
        metadata = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{export.name}").read())
        bytes_input = next(t["name"] for t in metadata["inputs"] if t["datatype"] == "BYTES")
        v2_bodies = [v2_body(blob, bytes_input) for blob in blobs]
        asyncio.run(load(port, paths, blobs, expected, 4, 200, 10))  # warm connections and caches
        asyncio.run(load(port, paths, blobs, expected, 4, 100, 10, v2_bodies=v2_bodies))
        pids = _server_pids(server.pid, args.workers)
        rows = []
        for c in [int(c) for c in args.concurrency.split(",")] + [-32]:
            # Raw throughput measured right before and right after each level (the mean is used): this machine's
            # speed drifts over a run by more than the differences being measured.
            raw_before = raw_now(2.0)
            batches, cpu = _batch_stats(api.metrics()), _cpu(pids)
            # The last level is the soak: 20 % malformed bodies (both routes), valid ones half :classify, half v2.
            row = asyncio.run(load(port, paths, blobs, expected, abs(c), args.requests, args.seconds,
                                   malformed=0.2 if c < 0 else 0.0, v2_bodies=v2_bodies if c < 0 else None))
            after, cpu_after = _batch_stats(api.metrics()), _cpu(pids)
            server_cpu, loop_cpu = cpu_after[0] - cpu[0], cpu_after[1] - cpu[1]
            raw_after = raw_now(2.0)
            raw = {name: (raw_before[name] + raw_after[name]) / 2 for name in raw_before}
            row |= {"raw": max(raw.values()), "raw_default": raw["1 stream x all threads"],
                    "server_cpu": server_cpu / row["wall"], "server_ms": 1000 * server_cpu / row["requests"],
                    "loop_ms": 1000 * loop_cpu / row["requests"],
                    "client_ms": 1000 * row["client_cpu"] * row["wall"] / row["requests"],
                    "batch": (after[0] - batches[0]) / max(after[1] - batches[1], 1)}
            rows.append(row)
        mixed = rows.pop()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        tmp.cleanup()

    print(f"\nmodel {export.name}: input {list(export.input_shape)}, {len(export.classes)} classes, "
          f"{args.image_format.upper()} requests; server --workers {args.workers}; "
          f"{cores} CPUs shared by the load generator and the server")
    print(f"raw in-process ORT at batch {args.max_batch}: "
          + ", ".join(f"{name} {value:.0f} img/s" for name, value in first_raw.items())
          + f" (batch 1: {raw_batch1:.0f} img/s); both re-measured before and after each level")
    print("\n'vs raw' divides by the better raw layout, 'vs 1-stream raw' by one session call using every core.")
    print("\n| run | concurrency | requests | req/s | raw img/s | vs raw | vs 1-stream raw | p50 ms | p95 ms | p99 ms "
          "| avg batch | server CPU | server ms/req | loop ms/req | client ms/req | 5xx | wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in [("valid", r) for r in rows] + [("20% malformed, half v2", mixed)]:
        print(f"| {name} | {r['concurrency']} | {r['requests']} | {r['throughput']:.0f} | {r['raw']:.0f} | "
              f"{r['throughput'] / r['raw']:.2f} | {r['throughput'] / r['raw_default']:.2f} | "
              f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
              f"{r['batch']:.1f} | {r['server_cpu']:.0%} | {r['server_ms']:.3f} | {r['loop_ms']:.3f} | "
              f"{r['client_ms']:.3f} | {r['5xx']} | {r['wrong']} |")
    print(f"\nstatus counts of the malformed run: {dict(sorted(mixed['statuses'].items()))}")
    failed = mixed["5xx"] or any(r["wrong"] or r["5xx"] for r in rows) or mixed["wrong"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
