"""The export-format table: one frozen row per format drives exporters, option checks, loaders, bench and tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfer.errors import UserError, unknown

DEFAULT_OPSET = 15


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must meet against the Keras model; ``None`` disables a check."""

    max_abs_diff: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None  # fraction (0.01 = one accuracy point)

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "min_top1_agreement": self.min_top1_agreement,
                "max_accuracy_drop": self.max_accuracy_drop}


FLOAT32 = Thresholds(max_abs_diff=1e-4, min_top1_agreement=1.0)
FLOAT16 = Thresholds(max_abs_diff=1e-2)
QUANTIZED = Thresholds(max_accuracy_drop=0.01)


@dataclass(frozen=True)
class ExportOptions:
    """Per-export settings the CLI maps flags onto; each format reads only the ones it accepts."""

    opset: int | None = None
    calibration_samples: int = 200
    int8_io: bool = False


@dataclass(frozen=True)
class Format:
    """One row of the format table."""

    name: str
    file: str  # file or directory name inside the export directory
    export: Callable  # (ctx: ExportContext, dest: Path, options: ExportOptions) -> dict of format facts
    load: Callable  # (path, num_threads=None) -> Predictor
    options: frozenset[str] = field(default_factory=frozenset)  # ExportOptions fields this format takes
    thresholds: Thresholds = FLOAT32
    family: str = ""  # what the user names in --formats (tflite variants expand through --quantize)
    quantize: str | None = None  # the --quantize value selecting this tflite variant


class Predictor:
    """A loaded artifact: ``predict(batch_float32) -> probabilities``, plus its input/output descriptions."""

    def __init__(self, fn: Callable, inputs: list[dict], outputs: list[dict]):
        self._fn = fn
        self.inputs = inputs
        self.outputs = outputs

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)


class ExportContext:
    """What exporters share: the loaded Keras model, calibration images, and a scratch SavedModel made once."""

    def __init__(self, model, work_dir: Path, calibration: Callable[[int], np.ndarray] | None = None):
        self.model = model
        self.work_dir = Path(work_dir)
        self._calibration = calibration
        self._saved_model: Path | None = None

    def saved_model(self) -> Path:
        """A SavedModel of the model (serving signature with a dynamic batch), exported on first use."""
        if self._saved_model is None:
            path = self.work_dir / "saved_model"
            if path.exists():
                shutil.rmtree(path)
            self.model.export(str(path), format="tf_saved_model", verbose=False)
            self._saved_model = path
        return self._saved_model

    def calibration(self, n: int) -> np.ndarray:
        if self._calibration is None:
            raise UserError("int8 quantization needs calibration data, and this export has none")
        return self._calibration(n)


# ---------------------------------------------------------------------------------------------- exporters


def _export_savedmodel(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    shutil.copytree(ctx.saved_model(), dest)
    return {}


def _tflite_converter(ctx: ExportContext):
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(str(ctx.saved_model()))


def _write(dest: Path, content: bytes) -> dict:
    dest.write_bytes(content)
    return {}


def _export_tflite(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    return _write(dest, _tflite_converter(ctx).convert())


def _export_tflite_fp16(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import tensorflow as tf

    converter = _tflite_converter(ctx)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return _write(dest, converter.convert())


def _export_tflite_dynamic(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import tensorflow as tf

    converter = _tflite_converter(ctx)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _write(dest, converter.convert())


def _export_tflite_int8(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import tensorflow as tf

    images = ctx.calibration(options.calibration_samples)

    def representative():
        for image in images:
            yield [image[None].astype(np.float32)]

    converter = _tflite_converter(ctx)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if options.int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    _write(dest, converter.convert())
    return {"calibration_samples": len(images), "int8_io": options.int8_io}


def _export_onnx(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import onnx

    opset = options.opset or DEFAULT_OPSET
    try:
        ctx.model.export(str(dest), format="onnx", verbose=False, opset_version=opset)
        path = "keras model.export(format='onnx')"
    except Exception as exc:  # Keras's exporter is young: fall back to the long-standing SavedModel route
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _tf2onnx_from_saved_model(ctx.saved_model(), dest, opset)
        path = f"tf2onnx from SavedModel (keras export failed: {first})"
    model = onnx.load(str(dest))
    _make_batch_dynamic(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"opset": opsets.get("ai.onnx"), "opsets": opsets, "converter": path}


def _tf2onnx_from_saved_model(saved_model: Path, dest: Path, opset: int) -> None:
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--output", str(dest),
           "--opset", str(opset), "--signature_def", "serving_default"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0 or not dest.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"tf2onnx failed: {tail}")


def _make_batch_dynamic(model) -> None:
    """Name the batch dimension of every graph input and output so servers can batch."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"


# ---------------------------------------------------------------------------------------------- runtime loaders


def _describe(name, shape, dtype) -> dict:
    return {"name": name, "shape": [None if d in (None, -1) or isinstance(d, str) else int(d) for d in shape],
            "dtype": np.dtype(dtype).name}


def load_savedmodel(path, num_threads: int | None = None) -> Predictor:
    """The SavedModel in TensorFlow (thread count is process-wide in TF; set it before TF starts)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    (in_name, in_spec), = serve.structured_input_signature[1].items()
    out_name, out_spec = next(iter(serve.structured_outputs.items()))

    def predict(batch):
        return serve(**{in_name: tf.constant(batch)})[out_name].numpy()

    predictor = Predictor(predict, [_describe(in_name, in_spec.shape.as_list(), in_spec.dtype.as_numpy_dtype)],
                          [_describe(out_name, out_spec.shape.as_list(), out_spec.dtype.as_numpy_dtype)])
    predictor.keepalive = loaded
    return predictor


def _quant(detail: dict) -> dict:
    q = detail.get("quantization_parameters") or {}
    scales, zeros = q.get("scales", []), q.get("zero_points", [])
    return {"scale": [float(s) for s in scales], "zero_point": [int(z) for z in zeros]}


def load_tflite(path, num_threads: int | None = None) -> Predictor:
    """A TFLite file in the ai-edge-litert interpreter; int8 inputs/outputs are (de)quantized here."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    state = {"batch": int(inp["shape"][0])}

    def predict(batch):
        if batch.shape[0] != state["batch"]:
            interpreter.resize_tensor_input(inp["index"], list(batch.shape), strict=False)
            interpreter.allocate_tensors()
            state["batch"] = batch.shape[0]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            result = (result.astype(np.float32) - zero) * scale
        return result

    def side(d):
        return {**_describe(d["name"], d["shape_signature"], d["dtype"]), "quantization": _quant(d)}

    return Predictor(predict, [side(inp)], [side(out)])


def load_onnx(path, num_threads: int | None = None) -> Predictor:
    """An ONNX file in onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    dtype = {"tensor(float)": np.float32}

    def predict(batch):
        return session.run([out.name], {inp.name: batch})[0]

    return Predictor(predict, [_describe(inp.name, inp.shape, dtype.get(inp.type, np.float32))],
                     [_describe(out.name, out.shape, dtype.get(out.type, np.float32))])


# ---------------------------------------------------------------------------------------------- the table

_ROWS = (
    Format("savedmodel", "saved_model", _export_savedmodel, load_savedmodel, family="savedmodel"),
    Format("tflite", "model.tflite", _export_tflite, load_tflite, family="tflite"),
    Format("tflite_fp16", "model_fp16.tflite", _export_tflite_fp16, load_tflite, thresholds=FLOAT16,
           family="tflite", quantize="fp16"),
    Format("tflite_dynamic", "model_dynamic.tflite", _export_tflite_dynamic, load_tflite, thresholds=QUANTIZED,
           family="tflite", quantize="dynamic"),
    Format("tflite_int8", "model_int8.tflite", _export_tflite_int8, load_tflite,
           options=frozenset({"calibration_samples", "int8_io"}), thresholds=QUANTIZED,
           family="tflite", quantize="int8"),
    Format("onnx", "model.onnx", _export_onnx, load_onnx, options=frozenset({"opset"}), family="onnx"),
)
FORMATS: dict[str, Format] = {row.name: row for row in _ROWS}
FAMILIES = tuple(dict.fromkeys(row.family for row in _ROWS))
QUANTIZE_CHOICES = tuple(row.quantize for row in _ROWS if row.quantize)


def get_format(name: str) -> Format:
    """A row by name; an unknown name is a UserError with the closest match."""
    if name not in FORMATS:
        raise unknown("export format", name, FORMATS)
    return FORMATS[name]


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def select_formats(formats: str | None, quantize: str | None) -> list[Format]:
    """Rows for ``--formats`` (families or row names) and ``--quantize`` (tflite variants); default: everything."""
    families = _split(formats) or list(FAMILIES)
    variants = _split(quantize)
    for variant in variants:
        if variant not in QUANTIZE_CHOICES:
            raise unknown("--quantize value", variant, QUANTIZE_CHOICES)
    if quantize is None and formats is None:
        variants = list(QUANTIZE_CHOICES)
    chosen: list[str] = []
    for name in families:
        if name in FAMILIES:
            rows = [r for r in _ROWS if r.family == name and (r.quantize is None or r.quantize in variants)]
        elif name in FORMATS:
            rows = [FORMATS[name]]
        else:
            raise unknown("export format", name, list(FAMILIES) + [r.name for r in _ROWS if r.name not in FAMILIES])
        chosen.extend(r.name for r in rows if r.name not in chosen)
    if variants and not any(FORMATS[n].quantize for n in chosen):
        raise UserError(f"--quantize {','.join(variants)} applies to tflite, which --formats does not include; "
                        "add tflite to --formats")
    return [FORMATS[n] for n in chosen]


def check_options(rows: list[Format], given: dict[str, str]) -> None:
    """Refuse an option none of the chosen formats takes; ``given`` maps ExportOptions fields to their flag."""
    for option, flag in given.items():
        takers = [r.name for r in _ROWS if option in r.options]
        if not any(option in r.options for r in rows):
            raise UserError(f"{flag} applies only to {' or '.join(takers)}, which the chosen formats "
                            f"({', '.join(r.name for r in rows)}) do not include")
