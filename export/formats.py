"""The export-format table: one frozen row per format drives exporters, option checks, loaders, bench and tests.

Adding a format is one row here plus its exporter function. A row names its file in the export directory, its
exporter, its runtime (the loader in export.runtimes), and its special cases as columns: labels embedded in the
artifact, calibration data needed, extra manifest facts described after loading. Importing this module imports no
TensorFlow: the exporters import it when they run.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.contract import (
    FAILED_EXPORT,
    INPUT_CONTRACT,
    LABELS,
    ONNX_OUTPUT,
    PIXEL_RANGE,
    STATUS_KEY,
    ExportDir,
    Untrusted,
)
from export.runtimes import LITERT, ONNXRUNTIME, TENSORFLOW, Predictor, Runtime, int8_boundaries, native_output_logged
from transfer.config import check_bounds, option
from transfer.errors import UserError, unknown
from transfer.options import comma_list

DEFAULT_OPSET = 15
MIN_INT8_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (their axis attribute) came in opset 13


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must meet against the Keras model (export.verify, docs/verification.md); None disables a check.

    ``max_abs_diff``: a bound on the largest |probability difference| over every image and class.
    ``max_p99_abs_diff``: a bound on the 99th percentile over images of each image's largest |difference|.
    ``max_median_tv``: a bound on the median over images of the total-variation distance of the two probability
    vectors (export.verify.parity): what catches a quantized artifact that is another model keeping most decisions.
    ``min_top1_agreement``: the format's floor of top-1 agreement on the images the Keras model decides (export.verify
    .DECISIVE_MARGIN); the format fails only when the whole 95 % Wilson interval of that agreement lies below it
    (confidently below, never on noise).
    ``max_accuracy_drop``: the accuracy points (a fraction: 0.01 = one point) the format may lose on the labelled test
    images; it fails only when the loss is larger *and* significant (exact one-sided McNemar p < 0.05).
    """

    max_abs_diff: float | None = None
    max_p99_abs_diff: float | None = None
    max_median_tv: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_p99_abs_diff": self.max_p99_abs_diff,
                "max_median_tv": self.max_median_tv,
                "min_top1_agreement": self.min_top1_agreement, "max_accuracy_drop": self.max_accuracy_drop}


# The numbers and the measurement behind each: docs/verification.md (benchmarks/verification_study.py).
FLOAT32 = Thresholds(max_abs_diff=0.1, max_p99_abs_diff=0.01, min_top1_agreement=0.95)
FLOAT16 = Thresholds(max_abs_diff=0.5, max_p99_abs_diff=0.25, min_top1_agreement=0.95)
DYNAMIC = Thresholds(max_median_tv=0.1, min_top1_agreement=0.9, max_accuracy_drop=0.01)
INT8 = Thresholds(max_median_tv=0.1, min_top1_agreement=0.9, max_accuracy_drop=0.01)


@dataclass(frozen=True)
class VerifyOptions:
    """How many images verification compares (``transfer export`` and ``transfer verify`` build their flag from it)."""

    verify_samples: int = option(1000, "images each artifact is compared with the Keras model on: the test split "
                                 "first, then drawn from validation and training images (never int8 calibration "
                                 "images)", minimum=1, maximum=1_000_000)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class ExportOptions:
    """Per-export settings (the one home of their defaults; ``transfer export`` builds its flags from these fields);
    each format reads only the ones it accepts (``Format.options``)."""

    opset: int | None = option(None, "ONNX opset (7..18)", default_text=str(DEFAULT_OPSET))
    calibration_samples: int = option(200, "int8: training images for calibration")
    int8_io: bool = option(False, "int8: integer input and output tensors")


@dataclass(frozen=True)
class Format:
    """One row of the format table."""

    name: str
    file: str  # file or directory name inside the export directory
    export: Callable  # (ctx: ExportContext, dest: Path, options: ExportOptions) -> dict of format facts
    runtime: Runtime  # runs the artifact: export.runtimes.ONNXRUNTIME, LITERT or TENSORFLOW
    options: frozenset[str] = field(default_factory=frozenset)  # ExportOptions fields this format takes
    thresholds: Thresholds = FLOAT32
    family: str = ""  # what the user names in --formats (its quantized variants expand through --quantize)
    quantize: str | None = None  # the --quantize value selecting this quantized variant of its family
    embed_labels: Callable[[Path, list[str]], dict] | None = None  # (artifact, classes) -> facts; labels inside
    needs_calibration: bool = False  # exporting needs training images (ExportContext.calibration)
    describe: Callable[[Path, Predictor], dict] | None = None  # (artifact, loaded) -> extra manifest facts
    min_opset: int | None = None  # the lowest --opset this format can be exported at (checked before any work)

    def load(self, path, num_threads: int | None = None) -> Predictor:
        """The artifact at ``path`` (or an export.contract.Artifact already read) in this format's runtime, opened
        from one read of it."""
        return self.runtime.load(path, num_threads)


def inference_model(model):
    """``model`` as a functional model whose every call runs in inference mode (``training=False`` recorded in its
    graph), so exporters trace what ``predict`` runs. A backbone called without ``training=False`` (one trained from
    scratch) otherwise traces its Dropout layers active when called plainly: EfficientNet's stochastic-depth dropout
    made the SavedModel random and the TFLite and ONNX converters fail on its random ops."""
    import keras

    return keras.Model(model.inputs, model(model.inputs[0], training=False), name=model.name)


class ExportContext:
    """What exporters share: the loaded Keras model (in inference mode), calibration images, and a scratch SavedModel
    and a float ONNX model (per opset), each made once."""

    def __init__(self, model, work_dir: Path, calibration: Callable[[int], np.ndarray] | None = None):
        self.model = inference_model(model)
        self.work_dir = Path(work_dir)
        self._calibration = calibration
        self._saved_model: Path | None = None
        self._onnx: dict[int, tuple[Path, dict]] = {}

    def saved_model(self) -> Path:
        """A SavedModel of the model (serving signature with a dynamic batch), exported on first use."""
        if self._saved_model is None:
            path = self.work_dir / "saved_model"
            if path.exists():
                shutil.rmtree(path)
            self.model.export(str(path), format="tf_saved_model", verbose=False)
            self._saved_model = path
        return self._saved_model

    def onnx(self, opset: int) -> tuple[Path, dict]:
        """A float ONNX model of the model at ``opset`` (dynamic batch, output named ONNX_OUTPUT, no metadata yet)
        and its facts, exported on first use: the onnx row copies it, onnx_int8 quantizes it."""
        if opset not in self._onnx:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            path = self.work_dir / f"float_opset{opset}.onnx"
            self._onnx[opset] = path, _make_onnx(self, path, opset)
        path, facts = self._onnx[opset]
        return path, dict(facts)

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


def _convert(converter) -> bytes:
    """``converter.convert()`` with the converter's native prints kept out of the user's terminal."""
    with native_output_logged(1, 2):  # the calibrating quantizer prints "fully_quantize: 0, inference_type: 6, ..."
        return converter.convert()


def _write(dest: Path, content: bytes) -> dict:
    dest.write_bytes(content)
    return {}


def _export_tflite(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    return _write(dest, _convert(_tflite_converter(ctx)))


def _export_tflite_fp16(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import tensorflow as tf

    converter = _tflite_converter(ctx)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return _write(dest, _convert(converter))


def _export_tflite_dynamic(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    import tensorflow as tf

    converter = _tflite_converter(ctx)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _write(dest, _convert(converter))


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
    _write(dest, _convert(converter))
    return {"calibration_samples": len(images), "int8_io": options.int8_io}


def _export_onnx(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    source, facts = ctx.onnx(options.opset or DEFAULT_OPSET)
    shutil.copyfile(source, dest)
    return facts


def _make_onnx(ctx: ExportContext, dest: Path, opset: int) -> dict:
    """Export the float ONNX model at ``dest``: batch dynamic, its output named ONNX_OUTPUT, checked."""
    import onnx

    try:
        ctx.model.export(str(dest), format="onnx", verbose=False, opset_version=opset)
        extra = _extra_inputs(dest)
        if extra:  # e.g. an un-adapted Normalization layer's mean and variance became graph inputs (EfficientNet)
            raise RuntimeError(f"it made {len(extra)} more graph input(s), {extra[0]}")
        path = "keras model.export(format='onnx')"
    except Exception as exc:  # Keras's exporter is young: fall back to the long-standing SavedModel route
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _tf2onnx_from_saved_model(ctx.saved_model(), dest, opset)
        path = f"tf2onnx from SavedModel (keras export failed: {first})"
    model = onnx.load(str(dest))
    _make_batch_dynamic(model)
    _name_output(model, ONNX_OUTPUT)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"opset": opsets.get("ai.onnx"), "opsets": opsets, "converter": path}


class _CalibrationImages:
    """ONNX Runtime's CalibrationDataReader over ``images`` (N, H, W, 3), ``batch`` at a time (MinMax calibration
    takes the min and max over all of them: batching changes nothing but the speed)."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 16):
        self._batches = iter([{input_name: images[i:i + batch].astype(np.float32)}
                              for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _export_onnx_int8(ctx: ExportContext, dest: Path, options: ExportOptions) -> dict:
    """Static int8 quantization of the float ONNX model (ONNX Runtime's quantize_static): QDQ format, int8 weights
    per output channel, uint8 activations (ONNX Runtime's choice for x86 CPUs) with MinMax ranges calibrated on the
    same training images as tflite_int8; the final Softmax stays float so the probabilities keep their resolution."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    opset = options.opset or DEFAULT_OPSET
    images = ctx.calibration(options.calibration_samples)
    source, facts = ctx.onnx(opset)
    prepared = ctx.work_dir / f"int8_pre_opset{opset}.onnx"
    # ONNX Runtime's recommended preparation: graph optimisations (fusions) and shape inference; the symbolic shape
    # inference it can add needs sympy and only matters for symbolic dimensions (ours are fixed but the batch)
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    keep_float = [n.name for n in graph.node if n.op_type == "Softmax" and set(n.output) & {ONNX_OUTPUT}]
    with native_output_logged(1, 2):
        quantize_static(str(prepared), str(dest), _CalibrationImages(graph.input[0].name, images),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=keep_float)
    # no CalibMaxIntermediateOutputs: MinMax keeps only each batch's per-tensor min and max (small), and ONNX Runtime
    # 1.32 discards, not merges, the batches collected each time that limit is reached (calibrate.py, collect_data)
    model = onnx.load(str(dest))
    if model.graph.output[0].name != ONNX_OUTPUT:
        raise RuntimeError(f"quantization renamed the output {ONNX_OUTPUT!r} to {model.graph.output[0].name!r}")
    counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {**facts, "calibration_samples": len(images), "quantization": {
        "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per channel",
        "activations": "uint8 per tensor", "calibration": "MinMax", "float_nodes": keep_float, "nodes": counts}}


def _extra_inputs(path: Path) -> list[str]:
    """Graph inputs of the ONNX model at ``path`` besides the image (initializers listed as inputs excepted)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in constants][1:]


def _tf2onnx_from_saved_model(saved_model: Path, dest: Path, opset: int) -> None:
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--output", str(dest),
           "--opset", str(opset), "--signature_def", "serving_default"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0 or not dest.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"tf2onnx failed: {tail}")


def _name_output(model, name: str) -> None:
    """Rename the graph's one output (``Identity:0`` from the converters) to ``name``, in every node that uses it."""
    old = model.graph.output[0].name
    if old == name:
        return
    for node in model.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    model.graph.output[0].name = name


def embed_onnx_metadata(path: Path, labels: list[str]) -> dict:
    """Write what a bare ONNX Runtime user needs into ``model.onnx``'s ``metadata_props`` (``session.get_modelmeta()
    .custom_metadata_map``): the labels in output order, the input's shape, layout, colour order and pixel range, and
    that preprocessing is inside the graph. Returns the keys written."""
    import json

    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    height, width, channels = (d.dim_value or None for d in list(dims)[1:4])
    contract = dict(INPUT_CONTRACT)
    facts = {
        "labels": json.dumps(labels),
        "input_name": model.graph.input[0].name,
        "input_shape": json.dumps(["batch", height, width, channels]),
        "input_layout": contract["layout"],
        "input_dtype": contract["dtype"],
        "input_color": contract["color"],
        "input_pixel_range": json.dumps(list(PIXEL_RANGE)),
        "preprocessing": (f"resize each image to {height}x{width} (bilinear) and feed its {contract['color']} pixels "
                          f"{PIXEL_RANGE[0]:g}..{PIXEL_RANGE[1]:g} as {contract['dtype']} {contract['layout']}; the "
                          f"model's own scaling and normalization are inside the graph"),
        "output_name": model.graph.output[0].name,
        "output": "softmax probabilities, one per label, in the order of 'labels'",
    }
    kept = [p for p in model.metadata_props if p.key not in facts]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in facts.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return {"metadata_props": sorted(facts)}


def read_onnx_metadata(path: Path) -> dict:
    """``model.onnx``'s metadata as ONNX Runtime shows it to a bare user (``get_modelmeta().custom_metadata_map``)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def _make_batch_dynamic(model) -> None:
    """Name the batch dimension of every graph input and output so servers can batch."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"


# ---------------------------------------------------------------------------------------------- special cases

LABELS_METADATA = LABELS  # name of the TFLite metadata entry and of the associated file holding the labels


def embed_tflite_labels(tflite: Path, labels: list[str]) -> dict:
    """Make the labels travel inside a TFLite file: a model metadata entry, plus a zip appended to the
    flatbuffer holding ``labels.txt`` (the associated-file layout of TFLite metadata; interpreters ignore it)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    text = ("\n".join(labels) + "\n").encode()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite.read_bytes()))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(text, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = LABELS_METADATA
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    archive = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    archive.seek(0, io.SEEK_END)
    # append mode on non-zip content writes offsets from the start of the file, as standard zip readers expect
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr(LABELS, text)
    tflite.write_bytes(archive.getvalue())
    return {"metadata_entry": LABELS_METADATA, "associated_file": LABELS}


def read_embedded_labels(tflite: Path) -> list[str]:
    """The labels appended to a TFLite file by :func:`embed_tflite_labels` (as a mobile app's zip reader sees them)."""
    with zipfile.ZipFile(tflite) as zf:
        return zf.read(LABELS).decode().splitlines()


def _describe_int8(path: Path, predictor: Predictor) -> dict:
    """The quantization parameters an int8 model's caller needs: interface tensors and the int8 edges inside."""
    return {"quantization": {"input": predictor.inputs[0]["quantization"],
                             "output": predictor.outputs[0]["quantization"],
                             "internal": int8_boundaries(path)}}


# ---------------------------------------------------------------------------------------------- the table

_TFLITE = {"runtime": LITERT, "family": "tflite", "embed_labels": embed_tflite_labels}
_ROWS = (
    Format("savedmodel", "saved_model", _export_savedmodel, TENSORFLOW, family="savedmodel"),
    Format("tflite", "model.tflite", _export_tflite, **_TFLITE),
    Format("tflite_fp16", "model_fp16.tflite", _export_tflite_fp16, thresholds=FLOAT16, quantize="fp16", **_TFLITE),
    Format("tflite_dynamic", "model_dynamic.tflite", _export_tflite_dynamic, thresholds=DYNAMIC,
           quantize="dynamic", **_TFLITE),
    Format("tflite_int8", "model_int8.tflite", _export_tflite_int8, thresholds=INT8, quantize="int8",
           options=frozenset({"calibration_samples", "int8_io"}), needs_calibration=True, describe=_describe_int8,
           **_TFLITE),
    Format("onnx", "model.onnx", _export_onnx, ONNXRUNTIME, options=frozenset({"opset"}), family="onnx",
           embed_labels=embed_onnx_metadata),
    Format("onnx_int8", "model_int8.onnx", _export_onnx_int8, ONNXRUNTIME, thresholds=INT8, family="onnx",
           quantize="int8", options=frozenset({"opset", "calibration_samples"}), embed_labels=embed_onnx_metadata,
           needs_calibration=True, min_opset=MIN_INT8_OPSET),
)
FORMATS: dict[str, Format] = {row.name: row for row in _ROWS}
FAMILIES = tuple(dict.fromkeys(row.family for row in _ROWS))
QUANTIZE_CHOICES = tuple(dict.fromkeys(row.quantize for row in _ROWS if row.quantize))


def get_format(name: str) -> Format:
    """A row by name; an unknown name is a UserError with the closest match."""
    if name not in FORMATS:
        raise unknown("export format", name, FORMATS)
    return FORMATS[name]


def select_formats(formats: str | None, quantize: str | None) -> list[Format]:
    """Rows for ``--formats`` (families or row names) and ``--quantize`` (the quantized variants of the chosen
    families: ``int8`` selects tflite_int8 and onnx_int8 when tflite and onnx are chosen); default: everything."""
    families = comma_list(formats) or list(FAMILIES)
    variants = comma_list(quantize)
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
        offering = list(dict.fromkeys(r.family for r in _ROWS if r.quantize in variants))
        raise UserError(f"--quantize {','.join(variants)} applies to {' or '.join(offering)}, which --formats does "
                        f"not include; add {offering[0]} to --formats")
    return [FORMATS[n] for n in chosen]


def quantize_variants() -> str:
    """The --quantize values each family offers, for help texts: ``fp16,dynamic,int8 (tflite); int8 (onnx)``."""
    by_family: dict[str, list[str]] = {}
    for row in _ROWS:
        if row.quantize:
            by_family.setdefault(row.family, []).append(row.quantize)
    return "; ".join(f"{','.join(values)} ({family})" for family, values in by_family.items())


def check_options(rows: list[Format], given: dict[str, str]) -> None:
    """Refuse an option none of the chosen formats takes; ``given`` maps ExportOptions fields to their flag."""
    for name, flag in given.items():
        takers = [r.name for r in _ROWS if name in r.options]
        if not any(name in r.options for r in rows):
            raise UserError(f"{flag} applies only to {' or '.join(takers)}, which the chosen formats "
                            f"({', '.join(r.name for r in rows)}) do not include")


def load_format(export: ExportDir, fmt: str, num_threads: int | None = None, **runtime_options) -> Predictor:
    """``fmt``'s artifact of ``export`` loaded in its runtime (``runtime_options`` go to the loader).

    Any format row the export's manifest lists can be loaded; an unknown or unlisted format, a failed export, a
    missing file, one whose bytes do not have the sha256 the manifest lists or one its runtime cannot open is a
    one-line UserError. The artifact is read once (ExportDir.read_artifact) and the runtime opened from that read.
    """
    listed = export.formats()
    if fmt not in FORMATS:
        raise unknown("format", fmt, [n for n in listed if n in FORMATS] or FORMATS)
    if fmt not in listed:
        raise UserError(f"{export.path} has no {fmt} model (it has {', '.join(listed) or 'none'}); "
                        f"export it with `transfer export RUN_DIR --formats {fmt}`")
    if listed[fmt].get(STATUS_KEY) == FAILED_EXPORT:
        raise UserError(f"{fmt} failed to export into {export.path} ({listed[fmt].get('error')}); "
                        f"export it again with `transfer export RUN_DIR --formats {fmt}`")
    path = export.path_of(fmt)
    if not path.exists():
        raise UserError(f"{export.path} has no {fmt} model ({path.name} is missing); re-export with `transfer export`")
    try:
        artifact = export.read_artifact(fmt)  # read once: the runtime opens these bytes, whose sha256 was checked
    except Untrusted as problem:
        raise UserError(f"{export.path}: {fmt} is not loaded: {problem}; re-export with "
                        f"`transfer export RUN_DIR --formats {fmt}`") from None
    row = FORMATS[fmt]
    try:
        return row.runtime.load(artifact, num_threads, **runtime_options)
    except UserError:
        raise
    except Exception as exc:  # each runtime raises its own exception types for files it cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path} could not be opened by {row.runtime.name}: {first}") from exc
