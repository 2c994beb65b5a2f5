"""The served model: an export directory (export.contract.ExportDir) with its ONNX Runtime session, opened by the
shared loader (export.runtimes) and tuned for serving, plus warm-up and metadata (what is served, from where:
serve/repo.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.contract import FAILED_EXPORT, FAILED_VERIFICATION, STATUS_KEY, VERIFIED, ExportDir
from export.formats import FORMATS, load_format
from export.runtimes import Predictor
from transfer.errors import UserError

SERVED_FORMAT = "onnx"  # the family served: its float row at --precision fp32, its quantized variant otherwise


def served_format(precision: str = "fp32") -> str:
    """The format-table row served at ``precision`` (serve.settings.PRECISIONS): the onnx family's float row for
    fp32, else its variant whose ``quantize`` is ``precision`` (int8: onnx_int8)."""
    wanted = None if precision == "fp32" else precision
    rows = [r.name for r in FORMATS.values() if r.family == SERVED_FORMAT and r.quantize == wanted]
    if not rows:
        raise UserError(f"--precision {precision} has no {SERVED_FORMAT} format to serve")
    return rows[0]


def check_servable(export: ExportDir, precision: str = "fp32") -> str:
    """The sha256 of the artifact ``export`` serves at ``precision`` (one-line UserError when it cannot be served).
    A quantized artifact is served only when its export verified it against the Keras model."""
    return export.check_sha256(check_verified(export, precision))


def check_verified(export: ExportDir, precision: str = "fp32") -> str:
    """The format-table row ``export`` serves at ``precision``; a one-line UserError for a quantized artifact its
    export did not verify against the Keras model."""
    fmt = served_format(precision)
    if precision != "fp32" and export.entry(fmt).get(STATUS_KEY) != VERIFIED:
        status = export.entry(fmt).get(STATUS_KEY)
        why = {None: "it has none", FAILED_EXPORT: "it failed to export", FAILED_VERIFICATION: "it failed "
               "verification"}.get(status, "it was not verified")
        raise UserError(f"--precision {precision}: export {export.name} has no verified {fmt} model ({why}); export "
                        f"it with `transfer export RUN_DIR --formats {fmt}` (RUN_DIR: its run, "
                        f"{export.source_run_name or 'recorded in its manifest'}) or serve --precision fp32")
    return fmt


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

    export: ExportDir
    threads: int = 0
    precision: str = "fp32"  # which onnx artifact is served (served_format): model.onnx or its int8 variant
    format: str = field(init=False)  # the format-table row served
    sha256: str = field(init=False)
    predictor: Predictor = field(init=False, repr=False)  # the shared loader's, with serving session options
    session: Any = field(init=False, repr=False)  # its ONNX Runtime session (thread-safe: the streams share it)
    input_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.format = check_verified(self.export, self.precision)
        # One read of the artifact: its sha256 is checked on the bytes ONNX Runtime is then given (load_format), so a
        # model.onnx rewritten in place meanwhile cannot be served under the manifest (and labels) of another.
        self.predictor = load_format(self.export, self.format, options=session_options(self.threads))
        self.sha256 = self.predictor.sha256
        self.session = self.predictor.session
        path = self.export.path_of(self.format)
        inputs, outputs = self.predictor.inputs, self.predictor.outputs
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"{path} must have one input and an output, has {len(inputs)} and {len(outputs)}")
        self.input_name = inputs[0]["name"]
        dims = inputs[0]["shape"]
        if len(dims) != 4 or any(d is not None and d != e for d, e in zip(dims[1:], self.export.input_shape,
                                                                          strict=True)):
            raise UserError(f"{path} input shape {dims} does not match the manifest's {list(self.export.input_shape)}")
        if inputs[0]["dtype"] != "float32":
            raise UserError(f"{path} input dtype {inputs[0]['dtype']} is not float32 (quantized ONNX is not served)")

    @property
    def name(self) -> str:
        return self.export.name

    @property
    def api_input(self) -> str:
        """The input's name in the HTTP APIs (the manifest's: :predict's named inputs, the v2 protocol's input; the
        ONNX graph's own, ``input_name``, may differ)."""
        return self.export.manifest.get("input", {}).get("name", "image")

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
        return {
            "name": self.name,
            "classes": list(self.export.classes),
            "input": {"name": self.api_input, "shape": list(self.export.input_shape),
                      "dtype": "float32", "layout": "NHWC", "range": spec.get("range", [0, 255])},
            "preprocessing": {
                "color": "RGB", "resize": list(self.export.size),
                "resize_interpolation": spec.get("resize_interpolation", "bilinear"),
                "exif_orientation": True, "first_frame_only": True, "alpha": "composited on white",
                "scaling": "none: the model takes raw 0..255 pixels and normalises inside the graph",
            },
            "model": {"format": self.format, "sha256": self.sha256,
                      "opset": self.export.entry(self.format).get("opset"),
                      "architecture": m.get("model", {}).get("backbone") or m.get("model", {}).get("baseline")},
            "source_run": self.export.source_run_name,  # the run's name: its absolute path stays on the server
            "exported_at": self.export.exported_at,
            "metrics": m.get("metrics", {}),
        }
