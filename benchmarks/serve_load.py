"""Load test of `transfer serve` on loopback: throughput and latency percentiles at several concurrencies against raw
in-process ONNX Runtime throughput, then a run with malformed requests mixed in (expects zero 5xx).

    python benchmarks/serve_load.py [--export DIR] [--requests 400] [--seconds 20]

Without --export it builds a small CNN export (64x64 input) with tests/serve_fixtures.py (needs TensorFlow once).
Bounded: at most --requests requests and --seconds seconds per level; the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serve.inputs import decode_all  # noqa: E402
from serve.model import OnnxModel, read_export  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: tuple[int, int]) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-50, 50, (*size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


MALFORMED = [
    (b"definitely not an image", "image/png"),
    (b"", "image/png"),
    (b'{"instances": [{"b64": "***"}]}', "application/json"),
    (b"{broken json", "application/json"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
]


def raw_throughput(model: OnnxModel, batch: int, seconds: float = 3.0) -> float:
    """Images per second of session.run at ``batch`` in this process."""
    x = np.random.default_rng(0).uniform(0, 255, (batch, *model.export.input_shape)).astype(np.float32)
    model.run(x)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(x)
        done += batch
    return done / (time.perf_counter() - start)


async def load(url: str, blobs: list[bytes], expected: list[tuple[str, float]], concurrency: int, requests: int,
               seconds: float, malformed: float = 0.0) -> dict:
    import httpx

    rng = np.random.default_rng(concurrency)
    plan = [("bad", int(rng.integers(len(MALFORMED)))) if rng.random() < malformed else ("ok", i % len(blobs))
            for i in range(requests)]
    latencies, statuses, wrong = [], {}, 0
    cursor = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker():
            nonlocal cursor, wrong
            while cursor < len(plan) and time.monotonic() < deadline:
                kind, i = plan[cursor]
                cursor += 1
                body, ctype = (blobs[i], "image/png") if kind == "ok" else MALFORMED[i]
                t0 = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": ctype})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if kind == "ok":
                    latencies.append(time.perf_counter() - t0)
                    top = r.json()["predictions"][0][0] if r.status_code == 200 else None
                    if top is None or top["label"] != expected[i][0] or abs(top["score"] - expected[i][1]) > 1e-5:
                        wrong += 1
                elif r.status_code < 400 or r.status_code >= 500:
                    wrong += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "valid": len(latencies),
            "throughput": len(latencies) / wall, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "statuses": statuses, "wrong": wrong,
            "5xx": sum(v for k, v in statuses.items() if k >= 500)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export directory to serve (default: build a small CNN export)")
    parser.add_argument("--requests", type=int, default=400, help="requests per level (bound)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per level (bound)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    if args.export:
        export_dir = Path(args.export)
    else:
        from serve_fixtures import build_export

        export_dir = build_export(Path(tmp.name) / "bench", size=(64, 64), formats=("onnx",), width=16, blocks=3)
    export = read_export(export_dir)
    model = OnnxModel(export, threads=args.threads)
    blobs = _images(64, export.size)
    probs = model.run(decode_all(blobs, export.size, 10**8))
    expected = [(export.classes[int(p.argmax())], float(p.max())) for p in probs]
    raw = {b: raw_throughput(model, b) for b in (1, args.max_batch)}
    raw_with_decode_start = time.perf_counter()
    for i in range(0, len(blobs), args.max_batch):
        model.run(decode_all(blobs[i:i + args.max_batch], export.size, 10**8))
    raw_decode = len(blobs) / (time.perf_counter() - raw_with_decode_start)

    port = _free_port()
    cmd = [sys.executable, "-m", "serve", str(export_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--batch-timeout-ms", str(args.batch_timeout_ms),
           "--threads", str(args.threads), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        from serve.client import ServeClient

        api, deadline = ServeClient(f"http://127.0.0.1:{port}"), time.monotonic() + 60
        while not api.health():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models/{export.name}:classify?top_k=1"
        asyncio.run(load(url, blobs, expected, 4, 40, 10))  # warm connections and caches
        rows = []
        for c in [int(c) for c in args.concurrency.split(",")] + [-32]:
            # Raw throughput re-measured next to each level: the machine's other load changes over a run.
            raw_now = raw_throughput(model, args.max_batch, 2.0)
            rows.append(asyncio.run(load(url, blobs, expected, abs(c), args.requests, args.seconds,
                                         malformed=0.2 if c < 0 else 0.0)) | {"raw": raw_now})
        mixed = rows.pop()
        batches = [line for line in api.metrics().splitlines() if line.startswith("serve_batch_size_")
                   and ("_sum" in line or "_count" in line)]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        tmp.cleanup()

    best_raw = raw[args.max_batch]
    print(f"\nmodel {export.name}: input {list(export.input_shape)}, {len(export.classes)} classes; "
          f"{os.cpu_count()} CPUs shared by load generator and server")
    print(f"raw in-process ORT: {raw[1]:.0f} img/s at batch 1, {best_raw:.0f} img/s at batch {args.max_batch}; "
          f"PNG decode + ORT: {raw_decode:.0f} img/s")
    print("\n| run | concurrency | requests | req/s | raw img/s | vs raw | p50 ms | p95 ms | p99 ms | 5xx | wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in [("valid", r) for r in rows] + [("20% malformed", mixed)]:
        print(f"| {name} | {r['concurrency']} | {r['requests']} | {r['throughput']:.0f} | {r['raw']:.0f} | "
              f"{r['throughput'] / r['raw']:.2f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
              f"{r['5xx']} | {r['wrong']} |")
    print(f"\nstatus counts of the malformed run: {dict(sorted(mixed['statuses'].items()))}")
    print("batch sizes: " + "; ".join(batches))
    failed = mixed["5xx"] or any(r["wrong"] or r["5xx"] for r in rows) or mixed["wrong"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
