"""``transfer export``: write every chosen format of a run, record it in a manifest, and verify it against Keras."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.formats import FORMATS, ExportContext, ExportOptions, Format, check_options, select_formats
from transfer import rundir
from transfer.errors import UserError

LABELS = "labels.txt"
VERIFY = "verify.json"
LABELS_METADATA = "labels.txt"  # name of the TFLite metadata entry and of the associated file


@dataclass(frozen=True)
class ExportConfig:
    """What ``transfer export`` was asked to do."""

    run_dir: str
    formats: str | None = None
    quantize: str | None = None
    out: str | None = None
    options: ExportOptions = field(default_factory=ExportOptions)
    given_options: dict = field(default_factory=dict)  # ExportOptions field -> flag the user passed
    verify: bool = True
    verify_samples: int | None = None


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    reports: dict


def default_out(run_dir: Path, run_name: str) -> Path:
    """``<artifacts>/exports/<name>`` beside the run's ``<artifacts>/runs/<name>``."""
    run_dir = Path(run_dir).resolve()
    root = run_dir.parent.parent if run_dir.parent.name == "runs" else Path("artifacts")
    return root / "exports" / run_name


def calibration_images(train_x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` training images (seeded, without replacement) as float32 0..255; no images is a UserError."""
    if n <= 0:
        raise UserError(f"--calibration-samples {n} must be > 0")
    if len(train_x) == 0:
        raise UserError("int8 quantization needs calibration data, but the run's training split is empty; "
                        "drop int8 from --quantize")
    pick = np.random.default_rng(seed).choice(len(train_x), size=min(n, len(train_x)), replace=False)
    return train_x[np.sort(pick)].astype(np.float32)


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def embed_labels(tflite: Path, labels: list[str]) -> dict:
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
    """The labels appended to a TFLite file by :func:`embed_labels` (as a mobile app's zip reader sees them)."""
    with zipfile.ZipFile(tflite) as zf:
        return zf.read(LABELS).decode().splitlines()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _install(tmp: Path, dest: Path) -> None:
    """Put a finished artifact in place; an older copy is removed only once the new one is there."""
    if dest.is_dir():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export a complete run; failures of single formats are recorded, never raised."""
    run_dir = Path(cfg.run_dir)
    source = rundir.load_complete(run_dir)
    rows = select_formats(cfg.formats, cfg.quantize)
    check_options(rows, cfg.given_options)
    if cfg.options.calibration_samples <= 0:
        raise UserError(f"--calibration-samples {cfg.options.calibration_samples} must be > 0")
    if cfg.options.opset is not None and not 7 <= cfg.options.opset <= 18:
        raise UserError(f"--opset {cfg.options.opset} is outside what tf2onnx supports (7..18)")
    out = Path(cfg.out) if cfg.out else default_out(run_dir, source["name"])
    rundir.ensure_writable(out)

    from transfer.data import load_run_dataset

    needs_data = cfg.verify or any(r.name == "tflite_int8" for r in rows)
    dataset = load_run_dataset(source, run_dir, "pass --no-verify") if needs_data else None
    calibration = None
    if any(r.name == "tflite_int8" for r in rows):
        calibration_images(dataset.train.x, cfg.options.calibration_samples)  # refuse before any work

        def calibration(n):
            return calibration_images(dataset.train.x, n, seed=source["config"]["train"].get("seed", 0))

    import keras

    import transfer.layers  # noqa: F401  (registers the custom layers for loading)

    model = keras.models.load_model(run_dir / rundir.MODEL)
    classes = list(source["classes"])
    labels_tmp = out / f".{LABELS}.tmp"
    labels_tmp.write_text("\n".join(classes) + "\n")
    os.replace(labels_tmp, out / LABELS)

    previous = {}
    if (out / rundir.MANIFEST).is_file():
        previous = rundir.read_json(out / rundir.MANIFEST).get("export", {}).get("formats", {})
    work = out / f".work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = ExportContext(model, work, calibration)
    entries: dict[str, dict] = {}
    predictors = {}
    try:
        for row in rows:
            print(f"export: {row.name} -> {out / row.file}", flush=True)
            entries[row.name], predictors[row.name] = _export_one(row, ctx, out, cfg.options, classes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reports = {}
    if cfg.verify:
        reports = _verify_all(model, predictors, dataset, entries, cfg.verify_samples)
        rundir.write_json(out / VERIFY, {"split": "test", "source_run": str(run_dir.resolve()), "formats": reports})
    manifest = _manifest(source, run_dir, {**previous, **entries}, cfg.verify)
    rundir.write_json(out / rundir.MANIFEST, manifest)
    return ExportResult(out, manifest, reports)


def _export_one(row: Format, ctx: ExportContext, out: Path, options: ExportOptions, classes: list[str]):
    dest = out / row.file
    tmp = out / f".{row.file}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        facts = row.export(ctx, tmp, options) or {}
        if row.family == "tflite":
            facts["labels"] = embed_labels(tmp, classes)
        predictor = row.load(tmp)  # proves the artifact loads in its runtime before it replaces anything
        _install(tmp, dest)
        predictor = row.load(dest)
    except Exception as exc:  # one format failing must not stop the others: record it and go on
        _remove(tmp)
        print(f"export: {row.name} failed: {_one_line(exc)}", flush=True)
        return {"file": row.file, "status": "failed-export", "error": _one_line(exc)}, None
    entry = {
        "file": row.file,
        "status": "exported",
        "sha256": sha256_of(dest),
        "size_bytes": size_of(dest),
        "inputs": predictor.inputs,
        "outputs": predictor.outputs,
        **facts,
    }
    if row.name == "tflite_int8":
        entry["quantization"] = {"input": predictor.inputs[0]["quantization"],
                                 "output": predictor.outputs[0]["quantization"],
                                 "internal": _int8_boundaries(dest)}
    return entry, predictor


def _int8_boundaries(path: Path) -> dict:
    """Scale/zero-point of the int8 tensors right after the input and right before the output (float I/O models
    quantize and dequantize at the edges, so the interface tensors themselves carry no parameters)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
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


def _verify_all(model, predictors: dict, dataset, entries: dict, limit: int | None) -> dict:
    from export.verify import predict_batched, verify

    x, y = dataset.test.x, dataset.test.y
    if limit:
        x, y = x[:limit], y[:limit]
    inputs = x.astype(np.float32)
    reference = predict_batched(lambda b: model.predict_on_batch(b), inputs)
    reports = {}
    for name, predictor in predictors.items():
        if predictor is None:
            reports[name] = {"passed": False, "failures": [entries[name]["error"]], "status": "failed-export"}
            continue
        try:
            report = verify(reference, predictor, inputs, y, FORMATS[name].thresholds)
        except Exception as exc:  # a runtime that cannot run the artifact fails verification, it does not crash
            report = {"passed": False, "failures": [f"inference failed: {_one_line(exc)}"]}
        report["status"] = "verified" if report["passed"] else "failed-verification"
        entries[name]["status"] = report["status"]
        entries[name]["verification"] = {k: report.get(k) for k in
                                         ("max_abs_diff", "mean_abs_diff", "top1_agreement", "accuracy", "failures")}
        reports[name] = report
    return reports


def _manifest(source: dict, run_dir: Path, formats: dict, verified: bool) -> dict:
    from transfer.runner import library_versions

    versions = {**library_versions()}
    for package in ("onnx", "onnxruntime", "tf2onnx", "ai-edge-litert"):
        try:
            from importlib import metadata

            versions[package] = metadata.version(package)
        except Exception:
            versions[package] = None
    return {
        **source,
        "export": {
            "source_run": str(Path(run_dir).resolve()),
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "labels": LABELS,
            "verification": VERIFY if verified else "skipped (--no-verify)",
            "formats": formats,
            "versions": versions,
        },
    }


def reverify(export_dir: Path, limit: int | None = None) -> ExportResult:
    """Verify the artifacts already in an export directory against their source run again."""
    import keras

    import transfer.layers  # noqa: F401

    export_dir = Path(export_dir)
    if not (export_dir / rundir.MANIFEST).is_file() or "export" not in rundir.read_json(export_dir / rundir.MANIFEST):
        raise UserError(f"'{export_dir}' is not an export directory (no manifest.json with an export section); "
                        "run `transfer export RUN_DIR` first")
    manifest = rundir.read_json(export_dir / rundir.MANIFEST)
    run_dir = Path(manifest["export"]["source_run"])
    source = rundir.load_complete(run_dir)
    from transfer.data import load_run_dataset

    dataset = load_run_dataset(source, run_dir, "pass --no-verify")
    model = keras.models.load_model(run_dir / rundir.MODEL)
    entries = manifest["export"]["formats"]
    predictors = {}
    for name, entry in entries.items():
        if entry["status"] == "failed-export" or name not in FORMATS:
            continue
        path = export_dir / entry["file"]
        try:
            predictors[name] = FORMATS[name].load(path)
        except Exception as exc:  # a damaged artifact fails verification
            predictors[name] = None
            entry["error"] = f"cannot load: {_one_line(exc)}"
        entry["sha256_matches"] = path.exists() and sha256_of(path) == entry.get("sha256")
    reports = _verify_all(model, predictors, dataset, entries, limit)
    for name, predictor in predictors.items():
        if predictor is None:
            entries[name]["status"] = "failed-verification"
            reports[name]["status"] = "failed-verification"
    rundir.write_json(export_dir / VERIFY, {"split": "test", "source_run": str(run_dir), "formats": reports})
    rundir.write_json(export_dir / rundir.MANIFEST, manifest)
    return ExportResult(export_dir, manifest, reports)
