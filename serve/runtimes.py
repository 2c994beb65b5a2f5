"""Local inference on an export directory for `transfer predict`: one table row per format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.model import Export, OnnxModel, read_export
from transfer.errors import UserError, unknown
from transfer.images import DECODE_ERRORS, decode_image

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 (N, H, W, 3) pixels -> (N, classes) probabilities


def _onnx(export: Export, path: Path) -> Predictor:
    return OnnxModel(export).run


def _tflite(export: Export, path: Path) -> Predictor:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise UserError("--format tflite needs LiteRT: pip install ai-edge-litert") from exc
    interpreter = Interpreter(model_path=str(path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(inp["index"], list(batch.shape))
        interpreter.allocate_tensors()
        scale, zero = inp["quantization"]
        if np.issubdtype(inp["dtype"], np.integer) and scale:  # integer-quantized input
            info = np.iinfo(inp["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        scale, zero = out["quantization"]
        if np.issubdtype(result.dtype, np.integer) and scale:
            result = (result.astype(np.float32) - zero) * scale
        return result.astype(np.float32)

    return run


def _savedmodel(export: Export, path: Path) -> Predictor:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise UserError("--format savedmodel needs TensorFlow; use --format onnx without it") from exc
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise UserError(f"{path} has no serving_default signature")
    (input_key,) = signature.structured_input_signature[1].keys()

    def run(batch: np.ndarray) -> np.ndarray:
        outputs = signature(**{input_key: tf.constant(batch)})
        return next(iter(outputs.values())).numpy()

    return run


@dataclass(frozen=True)
class Runtime:
    """How to run one export format locally."""

    name: str
    default_file: str  # inside the export directory, when the manifest does not say
    load: Callable[[Export, Path], Predictor]
    needs: str


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnx", "model.onnx", _onnx, "onnxruntime"),
    Runtime("tflite", "model.tflite", _tflite, "ai-edge-litert"),
    Runtime("savedmodel", "saved_model", _savedmodel, "tensorflow"),
)}


def load_predictor(export: Export, fmt: str) -> Predictor:
    """A predictor over ``fmt`` of ``export``; UserError for unknown or missing formats."""
    listed = export.manifest.get("export", {}).get("formats", {})
    if fmt in RUNTIMES:
        runtime, default = RUNTIMES[fmt], RUNTIMES[fmt].default_file
    elif fmt.startswith("tflite_") and fmt in listed:  # quantized variants: tflite_fp16, tflite_int8, ...
        runtime, default = RUNTIMES["tflite"], f"model_{fmt.removeprefix('tflite_')}.tflite"
    else:
        raise unknown("format", fmt, set(RUNTIMES) | {f for f in listed if f.startswith("tflite_")})
    path = export.format_path(fmt, default)
    if not path.exists():
        raise UserError(f"{export.path} has no {fmt} model ({path.name}); re-export with `transfer export`")
    return runtime.load(export, path)


def decode_files(export: Export, files: list[str]) -> np.ndarray:
    """Image files as a float32 batch at the export's input size, decoded like the training pipeline."""
    images = []
    for f in files:
        try:
            images.append(decode_image(f, export.size))
        except FileNotFoundError as exc:
            raise UserError(f"{f}: no such file") from exc
        except DECODE_ERRORS as exc:
            raise UserError(f"{f} could not be decoded as an image: {exc}") from exc
    return np.stack(images).astype(np.float32)


def predict_files(export_dir: str | Path, files: list[str], fmt: str = "onnx") -> tuple[Export, np.ndarray]:
    """The export and the (N, classes) probabilities of ``files`` under ``fmt``."""
    export = read_export(export_dir)
    predictor = load_predictor(export, fmt)
    return export, predictor(decode_files(export, files))
