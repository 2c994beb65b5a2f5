"""export/formats.py and export/runtimes.py: the format table's rows and columns, selection, loading by name,
parity checks, and that none of it imports TensorFlow (no model is trained here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.contract import ExportDir
from export.formats import FLOAT32, FORMATS, Thresholds, load_format, select_formats
from export.runtimes import LITERT, ONNXRUNTIME, TENSORFLOW
from export.verify import verify
from transfer.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_format_selection_follows_the_table():
    assert [r.name for r in select_formats(None, None)] == list(FORMATS)
    assert [r.name for r in select_formats("savedmodel,tflite,onnx", "int8")] == [
        "savedmodel", "tflite", "tflite_int8", "onnx", "onnx_int8"]  # int8: every chosen family's int8 variant
    assert [r.name for r in select_formats("onnx", None)] == ["onnx"]
    assert [r.name for r in select_formats("onnx", "int8")] == ["onnx", "onnx_int8"]
    assert [r.name for r in select_formats("onnx_int8", None)] == ["onnx_int8"]
    assert [r.name for r in select_formats("tflite_fp16", None)] == ["tflite_fp16"]
    assert [r.name for r in select_formats(None, "dynamic")] == ["savedmodel", "tflite", "tflite_dynamic", "onnx"]
    with pytest.raises(UserError, match="--quantize int8 applies to tflite or onnx, which --formats does not"):
        select_formats("savedmodel", "int8")


def test_special_cases_are_columns_of_the_table():
    files = [row.file for row in FORMATS.values()]
    assert len(set(files)) == len(files)  # one artifact per row
    assert {row.runtime for row in FORMATS.values()} == {ONNXRUNTIME, LITERT, TENSORFLOW}
    with_labels = [n for n, r in FORMATS.items() if r.embed_labels]  # TFLite and ONNX carry their labels inside
    assert with_labels == [n for n, r in FORMATS.items() if r.family in ("tflite", "onnx")]
    assert [n for n, r in FORMATS.items() if r.needs_calibration] == ["tflite_int8", "onnx_int8"]
    assert [n for n, r in FORMATS.items() if r.describe] == ["tflite_int8"]
    for row in FORMATS.values():
        if row.needs_calibration:
            assert "calibration_samples" in row.options
    assert [n for n, r in FORMATS.items() if r.runtime.process_wide_threads] == ["savedmodel"]


def test_the_exporter_checks_no_format_by_name():
    source = (ROOT / "export" / "exporter.py").read_text()
    assert not re.findall(r"\b(?:row|r)\.(?:name|family|quantize)\s*(?:==|!=)", source)
    assert not [name for name in FORMATS if f'"{name}"' in source and name != "onnx"]  # "onnx" is also a package


def _export(tmp_path: Path, formats: dict) -> ExportDir:
    manifest = {"name": "m", "classes": ["a", "b"], "input": {"shape": [8, 8, 3]}, "export": {"formats": formats}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return ExportDir.open(tmp_path)


def test_load_format_errors_are_one_line(tmp_path):
    import hashlib

    bogus = b"not an onnx model"
    export = _export(tmp_path / "m", {"onnx": {"file": "model.onnx", "status": "verified",
                                               "sha256": hashlib.sha256(bogus).hexdigest()},
                                      "tflite_dynamic": {"file": "model_dynamic.tflite", "status": "verified"},
                                      "tflite": {"file": "model.tflite", "status": "failed-export",
                                                 "error": "RuntimeError: converter exploded"},
                                      "tflite_fp16": {"file": "model_fp16.tflite", "status": "verified"}})
    (tmp_path / "m" / "model.onnx").write_bytes(bogus)
    (tmp_path / "m" / "model_dynamic.tflite").write_bytes(b"planted next to the export")
    cases = {
        "coreml": "unknown format 'coreml'",
        "tflite_int8": "has no tflite_int8 model (it has onnx, tflite_dynamic, tflite, tflite_fp16)",
        "tflite_dynamic": "lists no sha256 for model_dynamic.tflite",  # never loaded: the manifest does not vouch
        "tflite": "tflite failed to export",
        "tflite_fp16": "model_fp16.tflite is missing",
        "onnx": "could not be opened by onnxruntime",
    }
    for fmt, message in cases.items():
        with pytest.raises(UserError, match=None) as err:
            load_format(export, fmt)
        assert message in str(err.value) and "\n" not in str(err.value), (fmt, str(err.value))


def test_export_modules_import_no_tensorflow():
    code = ("import sys, export.contract, export.formats, export.runtimes, export.bench, export.verify, export.cli\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    code = "import sys, export.contract\nassert 'numpy' not in sys.modules and 'tensorflow' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_verify_reports_differences_and_accuracy():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    labels = np.array([0, 1, 1])
    assert verify(ref, ref.copy(), np.zeros((3, 1)), labels, FLOAT32)["passed"]
    flipped = ref[:, ::-1]
    report = verify(ref, flipped, np.zeros((3, 1)), labels, FLOAT32)
    assert not report["passed"] and report["top1_agreement"] == 0.0
    assert report["max_abs_diff"] == pytest.approx(0.8) and report["accuracy"] == pytest.approx(1 / 3)
    # 33 points lost on 3 images (2 lost, 1 gained) is noise: McNemar p = 1/2; shown as a note, not a failure
    drop = verify(ref, flipped, np.zeros((3, 1)), labels, Thresholds(max_accuracy_drop=0.01))
    assert drop["passed"] and drop["p_value"] == 0.5 and "points below" in drop["notes"][0]


def test_native_prints_go_to_the_debug_log_not_the_terminal(capfd, caplog):
    """TFLite's C++ prints ("fully_quantize: 0, ...", "INFO: Created TensorFlow Lite XNNPACK delegate") bypass
    sys.stdout: the redirect works on file descriptors, C stdio buffers included."""
    import ctypes
    import logging
    import os

    from export.runtimes import native_output_logged

    libc = ctypes.CDLL(None)
    with caplog.at_level(logging.DEBUG, logger="transfer"), native_output_logged(1, 2):
        os.write(1, b"on stdout\n")
        os.write(2, b"on stderr\n")
        libc.printf(b"buffered by C stdio\n")  # still in libc's buffer when the block ends: flushed into the log
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "on stdout" in logged and "on stderr" in logged and "buffered by C stdio" in logged
