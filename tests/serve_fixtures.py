"""Export directories for the serve tests, in the shape `transfer export` writes (swap for the real command later).

A tiny Keras 3 model obeying the model contract (raw RGB 0..255 float32 NHWC in, softmax out, scaling inside the
graph) exported to ONNX, a SavedModel and TFLite, with a hand-written manifest.json and labels.txt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("red", "green", "blue")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_model(size: tuple[int, int] = (32, 32), classes: int = 3, width: int = 8, blocks: int = 1, seed: int = 0):
    """Input (H, W, 3) -> Rescaling(1/255) -> [Conv] * blocks -> GAP -> Dense softmax, seeded."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for b in range(blocks):
        x = keras.layers.Conv2D(width * 2**b, 3, padding="same", activation="relu")(x)
        if b < blocks - 1:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    # Random init gives near-uniform probabilities; sharpen the head so top-k orders are well separated.
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 20, bias])
    return model


def build_export(dest: Path, name: str = "tiny", classes: tuple[str, ...] = CLASSES, size: tuple[int, int] = (32, 32),
                 formats: tuple[str, ...] = ("onnx", "savedmodel", "tflite"), model=None, **model_kw) -> Path:
    """Write an export directory at ``dest`` and return it."""
    import numpy as np
    import tensorflow as tf

    dest.mkdir(parents=True, exist_ok=True)
    model = model or build_model(size, len(classes), **model_kw)
    model(np.zeros((1, *size, 3), np.float32))  # ONNX export needs a called model
    entries = {}
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        model.export(str(dest / "model.onnx"), format="onnx")
    entries["onnx"] = {"file": "model.onnx", "inputs": [{"name": "image", "shape": [None, *size, 3],
                                                          "dtype": "float32"}],
                       "outputs": [{"name": "output_0", "shape": [None, len(classes)], "dtype": "float32"}],
                       "opset": 17, "status": "verified"}
    if "savedmodel" in formats or "tflite" in formats:
        with quiet:
            model.export(str(dest / "saved_model"), format="tf_saved_model")
        entries["savedmodel"] = {"file": "saved_model", "status": "verified"}
    if "tflite" in formats:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(dest / "saved_model"))
        (dest / "model.tflite").write_bytes(converter.convert())
        entries["tflite"] = {"file": "model.tflite", "status": "verified"}
    if "savedmodel" not in formats:
        import shutil

        shutil.rmtree(dest / "saved_model", ignore_errors=True)
        entries.pop("savedmodel", None)
    for entry in entries.values():
        path = dest / entry["file"]
        if path.is_file():
            entry["sha256"], entry["size_bytes"] = _sha256(path), path.stat().st_size
    (dest / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    manifest = {
        "name": name,
        "kind": "baseline",
        "classes": list(classes),
        "input": {"name": "image", "shape": [*size, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB",
                  "range": [0, 255], "resize_interpolation": "bilinear"},
        "model": {"baseline": "tiny_cnn", "params": int(model.count_params())},
        "metrics": {"test_accuracy": 0.5},
        "export": {"source_run": f"artifacts/runs/{name}", "exported": datetime.now(timezone.utc).isoformat(),
                   "formats": entries},
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return dest


def relabel_copy(src: Path, dest: Path, classes: tuple[str, ...]) -> Path:
    """A copy of an export under another folder name with other class names (same model): a second repo entry."""
    import shutil

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["classes"], manifest["name"] = list(classes), dest.name
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (dest / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    return dest
