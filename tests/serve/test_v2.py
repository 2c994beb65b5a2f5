"""The Open Inference Protocol (KServe v2 / Triton HTTP) driven by Triton's own client library, tritonclient.http,
against a real uvicorn server on loopback serving the real export: health, server and model metadata, FP32 pixels
and BYTES encoded images in, probabilities and Triton's classification strings out, JSON and binary tensor data — the
answers equal to `transfer predict`'s (serve.predict) and to :classify's; client mistakes are 4xx ``{"error": ...}``.
Also KServe V1's ``name``/``ready`` on ``GET /v1/models/{name}``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import CLASSES
from test_hygiene import live_server
from test_serve import _png_header_only

from serve.app import create_app
from serve.predict import decode_files, predict_files
from serve.settings import Settings

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TestClient = pytest.importorskip("fastapi.testclient").TestClient

MODEL, OUTPUT, PIXELS, IMAGES = "tiny", "probabilities", "image", "image_bytes"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("v2images")
    rng = np.random.default_rng(7)
    paths = []
    for i, hue in enumerate([(220, 40, 40), (40, 200, 60), (40, 60, 220)]):
        pixels = np.clip(np.array(hue) + rng.integers(-40, 41, (20 + 3 * i, 28, 3)), 0, 255).astype(np.uint8)
        paths.append(d / f"{i}.png")
        paths[-1].write_bytes(_png(pixels))
    jpeg = d / "3.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    large = d / "4.png"  # above serve.inputs.INLINE_PIXELS: decoded on the decode threads, not the event loop
    Image.fromarray(rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)).save(large, "PNG")
    return [*paths, jpeg, large]


@pytest.fixture(scope="module")
def server(export_dir):
    with live_server(export_dir, max_images=8, max_batch=4, max_pixels=1_000_000) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(server, connection_timeout=30, network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def raw(server):
    with httpx.Client(base_url=f"http://{server}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def expected(export_dir, images) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, probabilities) of the images as `transfer predict` decodes and runs them (ONNX, no server)."""
    export, probabilities = predict_files(export_dir, [str(p) for p in images])
    return decode_files(export, [str(p) for p in images]), probabilities


def _pixel_input(pixels: np.ndarray, binary: bool = True):
    tensor = httpclient.InferInput(PIXELS, list(pixels.shape), "FP32")
    return tensor.set_data_from_numpy(pixels, binary_data=binary)


def _bytes_input(blobs: list[bytes], binary: bool = True):
    data = np.array(blobs if binary else [base64.b64encode(b) for b in blobs], dtype=object)
    tensor = httpclient.InferInput(IMAGES, [len(blobs)], "BYTES")
    return tensor.set_data_from_numpy(data, binary_data=binary)


# ---------------------------------------------------------------------------------------------- health and metadata


def test_health_and_server_metadata(triton, raw):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready(MODEL, "2") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta["name"] and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert raw.get("/v2/health/live").status_code == raw.get("/v2/health/ready").status_code == 200


def test_model_metadata(triton, export_dir):
    meta = triton.get_model_metadata(MODEL)
    assert meta == triton.get_model_metadata(MODEL, "1")
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        PIXELS: ("FP32", [-1, *manifest["input"]["shape"]]), IMAGES: ("BYTES", [-1])}
    assert meta["outputs"] == [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
    for version, status in (("2", "404"), ("latest", "404")):
        with pytest.raises(InferenceServerException) as err:
            triton.get_model_metadata(MODEL, version)
        assert err.value.status() == status and "version" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("nope")
    assert err.value.status() == "404"


# ---------------------------------------------------------------------------------------------- same answers


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_fp32_pixels_equal_transfer_predict(triton, expected, binary_in, binary_out):
    pixels, probabilities = expected
    outputs = [httpclient.InferRequestedOutput(OUTPUT, binary_data=binary_out)]
    result = triton.infer(MODEL, [_pixel_input(pixels, binary_in)], outputs=outputs, request_id="r-1")
    served = result.as_numpy(OUTPUT)
    assert served.dtype == np.float32 and served.shape == probabilities.shape
    np.testing.assert_allclose(served, probabilities, atol=1e-6)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1" and response["id"] == "r-1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_images_equal_transfer_predict_and_classify(triton, raw, expected, images, binary):
    _, probabilities = expected
    blobs = [p.read_bytes() for p in images]
    result = triton.infer(MODEL, [_bytes_input(blobs, binary)], model_version="1")  # default: binary outputs
    served = result.as_numpy(OUTPUT)
    np.testing.assert_allclose(served, probabilities, atol=1e-6)
    for blob, row in zip(blobs, served, strict=True):
        top = raw.post(f"/v1/models/{MODEL}:classify?top_k=3", content=blob).json()["predictions"][0]
        np.testing.assert_allclose([row[t["index"]] for t in top], [t["score"] for t in top], atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_strings(triton, expected, images, binary):
    _, probabilities = expected
    outputs = [httpclient.InferRequestedOutput(OUTPUT, binary_data=binary, class_count=2)]
    result = triton.infer(MODEL, [_bytes_input([p.read_bytes() for p in images])], outputs=outputs)
    strings = result.as_numpy(OUTPUT)
    assert strings.shape == (len(images), 2)
    for row, probs in zip(strings, probabilities, strict=True):
        order = np.argsort(-probs, kind="stable")[:2]
        parsed = [s.decode().split(":") if isinstance(s, bytes) else s.split(":") for s in row]
        assert [int(index) for _, index, _ in parsed] == order.tolist()
        assert [label for _, _, label in parsed] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], probs[order], atol=1e-6)
    everything = triton.infer(MODEL, [_pixel_input(expected[0][:1])],
                              outputs=[httpclient.InferRequestedOutput(OUTPUT, class_count=100)])
    assert everything.as_numpy(OUTPUT).shape == (1, len(CLASSES))  # at most every class, as Triton


def test_plain_json_request(raw, expected):
    """What curl sends: JSON in, JSON out, nested data accepted as well as flat."""
    pixels, probabilities = expected
    body = {"inputs": [{"name": PIXELS, "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.tolist()}]}
    r = raw.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = r.json()["outputs"][0]
    assert out["name"] == OUTPUT and out["datatype"] == "FP32" and out["shape"] == list(probabilities.shape)
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), probabilities, atol=1e-6)


# ---------------------------------------------------------------------------------------------- client mistakes

_RED = _png(np.full((20, 20, 3), (220, 30, 30), np.uint8))
_PIX = np.zeros((1, 32, 32, 3), np.float32)


def _json(inputs: list, **extra) -> dict:
    body = json.dumps({"inputs": inputs, **extra}).encode()
    return {"content": body, "headers": {"content-type": "application/json"}}


def _pixels_json(**changes) -> dict:
    return {"name": PIXELS, "datatype": "FP32", "shape": [1, 32, 32, 3], "data": _PIX.ravel().tolist(), **changes}


def _bytes_json(*blobs: bytes, **changes) -> dict:
    return {"name": IMAGES, "datatype": "BYTES", "shape": [len(blobs)],
            "data": [base64.b64encode(b).decode() for b in blobs], **changes}


def _binary(header: dict, data: bytes, header_length: int | None = None) -> dict:
    text = json.dumps(header).encode()
    return {"content": text + data,
            "headers": {"Inference-Header-Content-Length": str(len(text) if header_length is None else header_length)}}


def _binary_pixels(pixels: np.ndarray, size: int | None = None) -> dict:
    data = pixels.astype("<f4").tobytes()
    tensor = {"name": PIXELS, "datatype": "FP32", "shape": list(pixels.shape),
              "parameters": {"binary_data_size": len(data) if size is None else size}}
    return _binary({"inputs": [tensor]}, data)


def _binary_bytes(elements: bytes, count: int) -> dict:
    tensor = {"name": IMAGES, "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": len(elements)}}
    return _binary({"inputs": [tensor]}, elements)


MALFORMED = {
    "unknown model": ("/v2/models/nope/infer", _json([_pixels_json()]), 404),
    "unknown version": ("/v2/models/tiny/versions/2/infer", _json([_pixels_json()]), 404),
    "bad model name": ("/v2/models/..%5C/infer", _json([_pixels_json()]), 400),
    "bad json": ("", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400),
    "empty body": ("", {"content": b""}, 400),
    "not an object": ("", {"json": [1, 2]}, 400),
    "no inputs": ("", {"json": {"inputs": []}}, 400),
    "two inputs": ("", _json([_pixels_json(), _bytes_json(_RED)]), 400),
    "unknown input": ("", _json([_pixels_json(name="pixels")]), 400),
    "wrong datatype": ("", _json([_pixels_json(datatype="INT32")]), 400),
    "bytes as fp32": ("", _json([_bytes_json(_RED, datatype="FP32")]), 400),
    "wrong shape": ("", _json([_pixels_json(shape=[1, 16, 16, 3])]), 400),
    "shape not list": ("", _json([_pixels_json(shape="1,32,32,3")]), 400),
    "shape vs data": ("", _json([_pixels_json(shape=[2, 32, 32, 3])]), 400),
    "no data": ("", _json([{"name": PIXELS, "datatype": "FP32", "shape": [1, 32, 32, 3]}]), 400),
    "zero images": ("", _json([_pixels_json(shape=[0, 32, 32, 3], data=[])]), 400),
    "too many images": ("", _json([_bytes_json(*[_RED] * 9)]), 413),
    "strings as pixels": ("", _json([_pixels_json(data=["1"] * _PIX.size)]), 400),
    "out of range": ("", _json([_pixels_json(data=[300.0] * _PIX.size)]), 400),
    "undecodable bytes": ("", _json([_bytes_json(b"hello, not an image")]), 400),
    "truncated png": ("", _json([_bytes_json(_RED[: len(_RED) // 2])]), 400),
    "empty image": ("", _json([_bytes_json(b"")]), 400),
    "bad base64": ("", _json([{**_bytes_json(_RED), "data": ["***"]}]), 400),
    "bytes not strings": ("", _json([{**_bytes_json(_RED), "data": [1]}]), 400),
    "too many pixels": ("", _json([_bytes_json(_png_header_only(30_000, 30_000))]), 413),
    "unknown output": ("", _json([_pixels_json()], outputs=[{"name": "logits"}]), 400),
    "bad classification": ("", _json([_pixels_json()], outputs=[{"name": OUTPUT, "parameters": {
        "classification": "3"}}]), 400),
    "shared memory": ("", _json([_pixels_json()], outputs=[{"name": OUTPUT, "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 12}}]), 400),
    "binary size mismatch": ("", _binary_pixels(_PIX, size=100), 400),
    "binary nan": ("", _binary_pixels(np.full((1, 32, 32, 3), np.nan, np.float32)), 400),
    "binary wrong shape": ("", _binary_pixels(np.zeros((1, 32, 32, 1), np.float32)), 400),
    "binary bytes truncated": ("", _binary_bytes(struct.pack("<I", 100) + b"abc", 1), 400),
    "binary bytes count": ("", _binary_bytes(struct.pack("<I", len(_RED)) + _RED, 2), 400),
    "binary undecodable": ("", _binary_bytes(struct.pack("<I", 5) + b"hello", 1), 400),
    "header length past body": ("", _binary({"inputs": [_pixels_json()]}, b"", header_length=10**6), 400),
    "header length text": ("", _binary({"inputs": [_pixels_json()]}, b"", header_length=-1), 400),
    "trailing bytes": ("", _binary({"inputs": [_pixels_json()]}, b"xxxx"), 400),
    "gzip body": ("", {"content": b"\x1f\x8b", "headers": {"content-encoding": "gzip"}}, 415),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_client_mistakes_are_4xx_with_an_error(raw, case):
    path, kwargs, status = MALFORMED[case]
    r = raw.post(path or f"/v2/models/{MODEL}/infer", **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_tritonclient_sees_the_errors(triton):
    """tritonclient raises the server's message and status for a bad request (not a 5xx, not a parse failure)."""
    wrong = httpclient.InferInput(PIXELS, [1, 16, 16, 3], "FP32").set_data_from_numpy(np.zeros((1, 16, 16, 3),
                                                                                               np.float32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, [wrong])
    assert err.value.status() == "400" and "[N, 32, 32, 3]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, [_bytes_input([b"not an image"])])
    assert err.value.status() == "400" and "image 0" in err.value.message()


def test_no_5xx_after_the_mistakes(raw):
    metrics = raw.get("/metrics").text
    bad = [line for line in metrics.splitlines()
           if line.startswith("serve_requests_total") and 'status="5' in line and "/v2" in line]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- auth, KServe V1


def test_api_key_guards_v2_but_not_its_health_probes(export_dir):
    settings = Settings(export_dirs=(str(export_dir),), api_key="sekret")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/v2/health/live").status_code == client.get("/v2/health/ready").status_code == 200
        for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
            assert client.get(path).status_code == 401, path
        r = client.post(f"/v2/models/{MODEL}/infer", **_json([_pixels_json()]))
        assert r.status_code == 401 and r.json()["error"]
        ok = client.post(f"/v2/models/{MODEL}/infer", content=_json([_pixels_json()])["content"],
                         headers={"authorization": "Bearer sekret"})
        assert ok.status_code == 200, ok.text


def test_kserve_v1_name_and_ready(export_dir):
    app = create_app(Settings(export_dirs=(str(export_dir),)))
    starting = TestClient(app, raise_server_exceptions=False)  # no lifespan: models not loaded, not ready
    r = starting.get(f"/v1/models/{MODEL}")
    assert r.status_code == 503 and r.json()["name"] == MODEL and r.json()["ready"] is False
    assert r.headers["retry-after"] and r.json()["error"]
    assert starting.get(f"/v2/models/{MODEL}/ready").status_code == starting.get("/v2/health/ready").status_code == 503
    assert starting.get("/v2/health/live").status_code == 200
    with TestClient(app, raise_server_exceptions=False) as ready:
        body = ready.get(f"/v1/models/{MODEL}").json()
        assert body["name"] == MODEL and body["ready"] is True
        assert body["model_version_status"] == [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
        assert ready.get("/v1/models/nope").status_code == 404
