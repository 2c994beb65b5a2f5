"""One loader per runtime, shared by export, verify, bench, predict and serve; TensorFlow is imported only by
:func:`load_savedmodel`, when it runs.

Every loader returns a :class:`Predictor`: ``predictor(batch) -> probabilities`` on float32 (N, H, W, 3) raw pixels,
with ``inputs`` and ``outputs`` describing the artifact's tensors (name, shape with None for dynamic dimensions,
dtype; LiteRT adds quantization parameters). A missing runtime package is a one-line UserError naming it.

A loader takes an :class:`export.contract.Artifact` (read once, hashed: what export.formats.load_format hands it) or
a path, which it reads once into one; either way the runtime is opened from the bytes read (ONNX Runtime and LiteRT
from memory, TensorFlow from the artifact's private copy), and ``Predictor.sha256`` is theirs.

An artifact is data: before a SavedModel (or a TFLite model with TensorFlow "Flex" ops) is loaded, its graph is
scanned for ops that reach outside the model (files, Python, the network: :func:`transfer.layers.unsafe_ops`, the
check of TF Hub modules) and one that has any is refused with :class:`ReachesOutside`, a one-line UserError (exit 2)
that export, verify, bench, predict and serve let through, so nothing of it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.contract import Artifact
from transfer.errors import UserError


class ReachesOutside(UserError):
    """An artifact whose graph runs ops that reach outside the model: refused unloaded, wherever it is loaded."""


def refuse_outside_ops(path, ops: set[str]) -> None:
    """Raise ReachesOutside for the artifact at ``path`` when ``ops`` (its ops that reach outside) is not empty."""
    if ops:
        shown = ", ".join(sorted(ops)[:5]) + (f" and {len(ops) - 5} more" if len(ops) > 5 else "")
        raise ReachesOutside(f"{path} is not loaded: its graph runs ops that reach outside the model ({shown}); an "
                             "export directory is data, so re-export it with `transfer export RUN_DIR`")


def tflite_outside_ops(source) -> set[str]:
    """The TensorFlow ops a TFLite model (its bytes, or a path) runs through the Flex delegate (custom ops
    ``Flex<Op>``) that reach outside the model, by the same pattern as :func:`transfer.layers.unsafe_ops`;
    ``{"<unreadable model>"}`` for a file whose operator codes cannot be read while it has Flex ops."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if b"Flex" not in data:  # no Flex op at all: builtin ops only reach the model's own tensors
        return set()
    from transfer.layers import _UNSAFE_OP  # (imports TensorFlow: only for a model that may have Flex ops)

    try:
        from ai_edge_litert import schema_py_generated as schema

        model = schema.Model.GetRootAsModel(data, 0)
        codes = [model.OperatorCodes(i).CustomCode() or b"" for i in range(model.OperatorCodesLength())]
    except Exception:  # any parse failure: a model we cannot inspect is not trusted
        return {"<unreadable model>"}
    flex = {code[4:].decode("latin-1") for code in codes if code.startswith(b"Flex")}
    return {op for op in flex if _UNSAFE_OP.search(op) or not op}


class Predictor:
    """A loaded artifact: ``predict(batch_float32) -> probabilities``, plus its input/output descriptions.

    ``session`` is the runtime object underneath (an ONNX Runtime session, a LiteRT interpreter, a SavedModel),
    kept alive with the predictor; ``sha256`` is the digest of the bytes it was loaded from (export.contract.Artifact);
    ``keep`` holds what the runtime may still read (a SavedModel's private copy).
    """

    def __init__(self, fn: Callable, inputs: list[dict], outputs: list[dict], session: Any = None,
                 sha256: str | None = None, keep: Any = None):
        self._fn = fn
        self.inputs = inputs
        self.outputs = outputs
        self.session = session
        self.sha256 = sha256
        self.keep = keep

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)


@dataclass(frozen=True)
class Runtime:
    """An inference runtime: the package it needs and its loader ``(artifact or path, num_threads=None) ->
    Predictor``."""

    name: str
    package: str  # what to pip install
    load: Callable[..., Predictor]
    process_wide_threads: bool = False  # its thread count is set once per process, not per loaded model


@contextlib.contextmanager
def native_output_logged(*fds: int):
    """What native code writes to file descriptors ``fds`` (1: stdout, 2: stderr) meanwhile goes to the debug log
    instead. TensorFlow Lite's C++ prints with stdio, which ``sys.stdout``/``contextlib.redirect_stdout`` cannot catch:
    "fully_quantize: 0, ..." while calibrating, "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every
    interpreter, in the middle of export's table and predict's output."""
    streams = {1: sys.stdout, 2: sys.stderr}
    with contextlib.ExitStack() as stack:
        saved = {}
        for fd in fds:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                streams[fd].flush()
            try:
                saved[fd] = os.dup(fd)
            except OSError:  # no such descriptor (an embedding without stdio): nothing to redirect
                continue
            sink = stack.enter_context(tempfile.TemporaryFile())
            os.dup2(sink.fileno(), fd)
            saved[fd] = (saved[fd], sink)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL(None).fflush(None)  # C stdio buffers, before the descriptors are put back
            for fd, (old, sink) in saved.items():
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    streams[fd].flush()
                os.dup2(old, fd)
                os.close(old)
                sink.seek(0)
                text = sink.read().decode(errors="replace").strip()
                if text:
                    logging.getLogger("transfer").debug("native output on fd %d: %s", fd, text)


def _dims(shape) -> list[int | None]:
    """Dynamic dimensions (None, -1, symbolic names) as None, the others as ints."""
    return [None if d in (None, -1) or isinstance(d, str) else int(d) for d in shape]


def describe(name: str, shape, dtype) -> dict:
    """A tensor as the manifest records it: name, shape (None for dynamic dimensions), NumPy dtype name."""
    return {"name": name, "shape": _dims(shape), "dtype": np.dtype(dtype).name}


def _missing(package: str, what: str) -> UserError:
    return UserError(f"{what} needs {package}, which is not installed: pip install {package}")


def read_once(source) -> Artifact:
    """``source`` as an Artifact: itself, or the path read once (no sha256 is checked here: ExportDir.read_artifact
    checks it against the manifest)."""
    return source if isinstance(source, Artifact) else Artifact.read(source)


# ---------------------------------------------------------------------------------------------- ONNX Runtime

# ONNX Runtime's type strings for the tensor types it reports
_ORT_DTYPES = {"float": "float32", "double": "float64", "float16": "float16", "int8": "int8", "uint8": "uint8",
               "int16": "int16", "uint16": "uint16", "int32": "int32", "int64": "int64", "bool": "bool"}


def _ort_dtype(type_string: str) -> str:
    inner = type_string.removeprefix("tensor(").removesuffix(")")
    return _ORT_DTYPES.get(inner, inner)


def load_onnx(source, num_threads: int | None = None, options=None) -> Predictor:
    """An ONNX file (an Artifact or a path, read once) in ONNX Runtime on the CPU, opened from its bytes;
    ``options`` (an ``ort.SessionOptions``) overrides the defaults."""
    artifact = read_once(source)
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise _missing("onnxruntime", "the onnx format") from exc

    if options is None:
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
    session = ort.InferenceSession(artifact.content, options, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    in_name, out_name = inputs[0].name, outputs[0].name

    def predict(batch):
        return session.run([out_name], {in_name: batch})[0]

    def side(values):
        return [{"name": v.name, "shape": _dims(v.shape), "dtype": _ort_dtype(v.type)} for v in values]

    return Predictor(predict, side(inputs), side(outputs), session, artifact.sha256)


# ---------------------------------------------------------------------------------------------- LiteRT


def _quantization(detail: dict) -> dict:
    q = detail.get("quantization_parameters") or {}
    scales, zeros = q.get("scales", []), q.get("zero_points", [])
    return {"scale": [float(s) for s in scales], "zero_point": [int(z) for z in zeros]}


def _interpreter(artifact: Artifact, num_threads: int | None = None):
    # scanned before LiteRT (and its Flex delegate) reads it: the same bytes LiteRT is then given
    refuse_outside_ops(artifact.path, tflite_outside_ops(artifact.content))
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise _missing("ai-edge-litert", "the TFLite runtime") from exc
    with native_output_logged(2):  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interpreter = Interpreter(model_content=artifact.content, num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter


def load_tflite(source, num_threads: int | None = None) -> Predictor:
    """A TFLite file (an Artifact or a path, read once) in the LiteRT interpreter, opened from its bytes; the batch
    is resized to each call's, integer-quantized inputs and outputs are (de)quantized here with the tensors' scale and
    zero point."""
    artifact = read_once(source)
    interpreter = _interpreter(artifact, num_threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    state = {"batch": int(inp["shape"][0])}

    def predict(batch):
        if batch.shape[0] != state["batch"]:
            interpreter.resize_tensor_input(inp["index"], list(batch.shape), strict=False)
            interpreter.allocate_tensors()
            state["batch"] = batch.shape[0]
        scale, zero = inp["quantization"]
        if np.issubdtype(inp["dtype"], np.integer) and scale:
            info = np.iinfo(inp["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"], copy=False))
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        scale, zero = out["quantization"]
        if np.issubdtype(result.dtype, np.integer) and scale:
            result = (result.astype(np.float32) - zero) * scale
        return result

    def side(details):
        return [{**describe(d["name"], d["shape_signature"], d["dtype"]), "quantization": _quantization(d)}
                for d in details]

    return Predictor(predict, side(interpreter.get_input_details()), side(interpreter.get_output_details()),
                     interpreter, artifact.sha256)


def int8_boundaries(path: Path) -> dict:
    """Scale/zero-point of the int8 tensors right after the input and right before the output of a TFLite file
    (float I/O models quantize and dequantize at the edges, so the interface tensors carry no parameters)."""
    interpreter = _interpreter(read_once(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    first = last = None
    for op in interpreter._get_ops_details():  # private, but the only way to walk the graph's edges
        if inp in op["inputs"] and first is None:
            first = op["outputs"][0] if op["op_name"] == "QUANTIZE" else inp
        if out in op["outputs"]:
            last = op["inputs"][0] if op["op_name"] == "DEQUANTIZE" else out

    def params(index):
        if index is None:
            return None
        t = tensors[index]
        q = t["quantization_parameters"]
        return {"tensor": t["name"], "dtype": np.dtype(t["dtype"]).name,
                "scale": [float(s) for s in q["scales"]], "zero_point": [int(z) for z in q["zero_points"]]}

    return {"input": params(first), "output": params(last)}


# ---------------------------------------------------------------------------------------------- TensorFlow


def load_savedmodel(source, num_threads: int | None = None) -> Predictor:
    """A SavedModel's serving_default signature in TensorFlow (imported here; its thread count is process-wide,
    set before TensorFlow starts, so ``num_threads`` is not used), loaded from the private copy of the directory
    that was read and hashed (an Artifact, or the path copied once), which lives as long as the predictor."""
    from transfer.layers import unsafe_ops

    artifact = read_once(source)
    path = artifact.path
    refuse_outside_ops(path, unsafe_ops(artifact.location))  # before TensorFlow reads a byte of it
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise _missing("tensorflow", "the savedmodel format") from exc

    loaded = tf.saved_model.load(artifact.location)
    serve = loaded.signatures.get("serving_default")
    if serve is None:
        raise UserError(f"{path} has no serving_default signature; re-export it with `transfer export`")
    (in_name, in_spec), = serve.structured_input_signature[1].items()
    out_name, out_spec = next(iter(serve.structured_outputs.items()))

    def predict(batch):
        return serve(**{in_name: tf.constant(batch)})[out_name].numpy()

    return Predictor(predict, [describe(in_name, in_spec.shape.as_list(), in_spec.dtype.as_numpy_dtype)],
                     [describe(out_name, out_spec.shape.as_list(), out_spec.dtype.as_numpy_dtype)], loaded,
                     artifact.sha256, artifact)


ONNXRUNTIME = Runtime("onnxruntime", "onnxruntime", load_onnx)
LITERT = Runtime("litert", "ai-edge-litert", load_tflite)
TENSORFLOW = Runtime("tensorflow", "tensorflow", load_savedmodel, process_wide_threads=True)
