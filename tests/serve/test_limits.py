"""serve/ under hostile input: bounded memory per request and per server (header checks before decoding, the decode
and buffer budgets, decoded pixels released at once, the formula of docs/serve.md held on a real server process),
requests in progress capped with a JSON 503, JSON bodies capped and parsed in the bulk process.

Everything here is checked by counts, statuses and bytes; nothing by time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.app import create_app
from serve.limits import DecodeBudget
from serve.model import OnnxModel
from serve.settings import MB, Settings

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

ROOT = Path(__file__).resolve().parents[2]
LINUX_PROC = Path("/proc/self/clear_refs").exists()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int, color_type: int = 0) -> bytes:
    """A PNG announcing ``width`` x ``height`` pixels (colour type 0 L, 2 RGB, 6 RGBA) with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _multipart(blobs: list[bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n" for i, blob in enumerate(blobs)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


_RED = _png(np.tile(np.array([220, 30, 30], np.uint8), (20, 20, 1)))


def _settings(export_dir: Path, **overrides) -> Settings:
    return Settings(export_dirs=(str(export_dir),), **overrides)


# ---------------------------------------------------------------------------------------------- header checks


def test_request_pixels_are_capped_on_the_headers(export_dir):
    settings = _settings(export_dir, max_pixels=1_500_000, max_request_pixels=2_500_000)
    bombs = [_png_header(1000, 1000) for _ in range(3)]  # 1 MP each: fine alone, 3 MP together
    with TestClient(create_app(settings)) as c:
        body, ctype = _multipart(bombs)
        r = c.post("/v1/models/tiny:classify", content=body, headers={"content-type": ctype})
        assert r.status_code == 413 and r.json()["type"] == "too_many_pixels", r.text
        assert "2,500,000" in r.json()["error"] and "image 2" in r.json()["error"]
        b64 = {"instances": [{"b64": base64.b64encode(b).decode()} for b in bombs]}
        r = c.post("/v1/models/tiny:classify", json=b64)
        assert r.status_code == 413 and r.json()["type"] == "too_many_pixels"
        one = c.post("/v1/models/tiny:classify", content=bombs[0], headers={"content-type": "image/png"})
        assert one.status_code == 400 and one.json()["type"] == "invalid_image"  # a header alone: decodes to nothing


def test_multipart_is_refused_without_reading_the_rest_of_the_body(export_dir):
    """The third image's header breaks the request's pixel cap: the server answers before asking for more body."""
    settings = _settings(export_dir, max_pixels=1_500_000, max_request_pixels=2_500_000)
    head, ctype = _multipart([_png_header(1000, 1000) for _ in range(3)])
    head = head[: head.rindex(b"--b0undary--")]  # more parts follow
    filler = _multipart([b"\0" * 60_000])[0][: -len(b"--b0undary--\r\n")]
    chunks = [head] + [filler] * 200
    with TestClient(create_app(settings)) as c:
        async def run():  # run on the app's own event loop (the test client's portal)
            sent, answer = [0], {}

            async def receive():
                if sent[0] < len(chunks):
                    sent[0] += 1
                    return {"type": "http.request", "body": chunks[sent[0] - 1], "more_body": True}
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.start":
                    answer["status"], answer["sent_before"] = message["status"], sent[0]
                    answer["headers"] = dict(message["headers"])
                elif message["type"] == "http.response.body":
                    answer["body"] = answer.get("body", b"") + message.get("body", b"")

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/models/tiny:classify", "raw_path": b"/v1/models/tiny:classify",
                     "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                     "headers": [(b"content-type", ctype.encode()), (b"transfer-encoding", b"chunked")]}
            await c.app(scope, receive, send)
            return answer

        answer = c.portal.call(run)
    assert answer["status"] == 413 and json.loads(answer["body"])["type"] == "too_many_pixels"
    # the third part ends where the next boundary begins, in the second chunk: two read, not the 201
    assert answer["sent_before"] == 2
    assert answer["headers"][b"connection"] == b"close"  # the unread rest of the body is never read


@pytest.mark.parametrize("color_type, mode, refused", [(6, "RGBA", True), (2, "RGB", False)])
def test_an_image_costlier_than_the_decode_budget_is_refused_on_its_header(export_dir, color_type, mode, refused):
    settings = _settings(export_dir, decode_memory_bytes=80 * MB)  # RGBA 2000x2000 costs ~100 MB, RGB ~52 MB
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/models/tiny:classify", content=_png_header(2000, 2000, color_type),
                   headers={"content-type": "image/png"})
    if refused:
        assert r.status_code == 413 and r.json()["type"] == "image_too_large"
        assert mode in r.json()["error"] and "--decode-memory-mb" in r.json()["error"]
    else:
        assert r.status_code == 400 and r.json()["type"] == "invalid_image"  # passed the budget; no pixels to decode


# ---------------------------------------------------------------------------------------------- decoding memory

_PEAK = r"""
import io, json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from serve.inputs import decode_array, read_header
from serve.limits import tune_malloc

tune_malloc()
def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
            if l.startswith(("VmRSS", "VmHWM"))}

N = int(sys.argv[1])
def make(mode, fmt):
    if mode == "I;16":
        image = Image.fromarray(np.full((N, N), 1234, np.uint16))
    elif mode in ("I", "F"):
        image = Image.fromarray(np.full((N, N), 1234, np.int32 if mode == "I" else np.float32))
    elif mode.startswith("P"):
        image = Image.new("RGB", (N, N), (10, 200, 30)).convert("P")
    else:
        image = Image.new(mode, (N, N), {"L": 90, "RGB": (1, 2, 3), "RGBA": (1, 2, 3, 90), "LA": (5, 90),
                                          "CMYK": (1, 2, 3, 4)}[mode])
    buf = io.BytesIO()
    image.save(buf, fmt, **({"transparency": 0} if mode == "P+alpha" else {}))
    return buf.getvalue()

rows = []
for mode, fmt in [("L", "PNG"), ("P", "GIF"), ("P+alpha", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                  ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"), ("CMYK", "JPEG"),
                  ("RGB", "WEBP"), ("RGBA", "WEBP"), ("RGB", "BMP")]:
    data = make(mode, fmt)
    decode_array(data, 0, (32, 32), 10**9)  # plugins imported, first-use buffers made
    cost = read_header(data, 0, (32, 32), 10**9).cost
    Path("/proc/self/clear_refs").write_text("5")
    before = status()["VmRSS"]
    out = decode_array(data, 0, (32, 32), 10**9)
    after = status()
    rows.append({"image": f"{fmt} {mode}", "cost": cost, "peak": after["VmHWM"] - before,
                 "kept": after["VmRSS"] - before, "shape": list(out.shape)})
print(json.dumps(rows))
"""


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc (VmHWM reset through clear_refs)")
def test_decode_cost_bounds_the_real_peak_and_pixels_are_released():
    """Every mode the server decodes peaks below its header's decode_cost, and keeps nothing once resized."""
    n = 2000  # 4 MP: peaks of 24-130 MB, well above the noise
    done = subprocess.run([sys.executable, "-c", _PEAK, str(n)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for row in rows:
        assert row["shape"] == [32, 32, 3]
        assert row["peak"] <= row["cost"], row  # the budget holds to what decoding really takes
        assert row["kept"] < 8 * MB, row  # the decoded pixels are freed before decode_array returns
    rgb = next(r for r in rows if r["image"] == "PNG RGB")
    assert rgb["peak"] > 3 * n * n  # the measurement sees the decode at all


def test_decode_budget_bounds_what_runs_at_once_and_frees_only_finished_work():
    held, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def job(cost: int, wait: bool = False) -> int:
        with lock:
            held[0] += cost
            peak[0] = max(peak[0], held[0])
        if wait:
            release.wait(10)
        else:
            time.sleep(0.02)
        with lock:
            held[0] -= cost
        return cost

    async def scenario():
        budget = DecodeBudget(100, ThreadPoolExecutor(4))
        results = await asyncio.gather(*(budget.run(c, job, c) for c in (60, 60, 30, 30, 90, 10)))
        assert results == [60, 60, 30, 30, 90, 10] and budget.available == 100
        # A request that gives up while its decode runs: the bytes stay taken until the decode is done.
        task = asyncio.ensure_future(budget.run(70, job, 70, True))
        while budget.available == 100:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(budget.run(50, job, 50))  # must wait: 70 + 50 > 100
        await asyncio.sleep(0.05)
        task.cancel()
        waiting.cancel()
        await asyncio.gather(task, waiting, return_exceptions=True)
        assert budget.available == 30  # the running decode still holds its 70; the cancelled waiter took nothing
        release.set()
        while budget.available != 100:
            await asyncio.sleep(0.01)
        return budget.peak_in_use

    assert asyncio.run(scenario()) <= 100
    assert peak[0] <= 100


def test_a_timed_out_request_stops_decoding_its_images(export_dir, monkeypatch):
    """Four large images, a request timeout that passes during the first decode: the other three never start."""
    import serve.routes.inference
    from serve.inputs import decode_array

    calls = []

    def slow_decode(*args):
        calls.append(args[1])
        time.sleep(0.6)
        return decode_array(*args)

    monkeypatch.setattr(serve.routes.inference, "decode_array", slow_decode)
    image = _png(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8))  # above INLINE_PIXELS
    body, ctype = _multipart([image] * 4)
    with TestClient(create_app(_settings(export_dir, request_timeout_s=0.3))) as c:
        r = c.post("/v1/models/tiny:classify", content=body, headers={"content-type": ctype})
        assert r.status_code == 503 and r.json()["type"] == "timeout"
        time.sleep(1.5)  # what would still run after the answer has had time to
        state = c.app.state.serve
        assert state.decode_budget.available == state.decode_budget.total  # the decode in progress gave its bytes back
    assert len(calls) <= 1  # the image in progress at the timeout, at most; not the three behind it


# ---------------------------------------------------------------------------------------------- server-wide caps


def test_buffer_budget_answers_503_with_retry_after(export_dir):
    settings = _settings(export_dir, buffered_bytes=64 * 1024)
    big = _png(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 KB
    assert len(big) > 64 * 1024
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/models/tiny:classify", content=big, headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["type"] == "overloaded" and r.headers["retry-after"] == "1"
        assert r.json()["status"] == 503 and "retry" in r.json()["error"]
        assert c.post("/v1/models/tiny:classify", content=_RED).status_code == 200
        assert c.app.state.serve.buffers.in_use == 0  # every request gave back what it held


def test_requests_beyond_the_cap_get_a_json_503_and_probes_still_answer(export_dir, monkeypatch):
    settings = _settings(export_dir, max_concurrent_requests=1)
    fast_run, gate = OnnxModel.run, threading.Event()

    def gated_run(self, batch):
        gate.wait(20)
        return fast_run(self, batch)

    with TestClient(create_app(settings)) as c:
        monkeypatch.setattr(OnnxModel, "run", gated_run)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/v1/models/tiny:classify", content=_RED)
            state = c.app.state.serve
            deadline = time.monotonic() + 20
            while state.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = c.post("/v1/models/tiny:classify", content=_RED)
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            assert second.json() == {"error": second.json()["error"], "type": "overloaded", "status": 503}
            assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
            gate.set()
            assert first.result(timeout=20).status_code == 200
        assert state.in_flight == 0


# ---------------------------------------------------------------------------------------------- JSON bodies


def test_json_bodies_have_their_own_cap_and_costly_shapes_are_refused_before_parsing(export_dir):
    settings = _settings(export_dir, max_json_bytes=1 * MB)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/models/tiny:predict", content=b"[" * (2 * MB), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-json-mb" in r.json()["error"]
        empty_lists = b'{"instances": [[' + b",".join([b"[]"] * 300_000) + b"]]}"  # 900 KB, 36x to parse
        r = c.post("/v1/models/tiny:predict", content=empty_lists, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "arrays and objects" in r.json()["error"]
        too_many = {"instances": [{"b64": "AA=="}] * 5000}
        r = c.post("/v1/models/tiny:classify", json=too_many)
        assert r.status_code == 400 and r.json()["type"] == "invalid_request"


def test_large_json_and_large_images_go_through_the_bulk_process_with_the_same_answers(export_dir, monkeypatch):
    import serve.limits

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    big = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))  # 300x400
    with TestClient(create_app(_settings(export_dir))) as c:
        # 6 images are ~60 KB of JSON (above INLINE_JSON_BYTES: the bulk process), 1 is ~10 KB (the event loop)
        together = c.post("/v1/models/tiny:predict", json={"instances": pixels.tolist()})
        alone = [c.post("/v1/models/tiny:predict", json={"instances": [p.tolist()]}).json()["predictions"][0]
                 for p in pixels]
        assert together.status_code == 200, together.text
        np.testing.assert_allclose(together.json()["predictions"], alone, atol=1e-6)
        on_thread = c.post("/v1/models/tiny:classify?top_k=3", content=_png(big)).json()
        monkeypatch.setattr(serve.limits, "BULK_DECODE_COST", 0)  # every decode off the loop: the bulk process
        in_bulk = c.post("/v1/models/tiny:classify?top_k=3", content=_png(big)).json()
        assert in_bulk == on_thread
        assert c.app.state.serve.bulk._pool is not None  # it did run there
        bad = c.post("/v1/models/tiny:classify", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 100_000)
        assert bad.status_code == 400  # errors come back from the bulk process as the same JSON


@pytest.mark.parametrize("failure", ["cannot_start", "exits_at_once"])
def test_where_no_bulk_process_can_start_the_server_says_so_and_answers_the_same(export_dir, monkeypatch, caplog,
                                                                                 failure):
    """A sandbox where the server's user cannot start a second interpreter (the resource tracker's pipe breaks, or
    the spawned process exits at once) must not stop the server: one log line, and the same answers from a thread."""
    import multiprocessing

    import serve.bulk
    import serve.limits

    if failure == "cannot_start":
        def refuse(*args, **kwargs):
            raise BrokenPipeError(32, "Broken pipe")

        monkeypatch.setattr(serve.bulk, "ProcessPoolExecutor", refuse)
    else:
        real = multiprocessing.get_context("spawn")

        class ExitsAtOnce:  # a spawn context whose processes run a program that ends before serving any job
            def __getattr__(self, name):
                return getattr(real, name)

            def Process(self, *args, **kwargs):  # the context's own name
                return real.Process(target=os._exit, args=(3,))

        monkeypatch.setattr(serve.bulk.multiprocessing, "get_context", lambda method=None: ExitsAtOnce())
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    big = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))
    with TestClient(create_app(_settings(export_dir))) as c:
        on_loop = c.post("/v1/models/tiny:classify?top_k=3", content=_png(big)).json()
        bulk = c.app.state.serve.bulk
        bulk.start()
        deadline = time.time() + 60
        while not bulk.in_process and time.time() < deadline:  # the exiting process is noticed by the pool's thread
            time.sleep(0.05)
        assert bulk.in_process
        monkeypatch.setattr(serve.limits, "BULK_DECODE_COST", 0)  # every decode goes where the bulk jobs go
        assert c.post("/v1/models/tiny:classify?top_k=3", content=_png(big)).json() == on_loop
        together = c.post("/v1/models/tiny:predict", json={"instances": pixels.tolist()})  # a bulk JSON parse
        alone = c.post("/v1/models/tiny:predict", json={"instances": [pixels[0].tolist()]})
        assert together.status_code == 200 and alone.status_code == 200
        np.testing.assert_allclose(together.json()["predictions"][0], alone.json()["predictions"][0], atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "no bulk process can be started" in r.getMessage()]
    assert len(warnings) == 1, warnings


# ---------------------------------------------------------------------------------------------- the formula


def _proc(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _children(pid: int) -> list[int]:
    return [int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc")
def test_a_real_server_holds_to_its_worst_case_memory_formula(export_dir, tmp_path):
    """Concurrent requests of large images of several modes and a large JSON body against a server with small budgets:
    its peak resident memory and its bulk process's stay within the formula it logs at start (docs/serve.md), and
    the decoded pixels are gone once the requests are answered."""
    from serve.client import ServeClient

    images = {"rgb": _png(np.full((2000, 2000, 3), (200, 40, 40), np.uint8)),  # 52 MB to decode: a thread
              "rgba": _png(np.full((1800, 1800, 4), (40, 200, 40, 128), np.uint8)),  # 81 MB: the bulk process
              "rgb_big": _png(np.full((3000, 2500, 3), (40, 40, 200), np.uint8))}  # 98 MB: the bulk process
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "serve", str(export_dir), "--port", "0", "--decode-memory-mb", "160",
           "--buffered-mb", "32", "--max-json-mb", "2", "--max-connections", "64", "--log-level", "info"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out)
    try:
        deadline, bound, port = time.monotonic() + 60, None, None
        while bound is None:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            text = log.read_text()
            port = port or (re.search(r"on http://127\.0\.0\.1:(\d+)", text) or [None, None])[1]
            found = re.search(r"worst-case memory of this process and its bulk process: (\d+) MB \(([^)]*)\)", text)
            if found:
                bound = {k: int(v) * MB for k, v in (t.split() for t in found[2].split("; ")[0].split(", "))}
            time.sleep(0.1)
        api = ServeClient(f"http://127.0.0.1:{port}", timeout=60)
        assert api.health()
        base = _proc(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")
        pixels = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3)).astype(np.float32)
        json_body = json.dumps({"instances": pixels.tolist()}).encode()  # ~1.3 MB: parsed in the bulk process

        def predict():
            import urllib.request

            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/tiny:predict", data=json_body,
                                             headers={"content-type": "application/json"})
            try:
                return urllib.request.urlopen(request, timeout=60).status
            except urllib.error.HTTPError as exc:
                return exc.code

        jobs = [lambda: api.classify("tiny", [images["rgb"], images["rgb"]], top_k=1),
                lambda: api.classify("tiny", images["rgb"], top_k=1),
                lambda: api.classify("tiny", images["rgba"], top_k=1),
                lambda: api.classify("tiny", images["rgb_big"], top_k=1), predict]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = [f.result(timeout=120) for f in [pool.submit(job) for job in jobs]]
        assert results[-1] == 200
        assert all(len(r) >= 1 for r in results[:-1])
        peak_main = _proc(server.pid, "VmHWM")
        children = _children(server.pid)
        assert children, "the bulk process never started"
        peak_bulk = max(_proc(pid, "VmHWM") for pid in children)
        after = _proc(server.pid, "VmRSS")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    main_terms = bound["decode"] + bound["buffers"] + bound["headers"] + bound["inline"]
    assert peak_main - base <= main_terms, (peak_main, base, bound)
    assert peak_bulk <= bound["bulk_process"] + bound["decode"], (peak_bulk, bound)
    assert after - base < 64 * MB, (after, base)  # nothing decoded is kept once the requests are answered
