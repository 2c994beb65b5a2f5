"""export/contract.py: what makes a directory an export directory, and its checks (hand-made directories; the
round trip with the real exporter is in test_export.py and the serve tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.contract import ExportDir, export_is_current, sha256_of, size_of
from transfer.errors import UserError

RUN_MANIFEST = {"name": "run1", "status": "complete", "classes": ["cat", "dog"],
                "input": {"name": "image", "shape": [8, 8, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB"}}


def make_export(path: Path, *, formats: dict | None = None, labels: list[str] | None = None, **changes) -> Path:
    """An export directory as `transfer export` lays it out, with ``changes`` to its manifest's top level."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"onnx bytes")
    formats = {"onnx": {"file": "model.onnx", "status": "verified", "sha256": sha256_of(path / "model.onnx")}} \
        if formats is None else formats
    manifest = {**RUN_MANIFEST, "export": {"source_run": str(path.parent / "runs" / "run1"),
                                          "exported_at": "2026-01-02T03:04:05+00:00", "formats": formats}}
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "labels.txt").write_text("".join(f"{c}\n" for c in (labels or manifest.get("classes") or [])))
    return path


def test_a_valid_export_opens(tmp_path):
    export = ExportDir.open(make_export(tmp_path / "model-1"))
    assert export.name == "model-1" and export.classes == ("cat", "dog") and export.input_shape == (8, 8, 3)
    assert export.size == (8, 8) and export.exported_at == "2026-01-02T03:04:05+00:00"
    assert export.source_run == tmp_path / "runs" / "run1" and export.source_run_name == "run1"
    assert set(export.formats()) == {"onnx"} and export.entry("tflite") == {}
    assert ExportDir.open(tmp_path / "model-1", name="other").name == "other"
    assert ExportDir.is_export_dir(tmp_path / "model-1")


@pytest.mark.parametrize(("change", "message"), [
    ("no manifest", "is not an export directory (no manifest.json)"),
    ("not json", "manifest.json is unreadable"),
    ("a list", "must hold a JSON object"),
    ("run directory", "no 'export' section: a run directory?"),
    ("no classes", "'classes' must be a non-empty list of names"),
    ("classes not names", "'classes' must be a non-empty list of names"),
    ("labels differ", "labels.txt does not match the manifest's classes"),
    ("unencodable class", "is not valid Unicode text"),
    ("grey input", "input shape must be [H, W, 3], got [8, 8, 1]"),
    ("flat input", "input shape must be [H, W, 3], got [64]"),
    ("boolean size", "input shape must be [H, W, 3], got [True, 8, 3]"),
    ("uint8 input", "input dtype 'uint8' is not supported (expected float32)"),
    ("NCHW", "input layout 'NCHW' is not supported (expected NHWC)"),
    ("bad name", "model name 'my model' is not usable in URLs"),
])
def test_unusable_exports_are_one_line_user_errors(tmp_path, change, message):
    path = tmp_path / ("my model" if change == "bad name" else "m")
    make_export(path)
    manifest = json.loads((path / "manifest.json").read_text())
    edits = {"no classes": {"classes": []}, "classes not names": {"classes": [1, 2]},
             "grey input": {"input": {"shape": [8, 8, 1]}}, "flat input": {"input": {"shape": [64]}},
             "boolean size": {"input": {"shape": [True, 8, 3]}},
             "uint8 input": {"input": {"shape": [8, 8, 3], "dtype": "uint8"}},
             "NCHW": {"input": {"shape": [8, 8, 3], "layout": "NCHW"}}}
    if change == "no manifest":
        (path / "manifest.json").unlink()
    elif change == "not json":
        (path / "manifest.json").write_text("{not json")
    elif change == "a list":
        (path / "manifest.json").write_text("[]")
    elif change == "run directory":
        (path / "manifest.json").write_text(json.dumps(RUN_MANIFEST))
    elif change == "unencodable class":  # a lone surrogate: valid JSON, no labels.txt, and no UTF-8 for an answer
        (path / "manifest.json").write_text(json.dumps({**manifest, "classes": ["cat", "\ud800"]}))
        (path / "labels.txt").unlink()
    elif change == "labels differ":
        (path / "labels.txt").write_text("dog\ncat\n")
    elif change in edits:
        (path / "manifest.json").write_text(json.dumps({**manifest, **edits[change]}))
    with pytest.raises(UserError) as err:
        ExportDir.open(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert ExportDir.is_export_dir(path) == (change not in ("no manifest", "not json", "a list", "run directory"))


def test_the_url_name_check_is_for_serving_only(tmp_path):
    make_export(tmp_path / "my model")
    assert ExportDir.open(tmp_path / "my model", check_name=False).name == "my model"
    with pytest.raises(UserError, match="not usable in URLs"):
        ExportDir.open(tmp_path / "my model", name="../x")


def test_format_paths_come_from_the_manifest_else_the_table(tmp_path):
    export = ExportDir.open(make_export(tmp_path / "m", formats={
        "onnx": {"file": "renamed.onnx"}, "tflite": {"status": "exported"}}))
    root = (tmp_path / "m").resolve()
    assert export.path_of("onnx") == root / "renamed.onnx"
    assert export.path_of("tflite") == root / "model.tflite"  # no "file": the format table's name
    assert export.path_of("tflite_int8") == root / "model_int8.tflite"  # not listed: still the table's name
    with pytest.raises(UserError, match="unknown export format 'coreml'"):
        export.path_of("coreml")


@pytest.mark.parametrize("file", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx", "."])
def test_a_path_outside_the_export_is_refused(tmp_path, file):
    export = ExportDir.open(make_export(tmp_path / "m", formats={"onnx": {"file": file}}))
    with pytest.raises(UserError, match="points outside the export directory"):
        export.path_of("onnx")


def test_sha256_checks(tmp_path):
    export = ExportDir.open(make_export(tmp_path / "m"))
    digest = export.check_sha256("onnx")
    assert digest == sha256_of(tmp_path / "m" / "model.onnx") and export.sha256_matches("onnx")
    (tmp_path / "m" / "model.onnx").write_bytes(b"replaced")
    assert not export.sha256_matches("onnx")
    with pytest.raises(UserError, match="does not match the sha256 in its manifest"):
        export.check_sha256("onnx")
    (tmp_path / "m" / "model.onnx").unlink()
    assert not export.sha256_matches("onnx")
    with pytest.raises(UserError, match=r"has no onnx model \(model.onnx\); export it with"):
        export.check_sha256("onnx")
    assert export.untrusted("onnx") == "model.onnx is missing"


def test_an_artifact_the_manifest_lists_no_sha256_for_is_never_loaded(tmp_path):
    """What serve (check_sha256), verify and bench (untrusted) share: only listed, unchanged artifacts load."""
    unrecorded = ExportDir.open(make_export(tmp_path / "n", formats={"onnx": {"file": "model.onnx"}}))
    with pytest.raises(UserError, match=r"has no sha256 in its manifest \(only listed artifacts are loaded\)"):
        unrecorded.check_sha256("onnx")
    assert not unrecorded.sha256_matches("onnx")
    assert unrecorded.untrusted("onnx") == "manifest.json lists no sha256 for model.onnx"
    unlisted = ExportDir.open(make_export(tmp_path / "u", formats={}))
    (tmp_path / "u" / "model.tflite").write_bytes(b"dropped here by someone")
    with pytest.raises(UserError, match="has no sha256 in its manifest"):
        unlisted.check_sha256("tflite")
    listed = ExportDir.open(make_export(tmp_path / "l"))
    assert listed.untrusted("onnx") is None
    (tmp_path / "l" / "model.onnx").write_bytes(b"replaced")
    assert "does not match the sha256" in listed.untrusted("onnx")


def test_sha256_and_size_of_files_and_directories(tmp_path):
    folder = tmp_path / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "data").write_bytes(b"weights!")
    assert size_of(folder) == 13 and size_of(folder / "saved_model.pb") == 5
    before = sha256_of(folder)
    assert before == sha256_of(folder) and before != sha256_of(folder / "saved_model.pb")
    (folder / "variables" / "data").rename(folder / "variables" / "other")  # same bytes, another name
    assert sha256_of(folder) != before
    import hashlib

    assert sha256_of(folder / "saved_model.pb") == hashlib.sha256(b"graph").hexdigest()


def test_export_is_current(tmp_path):
    out = make_export(tmp_path / "exports" / "m", formats={"onnx": {"status": "verified"},
                                                          "tflite": {"status": "failed-verification"}})
    run_dir = tmp_path / "exports" / "runs" / "run1"
    assert not export_is_current(out, run_dir, RUN_MANIFEST, ["onnx"])  # no verify.json yet
    (out / "verify.json").write_text(json.dumps({"formats": {"onnx": {"passed": True}, "tflite": {"passed": False}}}))
    assert export_is_current(out, run_dir, RUN_MANIFEST, ["onnx"])
    assert not export_is_current(out, run_dir, RUN_MANIFEST, ["onnx", "tflite"])  # tflite did not verify
    assert not export_is_current(out, run_dir, RUN_MANIFEST, ["tflite_int8"])  # never exported
    assert not export_is_current(out, tmp_path / "elsewhere", RUN_MANIFEST, ["onnx"])  # another run
    assert not export_is_current(out, run_dir, {**RUN_MANIFEST, "status": "training"}, ["onnx"])  # run changed
    assert not export_is_current(tmp_path / "nothing", run_dir, RUN_MANIFEST, [])


def test_stale_temporaries_of_killed_exports_are_cleaned(tmp_path):
    import os
    import subprocess
    import sys

    from export.exporter import _HOST, clean_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "exports" / "m"
    make_export(out)
    staged = out.parent / f".m.export-{_HOST}-{dead.pid}"
    (staged / "deep").mkdir(parents=True)
    (staged / "deep" / "model.onnx").write_bytes(b"x" * 1000)
    live = out.parent / f".m.export-{_HOST}-{os.getpid()}"  # a running export (this process) is left alone
    other_host = out.parent / f".m.export-otherhost-{dead.pid}"  # maybe running elsewhere (shared disk)
    other_name = out.parent / f".n.export-{_HOST}-{dead.pid}"  # another destination's
    for path in (live, other_host, other_name):
        path.mkdir()
    assert clean_stale(out) == [staged]
    assert not staged.exists() and live.exists() and other_host.exists() and other_name.exists()
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("staged_complete", [True, False])
def test_an_export_killed_during_its_swap_is_finished(tmp_path, staged_complete):
    import subprocess
    import sys

    from export.exporter import _HOST, clean_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m"
    old = make_export(tmp_path / f".m.old-{_HOST}-{dead.pid}")
    staged = tmp_path / f".m.export-{_HOST}-{dead.pid}"
    staged.mkdir()
    (staged / "labels.txt").write_text("new\n")
    if staged_complete:
        (staged / "manifest.json").write_text("{}")
    clean_stale(out)
    assert (out / "labels.txt").read_text() == ("new\n" if staged_complete else "cat\ndog\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert not old.exists()
