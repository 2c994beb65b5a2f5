"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API): what a served model looks like in it, and its
inference requests and responses, JSON and the binary tensor data extension, every failure an ApiError. The routes
are in serve/routes/ (infer in inference.py, metadata in models.py, health in operations.py); docs/serve.md has the
protocol as this server speaks it.

A model has one version, ``1`` (an export directory is one model), or those of its numbered version folders in a
model repository (serve/repo.py), and two inputs, one of which a request sends:
``image``, FP32 pixels ``[N, H, W, 3]`` 0..255 at the model's input size (what ``:predict`` takes), and
``image_bytes``, BYTES ``[N]`` (or ``[N, 1]``) of encoded images, decoded and checked exactly like ``:classify``'s.
Its one output, ``probabilities`` (FP32 ``[N, classes]``), comes back as Triton's top-k ``"score:index:label"``
BYTES strings when the request asks for it with ``{"parameters": {"classification": k}}``.

A body is a JSON header, then (with the binary extension, its length in the ``Inference-Header-Content-Length``
header) the binary data of the tensors that say ``"parameters": {"binary_data_size": n}``, in the order of the
tensors. In JSON, FP32 data is a flat or nested list of numbers and BYTES data a list of base64 strings (images are
not UTF-8 text); binary BYTES data is Triton's: each element a little-endian uint32 length and its bytes.
``parse_header`` runs where serve.jsonparse.parse_body puts it (the bulk process for large headers), after the same
array count that guards ``:predict``; ``attach_binary`` then takes the tensors' bytes from the rest of the body.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from serve.errors import ApiError, whole_number
from serve.jsonparse import _check_arrays, _check_count, _pixels, parse_json

VERSION = "1"  # the version of an export directory served on its own
PLATFORM = "onnxruntime_onnx"
OUTPUT = "probabilities"
BYTES_SUFFIX = "_bytes"  # the encoded-images input is the pixel input's name plus this
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "classification")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def model_inputs(input_name: str, shape: tuple[int, int, int]) -> list[dict]:
    """The inputs of a model in its metadata; a request sends one of them."""
    return [{"name": input_name, "datatype": "FP32", "shape": [-1, *shape]},
            {"name": input_name + BYTES_SUFFIX, "datatype": "BYTES", "shape": [-1]}]


def model_metadata(name: str, input_name: str, shape: tuple[int, int, int], classes: int,
                   versions: list[str] | None = None) -> dict:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs."""
    return {"name": name, "versions": versions or [VERSION], "platform": PLATFORM,
            "inputs": model_inputs(input_name, shape),
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}]}


@dataclass
class Output:
    """A requested output: as binary data or JSON, as probabilities or top-``classification`` strings."""

    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """A parsed inference request: its id, its one input (pixels or encoded images, or still in the binary part of
    the body: ``binary_size``) and the outputs it asks for."""

    id: str | None
    name: str
    datatype: str
    shape: list[int]
    pixels: np.ndarray | None = None
    blobs: list[bytes] | None = None
    binary_size: int | None = None
    outputs: list[Output] = field(default_factory=list)


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ApiError(400, "invalid_request", f'{what} "parameters" must be an object')
    if any(key in params for key in _SHARED_MEMORY):
        raise ApiError(400, "invalid_request", "the shared-memory extension is not supported; send the tensor's data")
    return params


def _flag(params: dict, key: str, what: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_parameter", f'{what} parameter "{key}" must be true or false')
    return value


def _outputs(payload: dict) -> list[Output]:
    binary_default = _flag(_parameters(payload, "the request's"), "binary_data_output", "the request's")
    requested = payload.get("outputs")
    if requested is None:
        return [Output(binary_default)]
    if not isinstance(requested, list) or not requested:
        raise ApiError(400, "invalid_request", f'"outputs" must be a non-empty list of {{"name": "{OUTPUT}"}}')
    outputs = []
    for out in requested:
        if not isinstance(out, dict) or out.get("name") != OUTPUT:
            name = out.get("name") if isinstance(out, dict) else out
            raise ApiError(400, "unknown_output", f"unknown output {name!r}; the model's output is {OUTPUT!r}")
        params = _parameters(out, f"output {OUTPUT!r}")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ApiError(400, "invalid_parameter", f'"classification" must be a whole number >= 0, got {k!r}')
        outputs.append(Output(_flag(params, "binary_data", f"output {OUTPUT!r}", binary_default), k))
    if len(outputs) > 1:
        raise ApiError(400, "invalid_request", f"output {OUTPUT!r} is requested more than once")
    return outputs


def _shape(tensor: dict, input_name: str, shape: tuple[int, int, int], max_images: int) -> list[int]:
    """The input's declared shape, checked against the model's: [N, H, W, 3] pixels or [N] / [N, 1] images."""
    declared = tensor.get("shape")
    if not isinstance(declared, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in declared):
        raise ApiError(400, "invalid_shape", f'input {tensor["name"]!r} needs a "shape": a list of whole numbers')
    if tensor["name"] == input_name:
        expected = f"[N, {', '.join(map(str, shape))}]"
        ok = len(declared) == 4 and tuple(declared[1:]) == shape
    else:
        expected = "[N] or [N, 1]"
        ok = len(declared) in (1, 2) and declared[1:] in ([], [1])
    if not ok:
        raise ApiError(400, "invalid_shape", f"input {tensor['name']!r} must be shaped {expected} (the model's input "
                       f"size), got {declared}")
    _check_count(max(declared[0], 0), max_images)
    return declared


def _images_from_json(data: object, count: int, what: str) -> list[bytes]:
    """Base64 strings of a JSON BYTES tensor (flat, or nested one level: [N, 1]) as image bytes."""
    if isinstance(data, list) and data and all(isinstance(d, list) and len(d) == 1 for d in data):
        data = [d[0] for d in data]
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ApiError(400, "invalid_request", f"{what}: JSON BYTES data must be a list of base64 strings")
    if len(data) != count:
        raise ApiError(400, "invalid_shape", f"{what} holds {len(data)} elements; its shape says {count}")
    blobs = []
    for i, text in enumerate(data):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "invalid_base64", f"{what} element {i} is not valid base64: {exc}") from exc
    return blobs


def _pixels_of(array: object, declared: list[int], what: str) -> np.ndarray:
    """FP32 data (flat or nested, JSON lists or a binary buffer's array) as a checked (N, H, W, 3) float32 batch."""
    pixels = _pixels(array, what)
    if pixels.size != int(np.prod(declared)):
        raise ApiError(400, "invalid_shape", f"{what} holds {pixels.size} values; its shape {declared} needs "
                       f"{int(np.prod(declared))}")
    return pixels.reshape(declared)


def parse_header(header: bytes, input_name: str, shape: tuple[int, int, int], max_images: int) -> InferRequest:
    """The JSON header of an inference request (the whole body without the binary extension), checked; JSON tensor
    data converted. A module-level function: serve.jsonparse.parse_body runs large ones in the bulk process."""
    height, width, _ = shape
    _check_arrays(header, max_images * (2 + height + height * width) + 64,
                  f"{max_images} images of [{height}, {width}, 3]", per_number=0.5)
    payload = parse_json(header)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ApiError(400, "invalid_request", 'expected {"inputs": [{"name", "shape", "datatype", "data"}], ...}')
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ApiError(400, "invalid_request", '"id" must be a string')
    outputs = _outputs(payload)
    names = {input_name: "FP32", input_name + BYTES_SUFFIX: "BYTES"}
    inputs = payload["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or not isinstance(inputs[0].get("name"), str) or \
            inputs[0]["name"] not in names:
        given = [t.get("name") if isinstance(t, dict) else t for t in inputs]
        raise ApiError(400, "invalid_request", f"send exactly one input, {input_name!r} (FP32 pixels) or "
                       f"{input_name + BYTES_SUFFIX!r} (BYTES encoded images); got {given}")
    tensor = inputs[0]
    name, datatype = tensor["name"], tensor.get("datatype")
    if datatype != names[name]:
        raise ApiError(400, "invalid_datatype", f"input {name!r} is {names[name]}, got datatype {datatype!r}")
    declared = _shape(tensor, input_name, shape, max_images)
    request = InferRequest(request_id, name, datatype, declared, outputs=outputs)
    params = _parameters(tensor, f"input {name!r}")
    size = params.get("binary_data_size")
    has_data = "data" in tensor
    if (size is None) == (not has_data):
        raise ApiError(400, "invalid_request", f'input {name!r} needs its "data" or, with the binary extension, '
                       '"parameters": {"binary_data_size": n} (not both)')
    what = f"input {name!r}"
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, "invalid_parameter", f'{what}: "binary_data_size" must be a whole number >= 0')
        request.binary_size = size
    elif datatype == "FP32":
        request.pixels = _pixels_of(tensor["data"], declared, what)
    else:
        request.blobs = _images_from_json(tensor["data"], declared[0], what)
    return request


def _split_bytes(data: memoryview, count: int, what: str) -> list[bytes]:
    """Triton's serialized BYTES tensor (each element: little-endian uint32 length, then its bytes) as elements."""
    blobs, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ApiError(400, "invalid_request", f"{what}: binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + n > len(data):
            raise ApiError(400, "invalid_request", f"{what}: binary BYTES element {len(blobs)} is longer than the data")
        blobs.append(bytes(data[offset:offset + n]))  # bytes: the bulk process may decode it
        offset += n
        if len(blobs) > count:
            break
    if len(blobs) != count:
        raise ApiError(400, "invalid_shape", f"{what} holds {len(blobs)}{'+' if offset < len(data) else ''} "
                       f"elements; its shape says {count}")
    return blobs


def split_body(body: bytes, header_length: str | None, max_json_bytes: int) -> tuple[bytes, memoryview]:
    """(JSON header, binary data) of a body, by the ``Inference-Header-Content-Length`` header when there is one; the
    binary data is a view of the body, not a copy."""
    if header_length is None:
        return body, memoryview(b"")
    n = whole_number(header_length)
    if n is None or n > len(body):
        raise ApiError(400, "invalid_request", f"{HEADER_LENGTH}: {header_length[:40]!r} is not a length within the "
                       f"{len(body):,}-byte body")
    if n > max_json_bytes:
        raise ApiError(413, "body_too_large", f"the JSON header exceeds {max_json_bytes:,} bytes (--max-json-mb)")
    return body[:n], memoryview(body)[n:]


def attach_binary(request: InferRequest, data: memoryview) -> None:
    """Take the input's data from the binary part of the body (which must hold exactly what the input declared)."""
    if request.binary_size is None:
        if data:
            raise ApiError(400, "invalid_request", f"{len(data):,} bytes follow the JSON header, but no input has "
                           '"binary_data_size"')
        return
    what = f"input {request.name!r}"
    if len(data) != request.binary_size:
        raise ApiError(400, "invalid_request", f'{what}: "binary_data_size" is {request.binary_size:,} but '
                       f"{len(data):,} bytes follow the JSON header")
    if request.datatype == "FP32":
        if len(data) % 4:
            raise ApiError(400, "invalid_shape", f"{what}: {len(data):,} bytes are not FP32 values")
        request.pixels = _pixels_of(np.frombuffer(data, "<f4"), request.shape, what)
    else:
        request.blobs = _split_bytes(data, request.shape[0], what)


def _classification(probabilities: np.ndarray, k: int, classes: tuple[str, ...]) -> np.ndarray:
    """Triton's classification strings ``"score:index:label"`` (score as C's %f), best first, (N, k) objects."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :min(k, len(classes))]
    scores = np.take_along_axis(probabilities, order, axis=1)
    return np.array([[f"{s:f}:{j}:{classes[j]}".encode() for s, j in zip(row_s, row_j, strict=True)]
                     for row_s, row_j in zip(scores.tolist(), order.tolist(), strict=True)], dtype=object)


def encode_response(request: InferRequest, model: str, probabilities: np.ndarray, classes: tuple[str, ...],
                    version: str = VERSION) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON header."""
    outputs, binary = [], []
    for out in request.outputs:
        if out.classification:
            values = _classification(probabilities, out.classification, classes)
            tensor = {"name": OUTPUT, "datatype": "BYTES", "shape": list(values.shape)}
            if out.binary:
                data = b"".join(struct.pack("<I", len(s)) + s for s in values.ravel())
            else:
                tensor["data"] = [s.decode() for s in values.ravel()]
        else:
            tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
            if out.binary:
                data = np.ascontiguousarray(probabilities, "<f4").tobytes()
            else:
                tensor["data"] = probabilities.ravel().tolist()
        if out.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        outputs.append(tensor)
    answer = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    return (header + b"".join(binary), len(header)) if binary else (header, None)
