"""serve/: the HTTP API over ONNX Runtime, its input safety, batching, auth, model repos and `transfer predict`.

The export served is real: a run trained by `transfer baseline` on red/green/blue folders and exported by the
exporter (serve_fixtures.py), so the metadata and formats checked here are what users get.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import CLASSES, EXPORTED_FORMATS, relabel_copy

from export.contract import ExportDir
from export.formats import FORMATS
from serve.app import create_app
from serve.client import ServeClient, ServeError
from serve.engine import Batcher
from serve.metrics import Metrics
from serve.model import OnnxModel
from serve.settings import Settings
from transfer.errors import UserError
from transfer.images import decode_image

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

ROOT = Path(__file__).resolve().parents[2]


def _png(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Colourful images of varied sizes (so resizing is exercised), not at the model's 32x32."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 24 + 7 * (i % 5), 40 + 3 * (i % 7)
        base = rng.integers(0, 256, 3)
        noise = rng.integers(-40, 40, (h, w, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG announcing ``width`` x ``height`` pixels with a tiny body: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client(export_dir):
    settings = Settings(export_dirs=(str(export_dir),), max_body_bytes=2 * 2**20, max_pixels=1_000_000,
                        max_images=8, max_batch=4)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    red = np.zeros((48, 40, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((30, 50, 3), np.uint8)
    blue[..., 2] = 200
    (d / "red.png").write_bytes(_png(red))
    (d / "blue.jpg").write_bytes(_jpeg(blue))
    # EXIF-rotated RGBA-free photo and a palette image: the decoding rules of training apply.
    rotated = Image.fromarray(_images(1, seed=3)[0])
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(d / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(_images(1, seed=4)[0]).convert("P").save(d / "palette.png")
    return {p.name: p for p in d.iterdir()}


# ---------------------------------------------------------------------------------------------- same answers


def test_classify_png_and_jpeg_match_keras_and_ort(client, exported, files):
    _, model = exported
    for name in ("red.png", "blue.jpg", "rotated.jpg", "palette.png"):
        r = client.post("/v1/models/tiny:classify?top_k=3", content=files[name].read_bytes(),
                        headers={"content-type": "image/png" if name.endswith("png") else "image/jpeg"})
        assert r.status_code == 200, r.text
        served = {p["label"]: p["score"] for p in r.json()["predictions"][0]}
        pixels = decode_image(files[name], (32, 32)).astype(np.float32)[None]
        keras_probs = np.asarray(model(pixels))[0]
        assert list(served) == [CLASSES[i] for i in np.argsort(-keras_probs, kind="stable")]
        np.testing.assert_allclose([served[c] for c in CLASSES], keras_probs, atol=1e-5)
    red = client.post("/v1/models/tiny:classify?top_k=1", content=files["red.png"].read_bytes()).json()
    assert red["predictions"][0][0]["label"] == "red"


def test_multipart_json_b64_and_predict_agree(client, files):
    blobs = [files["red.png"].read_bytes(), files["blue.jpg"].read_bytes()]
    parts = [("files", ("a.png", blobs[0], "image/png")), ("files", ("b.jpg", blobs[1], "image/jpeg"))]
    multi = client.post("/v1/models/tiny:classify?top_k=3", files=parts)
    b64 = client.post("/v1/models/tiny:classify?top_k=3",
                      json={"instances": [{"b64": base64.b64encode(blobs[0]).decode()},
                                          {"image": {"b64": base64.b64encode(blobs[1]).decode()}}]})
    assert multi.status_code == b64.status_code == 200
    assert multi.json()["predictions"] == b64.json()["predictions"]
    pixels = np.stack([decode_image(files[n], 32) for n in ("red.png", "blue.jpg")]).astype(np.float32)
    rows = client.post("/v1/models/tiny:predict", json={"instances": pixels.tolist()})
    cols = client.post("/v1/models/tiny:predict", json={"inputs": {"image": pixels.tolist()}})
    named = client.post("/v1/models/tiny:predict", json={"instances": [{"image": p} for p in pixels.tolist()]})
    assert rows.status_code == cols.status_code == named.status_code == 200
    assert rows.json()["predictions"] == cols.json()["outputs"] == named.json()["predictions"]
    for probs, top in zip(rows.json()["predictions"], multi.json()["predictions"], strict=True):
        assert {CLASSES[i]: p for i, p in enumerate(probs)} == {t["label"]: t["score"] for t in top}


def test_model_listing_status_metadata_health_docs(client, export_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/v1/models").json()["models"] == [
        {"name": "tiny", "state": "AVAILABLE", "classes": 3, "input_shape": [32, 32, 3]}]
    assert client.get("/v1/models/tiny").json()["model_version_status"][0]["state"] == "AVAILABLE"
    meta = client.get("/v1/models/tiny/metadata").json()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["input"]["shape"] == [32, 32, 3]
    assert meta["input"]["dtype"] == "float32" and meta["preprocessing"]["resize_interpolation"] == "bilinear"
    assert meta["model"]["sha256"] == manifest["export"]["formats"]["onnx"]["sha256"]
    assert meta["exported_at"] == manifest["export"]["exported_at"] and meta["exported_at"].startswith("20")
    # the source run by name: the server's absolute training path is not given away
    assert meta["source_run"] == "tiny" == Path(manifest["export"]["source_run"]).name
    assert str(Path(manifest["export"]["source_run"]).parent) not in json.dumps(meta)
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{name}:classify" in spec["paths"] and client.get("/docs").status_code == 200
    params = {p["name"]: p for p in spec["paths"]["/v1/models/{name}:classify"]["post"]["parameters"]}
    assert params["name"]["in"] == "path" and params["top_k"]["schema"]["minimum"] == 1
    assert set(spec["paths"]["/v1/models/{name}:classify"]["post"]["requestBody"]["content"]) == {
        "image/*", "multipart/form-data", "application/json"}


# ---------------------------------------------------------------------------------------------- bad input

_RED = _png(np.tile(np.array([220, 30, 30], np.uint8), (20, 20, 1)))
_JPEG = _jpeg(np.full((64, 64, 3), 90, np.uint8))
_GOOD_PIXELS = np.zeros((1, 32, 32, 3)).tolist()

MALFORMED = {
    "not an image": ("classify", {"content": b"hello, not an image", "headers": {"content-type": "image/png"}}, 400),
    "truncated png": ("classify", {"content": _RED[: len(_RED) // 2], "headers": {"content-type": "image/png"}}, 400),
    "truncated jpeg": ("classify", {"content": _JPEG[: len(_JPEG) // 2], "headers": {"content-type": "image/jpeg"}},
                       400),
    "postscript": ("classify", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                "headers": {"content-type": "image/eps"}}, 400),
    "empty body": ("classify", {"content": b"", "headers": {"content-type": "image/png"}}, 400),
    "empty json": ("classify", {"content": b"", "headers": {"content-type": "application/json"}}, 400),
    "invalid json": ("classify", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    "non-utf8 json": ("predict", {"content": b"\xff\xfe\x00{", "headers": {"content-type": "application/json"}}, 400),
    "deep json": ("predict", {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}}, 400),
    "json not object": ("classify", {"json": [1, 2, 3]}, 400),
    "instances not list": ("classify", {"json": {"instances": "abc"}}, 400),
    "no instances": ("classify", {"json": {"instances": []}}, 400),
    "b64 missing": ("classify", {"json": {"instances": [{"bytes": "x"}]}}, 400),
    "bad base64": ("classify", {"json": {"instances": [{"b64": "***"}]}}, 400),
    "b64 of text": ("classify", {"json": {"instances": [{"b64": base64.b64encode(b"text").decode()}]}}, 400),
    "too many images": ("classify", {"json": {"instances": [{"b64": base64.b64encode(_RED).decode()}] * 9}}, 413),
    "multipart no files": ("classify", {"files": {"field": (None, "value")}}, 400),
    "unsupported type": ("classify", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415),
    "top_k zero": ("classify?top_k=0", {"content": _RED, "headers": {"content-type": "image/png"}}, 422),
    "top_k text": ("classify?top_k=many", {"content": _RED, "headers": {"content-type": "image/png"}}, 422),
    "top_k superscript": ("classify?top_k=%C2%B2", {"content": _RED, "headers": {"content-type": "image/png"}}, 422),
    "predict both keys": ("predict", {"json": {"instances": _GOOD_PIXELS, "inputs": _GOOD_PIXELS}}, 400),
    "predict neither": ("predict", {"json": {"data": _GOOD_PIXELS}}, 400),
    "predict signature": ("predict", {"json": {"instances": _GOOD_PIXELS, "signature_name": "other"}}, 400),
    "wrong shape": ("predict", {"json": {"instances": np.zeros((1, 16, 16, 3)).tolist()}}, 400),
    "wrong channels": ("predict", {"json": {"instances": np.zeros((1, 32, 32, 1)).tolist()}}, 400),
    "flat list": ("predict", {"json": {"instances": [1.0, 2.0]}}, 400),
    "scalar": ("predict", {"json": {"inputs": 3}}, 400),
    "ragged": ("predict", {"json": {"instances": [np.zeros((32, 32, 3)).tolist(), [[1.0]]]}}, 400),
    "strings": ("predict", {"json": {"instances": np.full((1, 32, 32, 3), "1").tolist()}}, 400),
    "booleans": ("predict", {"json": {"instances": np.ones((1, 32, 32, 3), bool).tolist()}}, 400),
    "nested objects": ("predict", {"json": {"instances": [{"image": {"b64": "x"}}]}}, 400),
    "wrong input name": ("predict", {"json": {"inputs": {"pixels": _GOOD_PIXELS}}}, 400),
    "nan": ("predict", {"content": json.dumps({"instances": np.full((1, 32, 32, 3), np.nan).tolist()}).encode(),
                        "headers": {"content-type": "application/json"}}, 400),
    "infinity": ("predict", {"content": b'{"instances": [' + json.dumps(np.zeros((32, 32, 3)).tolist()).encode()
                             .replace(b"0.0", b"Infinity", 1) + b"]}", "headers": {"content-type": "application/json"}},
                 400),
    "float overflow": ("predict", {"content": json.dumps({"inputs": np.full((1, 32, 32, 3), 1e300).tolist()}).encode(),
                                   "headers": {"content-type": "application/json"}}, 400),
    "out of range": ("predict", {"json": {"instances": np.full((1, 32, 32, 3), -5.0).tolist()}}, 400),
    "oversize body": ("classify", {"content": b"\0" * (3 * 2**20), "headers": {"content-type": "image/png"}}, 413),
    "oversize chunked": ("classify", {"content": iter([b"\0" * 2**20] * 3), "headers": {"content-type": "image/png"}},
                         413),
    "bomb header": ("classify", {"content": _png_header_only(30_000, 30_000), "headers": {"content-type": "image/png"}},
                    413),
    "pillow bomb": ("classify", {"content": _png_header_only(60_000, 60_000), "headers": {"content-type": "image/png"}},
                    413),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_gets_4xx_json(client, case):
    action, kwargs, status = MALFORMED[case]
    r = client.post(f"/v1/models/tiny:{action}", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and body["error"] and body["type"]


@pytest.mark.parametrize("path,status", [
    ("/v1/models/nope:classify", 404),
    ("/v1/models/..:classify", 400),
    ("/v1/models/.hidden:classify", 400),
    ("/v1/models/%2e%2e:classify", 400),
    ("/v1/models/..%2F..%2Fetc%2Fpasswd:classify", 404),
    ("/v1/models/a%5Cb:classify", 400),
    ("/v1/models/a%00b:classify", 400),
    ("/v1/models/" + "x" * 300 + ":classify", 400),
])
def test_unknown_and_path_like_model_names(client, path, status):
    r = client.post(path, content=_RED, headers={"content-type": "image/png"})
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_pixel_limit_on_a_real_image(client):
    big = _png(np.zeros((1200, 1000, 3), np.uint8))  # 1.2 MP > the client's 1 MP limit, small on the wire
    r = client.post("/v1/models/tiny:classify", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["type"] == "image_too_large"


def test_request_metrics_keep_label_values_bounded(client):
    for method in ("BREW", "PROPFIND"):  # clients choose methods; each would otherwise become a time series
        assert client.request(method, "/healthz").status_code == 405
    client.post("/v1/models/tiny:classify", content=b"x" * 10)
    text = client.get("/metrics").text
    assert 'serve_requests_total{method="OTHER",route="/healthz",status="405"} 2.0' in text
    assert 'method="BREW"' not in text and 'method="PROPFIND"' not in text
    assert 'serve_requests_total{method="POST",route="/v1/models/{name}:classify",status="400"}' in text


def test_no_5xx_recorded_after_the_matrix(client):
    for case in MALFORMED:
        action, kwargs, _ = MALFORMED[case]
        if not isinstance(kwargs.get("content"), type(iter([]))):
            client.post(f"/v1/models/tiny:{action}", **kwargs)
    text = client.get("/metrics").text
    statuses = [line for line in text.splitlines() if line.startswith("serve_requests_total")]
    assert statuses and not [s for s in statuses if 'status="5' in s]
    assert client.get("/readyz").status_code == 200  # nothing killed the batcher


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("streams", [1, 2])
def test_coalesced_batches_equal_one_by_one(export_dir, streams):
    model = OnnxModel(ExportDir.open(export_dir), threads=1)
    images = [np.asarray(decode_image(io.BytesIO(_png(p)), 32), np.float32) for p in _images(19)]
    singles = [model.run(x[None])[0] for x in images]
    metrics = Metrics()

    async def scenario():
        batcher = Batcher(model, max_batch=8, timeout_s=0.05, metrics=metrics, streams=streams)
        await batcher.start()
        try:
            many = [batcher.infer(x[None]) for x in images[:12]]  # queued together: coalesced
            big = batcher.infer(np.stack(images[12:]))  # 7 images in one request
            split = batcher.infer(np.stack(images))  # 19 images: split into 8 + 8 + 3
            return await asyncio.gather(*many, big, split)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    coalesced = np.concatenate(results[:13])
    np.testing.assert_allclose(coalesced, np.stack(singles), rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[13], np.stack(singles), rtol=0, atol=1e-6)
    sizes = metrics.registry.get_sample_value
    batches = sizes("serve_batch_size_count", {"model": "tiny"})
    assert batches < 12 + 1 + 3  # fewer batches than requests: they were coalesced
    assert sizes("serve_batch_size_bucket", {"model": "tiny", "le": "8.0"}) == batches  # never above max_batch
    assert sizes("serve_batch_size_sum", {"model": "tiny"}) == 38


class _Rendezvous:
    """A stand-in model whose batches finish only when ``parties`` of them run at the same time."""

    name = "rendezvous"

    def __init__(self, parties: int, timeout: float) -> None:
        self.barrier = threading.Barrier(parties, timeout=timeout)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.barrier.wait()
        return batch.reshape(len(batch), -1)[:, :2]


@pytest.mark.parametrize("streams, finishes", [(2, True), (1, False)])
def test_streams_run_batches_at_the_same_time(streams, finishes):
    model = _Rendezvous(parties=2, timeout=5 if finishes else 0.5)
    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)

    async def scenario():
        batcher = Batcher(model, max_batch=1, timeout_s=0.0, metrics=Metrics(), streams=streams)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.infer(images[:1]), batcher.infer(images[1:]), return_exceptions=True)
        finally:
            await batcher.stop()

    first, second = asyncio.run(scenario())
    if finishes:  # two one-image batches met at the barrier: they ran side by side
        np.testing.assert_array_equal(first, images[:1].reshape(1, -1)[:, :2])
        np.testing.assert_array_equal(second, images[1:].reshape(1, -1)[:, :2])
    else:  # one stream: the second batch waits for the first, which waits for a partner that never comes
        assert isinstance(first, threading.BrokenBarrierError)


@pytest.mark.parametrize("cores, overrides, expected", [
    (2, {}, (1, 2)),  # auto: one single-threaded stream per core
    (8, {}, (1, 8)),
    (1, {}, (1, 1)),
    (8, {"workers": 3}, (1, 2)),  # each worker process fills its share of the cores
    (2, {"threads": 2}, (2, 1)),
    (8, {"threads": 2}, (2, 4)),
    (8, {"streams": 2}, (4, 2)),
    (2, {"threads": 1, "streams": 3}, (1, 3)),  # both given: taken as they are
])
def test_parallelism_fills_the_cores(export_dir, cores, overrides, expected):
    assert Settings(export_dirs=(str(export_dir),), **overrides).parallelism(cores) == expected


@pytest.mark.parametrize("cpu_max, cap", [("250000 100000\n", 3), ("50000 100000", 1), ("max 100000", None),
                                          ("garbage", None), (None, None)])
def test_available_cores_follow_a_cgroup_quota(tmp_path, cpu_max, cap):
    from serve.settings import available_cores

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    unlimited = available_cores(str(tmp_path / "absent"))
    assert available_cores(str(path)) == (min(cap, unlimited) if cap else unlimited)


def test_negative_streams_are_refused(export_dir):
    with pytest.raises(UserError, match="streams=-1"):
        Settings(export_dirs=(str(export_dir),), streams=-1)


def test_small_and_large_images_decode_alike(export_dir, monkeypatch):
    """Small images decode on the event loop, large ones in a thread: the answers must not depend on which."""
    import serve.inputs
    import serve.routes.inference

    big = np.kron(_images(1, seed=9)[0], np.ones((10, 10, 1), np.uint8))  # 240x400: above INLINE_PIXELS
    bodies = [_png(big), _png(_images(1, seed=8)[0])]
    assert big.shape[0] * big.shape[1] > serve.routes.inference.INLINE_PIXELS
    model = OnnxModel(ExportDir.open(export_dir))
    offline = model.run(np.stack([decode_image(io.BytesIO(b), 32) for b in bodies]).astype(np.float32))
    answers = {}
    for inline in (0, 10**9):  # everything in the thread pool, then everything on the loop
        monkeypatch.setattr(serve.routes.inference, "INLINE_PIXELS", inline)
        monkeypatch.setattr(serve.inputs, "INLINE_PIXELS", inline)
        with TestClient(create_app(Settings(export_dirs=(str(export_dir),)))) as c:
            answers[inline] = [c.post("/v1/models/tiny:classify?top_k=3", content=b).json()["predictions"][0]
                               for b in bodies]
    assert answers[0] == answers[10**9]
    for answer, probabilities in zip(answers[0], offline, strict=True):
        assert [p["index"] for p in answer] == list(np.argsort(-probabilities, kind="stable")[:3])
        np.testing.assert_allclose([p["score"] for p in answer], np.sort(probabilities)[::-1][:3], atol=1e-6)


def test_request_timeout_is_a_503_and_the_server_recovers(export_dir, monkeypatch):
    settings = Settings(export_dirs=(str(export_dir),), request_timeout_s=0.3)
    fast_run = OnnxModel.run

    def slow_run(self, batch):
        time.sleep(1.0)
        return fast_run(self, batch)

    with TestClient(create_app(settings)) as c:  # warmed up at full speed
        monkeypatch.setattr(OnnxModel, "run", slow_run)
        slow = c.post("/v1/models/tiny:classify", content=_RED)
        assert slow.status_code == 503 and slow.json()["type"] == "timeout" and "0.3 s" in slow.json()["error"]
        monkeypatch.setattr(OnnxModel, "run", fast_run)
        time.sleep(1.0)  # the batch that was already running finishes; its answer has nobody to go to
        ok = c.post("/v1/models/tiny:classify?top_k=1", content=_RED)
        assert ok.status_code == 200 and ok.json()["predictions"][0][0]["label"] == "red"
        assert 'serve_requests_total{method="POST",route="/v1/models/{name}:classify",status="503"} 1.0' in \
            c.get("/metrics").text


def test_concurrent_http_requests_are_batched_and_correct(export_dir, files):
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(export_dirs=(str(export_dir),), max_batch=16, batch_timeout_ms=20)
    blobs = [_png(p) for p in _images(24, seed=5)]
    with TestClient(create_app(settings)) as c:
        alone = [c.post("/v1/models/tiny:classify?top_k=3", content=b).json()["predictions"][0] for b in blobs]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda b: c.post("/v1/models/tiny:classify?top_k=3", content=b).json(), blobs))
        metrics = c.get("/metrics").text
    for one, many in zip(alone, together, strict=True):
        assert [p["label"] for p in one] == [p["label"] for p in many["predictions"][0]]
        np.testing.assert_allclose([p["score"] for p in one], [p["score"] for p in many["predictions"][0]], atol=1e-6)
    assert 'serve_batch_size_count{model="tiny"}' in metrics


# ---------------------------------------------------------------------------------------------- auth, repos, CLI


def test_bearer_auth_on(export_dir):
    settings = Settings(export_dirs=(str(export_dir),), api_key="s3cret")
    with TestClient(create_app(settings)) as c:
        missing = c.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["type"] == "unauthorized"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/models/tiny:classify", content=_RED).status_code == 401
        ok = c.post("/v1/models/tiny:classify", content=_RED, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open


def test_auth_off_by_default(client):
    assert client.get("/v1/models").status_code == 200


def test_model_repository_serves_each_by_name(export_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    relabel_copy(export_dir, repo / "alpha", CLASSES)
    relabel_copy(export_dir, repo / "beta", ("bleu", "vert", "rouge"))
    (repo / "notes").mkdir()  # not an export: ignored
    with TestClient(create_app(Settings(model_repo=str(repo)))) as c:
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["alpha", "beta"]
        a = c.post("/v1/models/alpha:classify?top_k=1", content=_RED).json()["predictions"][0][0]
        b = c.post("/v1/models/beta:classify?top_k=1", content=_RED).json()["predictions"][0][0]
        assert a["index"] == b["index"] and a["score"] == b["score"]
        assert b["label"] == ("bleu", "vert", "rouge")[b["index"]] == "rouge"
        assert c.get("/v1/models/beta/metadata").json()["classes"] == ["bleu", "vert", "rouge"]


def test_bad_exports_are_one_line_user_errors(export_dir, tmp_path):
    with pytest.raises(UserError, match="not an export directory"):
        ExportDir.open(tmp_path)
    broken = relabel_copy(export_dir, tmp_path / "broken", CLASSES)
    (broken / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError, match=r"labels\.txt does not match"):
        ExportDir.open(broken)
    tampered = relabel_copy(export_dir, tmp_path / "tampered", CLASSES)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="sha256"):
        OnnxModel(ExportDir.open(tampered))
    with pytest.raises(UserError, match="a run directory"):
        ExportDir.open(Path(json.loads((export_dir / "manifest.json").read_text())["export"]["source_run"]))
    with pytest.raises(UserError, match="nothing to serve"):
        Settings()
    from serve.cli import main

    assert main([str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("fmt", EXPORTED_FORMATS)
def test_transfer_predict_agrees_with_server(client, export_dir, files, fmt, capsys):
    """Every format row the manifest lists runs locally and agrees with the server within the row's thresholds."""
    from transfer.cli import main

    names = ["red.png", "blue.jpg", "rotated.jpg"]
    assert main(["predict", str(export_dir), *(str(files[n]) for n in names), "--format", fmt, "--json"]) == 0
    local = json.loads(capsys.readouterr().out)["predictions"]
    for name, row in zip(names, local, strict=True):
        served = client.post("/v1/models/tiny:classify?top_k=3", content=files[name].read_bytes()).json()
        scores = {p["label"]: p["score"] for p in served["predictions"][0]}
        np.testing.assert_allclose(row["probabilities"], [scores[c] for c in CLASSES],
                                   atol=FORMATS[fmt].thresholds.max_abs_diff)
        assert row["top_k"][0]["label"] == served["predictions"][0][0]["label"]


def test_transfer_predict_errors(export_dir, tmp_path, capsys):
    from transfer.cli import main

    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["predict", str(export_dir), str(tmp_path / "bad.png")]) == 2
    assert main(["predict", str(export_dir), str(tmp_path / "bad.png"), "--format", "coreml"]) == 2
    assert main(["predict", str(export_dir), str(tmp_path / "bad.png"), "--format", "tflite_int8"]) == 2
    err = capsys.readouterr().err
    assert "could not be decoded" in err and "unknown format 'coreml'" in err
    assert "has no tflite_int8 model" in err and "--formats tflite_int8" in err


_NO_TENSORFLOW = """
import sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
import serve.app, serve.cli, serve.client, serve.engine, serve.model, serve.predict
import export.contract, export.formats, export.runtimes, export.bench, export.verify, export.cli
assert not loaded(), loaded()
from transfer.cli import main
for fmt in sys.argv[3:]:
    assert main(["predict", sys.argv[1], sys.argv[2], "--format", fmt]) == 0, fmt
assert not loaded(), loaded()
"""


def test_serve_and_predict_do_not_import_tensorflow(export_dir, files):
    """What serve imports, and `transfer predict` on the LiteRT and ONNX formats, never load TensorFlow."""
    formats = [f for f in EXPORTED_FORMATS if FORMATS[f].runtime.name != "tensorflow"]
    done = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, str(export_dir), str(files["red.png"]), *formats],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("red.png: red") == len(formats) == 3


# ---------------------------------------------------------------------------------------------- real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_process_smoke(export_dir, files):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "serve", str(export_dir), "--port", str(port), "--max-batch", "8",
                             "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        api = ServeClient(f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 60
        while not api.health():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        before = api.metrics()
        png = api.classify("tiny", files["red.png"], top_k=2)
        jpg = api.classify("tiny", files["blue.jpg"].read_bytes(), top_k=2)
        both = api.classify("tiny", [files["red.png"], files["blue.jpg"]], top_k=2)
        assert png[0][0]["label"] == "red" and both == [png[0], jpg[0]]
        with pytest.raises(ServeError) as err:
            api.classify("tiny", b"garbage")
        assert err.value.status == 400 and err.value.kind == "invalid_image"
        after = api.metrics()
        route = 'serve_requests_total{method="POST",route="/v1/models/{name}:classify",status="200"}'
        assert route not in before and f"{route} 3.0" in after
        assert 'serve_images_total{model="tiny"} 4.0' in after
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read().decode()
