"""``transfer export``: write every chosen format of a run, record it in a manifest, and verify it against Keras.

What the export directory holds and what its manifest keys are is export.contract's; how each format is written,
loaded and described is its row in export.formats. This module only runs the rows and records the results.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import contract
from export.contract import (
    EXPORTED,
    EXPORTED_AT,
    FAILED_EXPORT,
    FAILED_VERIFICATION,
    FILE_KEY,
    FORMATS_KEY,
    LABELS,
    LABELS_KEY,
    MANIFEST,
    SECTION,
    SHA256_KEY,
    SIZE_KEY,
    SOURCE_RUN,
    STATUS_KEY,
    VERIFICATION_KEY,
    VERIFIED,
    VERIFY,
    VERSIONS_KEY,
    ExportDir,
    sha256_of,
    size_of,
)
from export.formats import FORMATS, ExportContext, ExportOptions, Format, check_options, select_formats
from transfer import rundir
from transfer.errors import UserError


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

    @property
    def formats(self) -> dict[str, dict]:
        """Format name -> manifest entry."""
        return self.manifest[SECTION][FORMATS_KEY]


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

    needs_calibration = any(r.needs_calibration for r in rows)
    dataset = load_run_dataset(source, run_dir, "pass --no-verify") if cfg.verify or needs_calibration else None
    calibration = None
    if needs_calibration:
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

    previous = (contract.read_manifest(out) or {}).get(SECTION, {}).get(FORMATS_KEY, {})
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
        _write_reports(out, run_dir.resolve(), reports)
    manifest = _manifest(source, run_dir, {**previous, **entries}, cfg.verify)
    rundir.write_json(out / MANIFEST, manifest)
    return ExportResult(out, manifest, reports)


def _export_one(row: Format, ctx: ExportContext, out: Path, options: ExportOptions, classes: list[str]):
    dest = out / row.file
    tmp = out / f".{row.file}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        facts = row.export(ctx, tmp, options) or {}
        if row.embed_labels is not None:
            facts[LABELS_KEY] = row.embed_labels(tmp, classes)
        predictor = row.load(tmp)  # proves the artifact loads in its runtime before it replaces anything
        _install(tmp, dest)
        predictor = row.load(dest)
        if row.describe is not None:
            facts.update(row.describe(dest, predictor))
    except Exception as exc:  # one format failing must not stop the others: record it (traceback kept) and go on
        _remove(tmp)
        print(f"export: {row.name} failed: {_one_line(exc)} (traceback in the manifest's entry)", flush=True)
        return {FILE_KEY: row.file, STATUS_KEY: FAILED_EXPORT, "error": _one_line(exc),
                "traceback": traceback.format_exc()}, None
    entry = {
        FILE_KEY: row.file,
        STATUS_KEY: EXPORTED,
        SHA256_KEY: sha256_of(dest),
        SIZE_KEY: size_of(dest),
        "inputs": predictor.inputs,
        "outputs": predictor.outputs,
        **facts,
    }
    return entry, predictor


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
            reports[name] = {"passed": False, "failures": [entries[name]["error"]], STATUS_KEY: FAILED_EXPORT}
            continue
        try:
            report = verify(reference, predictor, inputs, y, FORMATS[name].thresholds)
        except Exception as exc:  # a runtime that cannot run the artifact fails verification, it does not crash
            report = {"passed": False, "failures": [f"inference failed: {_one_line(exc)}"],
                      "traceback": traceback.format_exc()}
        report[STATUS_KEY] = VERIFIED if report["passed"] else FAILED_VERIFICATION
        entries[name][STATUS_KEY] = report[STATUS_KEY]
        entries[name]["verification"] = {k: report.get(k) for k in
                                         ("max_abs_diff", "mean_abs_diff", "top1_agreement", "accuracy", "failures")}
        reports[name] = report
    return reports


def _manifest(source: dict, run_dir: Path, formats: dict, verified: bool) -> dict:
    from importlib import metadata

    from transfer.runner import library_versions

    versions = {**library_versions()}
    for package in ("onnx", "onnxruntime", "tf2onnx", "ai-edge-litert"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        **source,
        SECTION: {
            SOURCE_RUN: str(Path(run_dir).resolve()),
            EXPORTED_AT: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            LABELS_KEY: LABELS,
            VERIFICATION_KEY: VERIFY if verified else "skipped (--no-verify)",
            FORMATS_KEY: formats,
            VERSIONS_KEY: versions,
        },
    }


def _write_reports(out: Path, run_dir: Path, reports: dict) -> None:
    rundir.write_json(out / VERIFY, {"split": "test", SOURCE_RUN: str(run_dir), FORMATS_KEY: reports})


def reverify(export_dir: Path, limit: int | None = None) -> ExportResult:
    """Verify the artifacts already in an export directory against their source run again."""
    import keras

    import transfer.layers  # noqa: F401

    export = ExportDir.open(export_dir, check_name=False)
    manifest = export.manifest
    run_dir = export.source_run
    if run_dir is None:
        raise UserError(f"{export.path / MANIFEST} records no {SOURCE_RUN}; export the run again with "
                        "`transfer export RUN_DIR`")
    source = rundir.load_complete(run_dir)
    from transfer.data import load_run_dataset

    dataset = load_run_dataset(source, run_dir, "pass --no-verify")
    model = keras.models.load_model(run_dir / rundir.MODEL)
    entries = export.formats()
    predictors = {}
    for name, entry in entries.items():
        if entry.get(STATUS_KEY) == FAILED_EXPORT or name not in FORMATS:
            continue
        try:
            predictors[name] = FORMATS[name].load(export.path_of(name))
        except Exception as exc:  # a damaged artifact fails verification (traceback kept for bugs)
            predictors[name] = None
            entry["error"] = f"cannot load: {_one_line(exc)}"
            entry["traceback"] = traceback.format_exc()
        entry["sha256_matches"] = export.sha256_matches(name)
    reports = _verify_all(model, predictors, dataset, entries, limit)
    for name, predictor in predictors.items():
        if predictor is None:
            entries[name][STATUS_KEY] = FAILED_VERIFICATION
            reports[name][STATUS_KEY] = FAILED_VERIFICATION
    _write_reports(export.path, run_dir, reports)
    rundir.write_json(export.path / MANIFEST, manifest)
    return ExportResult(export.path, manifest, reports)
