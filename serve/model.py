"""Export directories: reading and checking what `transfer export` wrote, and ONNX Runtime sessions over it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfer.errors import UserError

MANIFEST = "manifest.json"
LABELS = "labels.txt"
ONNX_FILE = "model.onnx"
# Model names appear in URLs and metrics labels: no separators, no dots first, bounded length.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Export:
    """An export directory's manifest, classes and input spec, checked for consistency (no runtime opened)."""

    name: str
    path: Path
    manifest: dict
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (H, W, C) of the raw-pixel input

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) images are resized to."""
        return self.input_shape[0], self.input_shape[1]

    def format_info(self, fmt: str) -> dict:
        """The manifest's export entry of a format ({} when the manifest does not list it)."""
        return dict(self.manifest.get("export", {}).get("formats", {}).get(fmt) or {})

    def format_path(self, fmt: str, default: str) -> Path:
        """Where a format's file lives: the manifest's ``file`` entry, else ``default``; never outside the export."""
        name = self.format_info(fmt).get("file") or default
        path = (self.path / name).resolve()
        if self.path.resolve() not in path.parents:
            raise UserError(f"{self.path / MANIFEST}: {fmt} file {name!r} points outside the export directory")
        return path


def read_export(path: Path | str, name: str | None = None) -> Export:
    """Read and check ``manifest.json`` and ``labels.txt`` of an export directory; raises UserError when unusable."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not an export directory (no {MANIFEST}); create one with `transfer export RUN_DIR`")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / MANIFEST} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"{path / MANIFEST} must hold a JSON object")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path / MANIFEST}: 'classes' must be a non-empty list of names")
    if (path / LABELS).is_file():
        labels = [line for line in (path / LABELS).read_text(encoding="utf-8").splitlines() if line]
        if labels != classes:
            raise UserError(f"{path / LABELS} does not match the manifest's classes; re-run `transfer export`")
    spec = manifest.get("input") or {}
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape)
            or shape[2] != 3):
        raise UserError(f"{path / MANIFEST}: input shape must be [H, W, 3], got {shape!r}")
    for key, expected in (("dtype", "float32"), ("layout", "NHWC"), ("color", "RGB")):
        if spec.get(key, expected) != expected:
            raise UserError(f"{path / MANIFEST}: input {key} {spec.get(key)!r} is not supported (expected {expected})")
    name = name or path.resolve().name
    if not NAME_PATTERN.match(name):
        raise UserError(f"model name {name!r} is not usable in URLs; use letters, digits, '.', '_', '-'")
    return Export(name=name, path=path, manifest=manifest, classes=tuple(classes), input_shape=tuple(shape))


def discover(export_dirs: tuple[str, ...], model_repo: str | None) -> list[Export]:
    """The exports to serve: the given directories plus every export directory directly under ``model_repo``."""
    exports = [read_export(p) for p in export_dirs]
    if model_repo:
        repo = Path(model_repo)
        if not repo.is_dir():
            raise UserError(f"--model-repo {repo} is not a directory")
        found = [read_export(p) for p in sorted(repo.iterdir()) if p.is_dir() and (p / MANIFEST).is_file()]
        if not found:
            raise UserError(f"--model-repo {repo} holds no export directories (folders with {MANIFEST})")
        exports += found
    names = [e.name for e in exports]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two exports share the name {', '.join(duplicates)}; serve them from different folder names")
    return exports


def session_options(threads: int):
    """ONNX Runtime options for serving: all graph optimisations, sequential, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Spinning worker threads would steal the CPU the event loop and image decoding need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class OnnxModel:
    """An export with an open ONNX Runtime session; ``run`` maps (N, H, W, 3) float32 pixels to probabilities."""

    export: Export
    threads: int = 0
    sha256: str = field(init=False)
    session: Any = field(init=False, repr=False)
    input_name: str = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        path = self.export.format_path("onnx", ONNX_FILE)
        if not path.is_file():
            raise UserError(f"{self.export.path} has no ONNX model ({path.name}); export with --format onnx")
        self.sha256 = sha256_file(path)
        expected = self.export.format_info("onnx").get("sha256")
        if expected and expected != self.sha256:
            raise UserError(f"{path} does not match the sha256 in its manifest (corrupt or replaced); re-export")
        try:
            self.session = ort.InferenceSession(str(path), session_options(self.threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise UserError(f"{path} could not be opened by ONNX Runtime: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"{path} must have one input and an output, has {len(inputs)} and {len(outputs)}")
        self.input_name = inputs[0].name
        dims = inputs[0].shape
        if len(dims) != 4 or any(isinstance(d, int) and d != e for d, e in zip(dims[1:], self.export.input_shape,
                                                                                strict=True)):
            raise UserError(f"{path} input shape {dims} does not match the manifest's {list(self.export.input_shape)}")
        if inputs[0].type != "tensor(float)":
            raise UserError(f"{path} input type {inputs[0].type} is not float32 (quantized ONNX is not served)")

    @property
    def name(self) -> str:
        return self.export.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) for a float32 (N, H, W, 3) batch."""
        return self.session.run(None, {self.input_name: batch})[0]

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run zero images at each batch size so the first request does not pay for allocation; checks the output."""
        for n in batch_sizes:
            out = self.run(np.zeros((n, *self.export.input_shape), np.float32))
            if out.shape != (n, len(self.export.classes)):
                raise UserError(f"{self.export.path}: model output shape {out.shape} does not match "
                                f"{len(self.export.classes)} classes in the manifest")

    def metadata(self) -> dict:
        """What a client needs to call the model and to trace where it came from."""
        m, spec = self.export.manifest, self.export.manifest.get("input", {})
        export = m.get("export", {})
        return {
            "name": self.name,
            "classes": list(self.export.classes),
            "input": {"name": spec.get("name", "image"), "shape": list(self.export.input_shape),
                      "dtype": "float32", "layout": "NHWC", "range": spec.get("range", [0, 255])},
            "preprocessing": {
                "color": "RGB", "resize": list(self.export.size),
                "resize_interpolation": spec.get("resize_interpolation", "bilinear"),
                "exif_orientation": True, "first_frame_only": True, "alpha": "composited on white",
                "scaling": "none: the model takes raw 0..255 pixels and normalises inside the graph",
            },
            "model": {"format": "onnx", "sha256": self.sha256, "opset": self.export.format_info("onnx").get("opset"),
                      "architecture": m.get("model", {}).get("backbone") or m.get("model", {}).get("baseline")},
            "source_run": export.get("source_run", m.get("name")),
            "exported": export.get("exported"),
            "metrics": m.get("metrics", {}),
        }
