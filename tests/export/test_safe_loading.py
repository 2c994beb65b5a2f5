"""A run directory is data: a crafted model.keras cannot make export, verify, evaluate or compare run a graph from
outside it (transfer.runmodel.load_run_model, the one loader), and a refused model is one line, exit 2, nothing
written. The crafted runs are built here (tests/hub_fixtures.py): a Hub layer naming a SavedModel that writes a file
when called, outside the run directory; the same module embedded in the run; a Lambda layer."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from hub_fixtures import craft_hub_run, craft_run, save_hostile_module, save_hub_module

from export.contract import sha256_of
from transfer.cli import main
from transfer.compare.measure import measure_latency
from transfer.errors import UserError
from transfer.runmodel import load_run_model
from transfer.runner import reevaluate


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(module dir, marker path): calling the module writes the marker."""
    root = tmp_path_factory.mktemp("outside")
    marker = root / "graph-ran.txt"
    return save_hostile_module(root / "hostile_module", marker), marker


@pytest.fixture
def hostile_run(hostile, tmp_path):
    module, marker = hostile
    run = craft_hub_run(tmp_path / "artifacts" / "runs" / "crafted", module, embed=False)
    assert not marker.exists()
    yield run
    marker.unlink(missing_ok=True)


def _export_manifest(export_dir, run):
    """A hand-made export directory whose manifest's source_run is ``run`` (what `transfer verify` follows)."""
    manifest = json.loads((run / "manifest.json").read_text())
    export_dir.mkdir(parents=True)
    (export_dir / "model.onnx").write_bytes(b"not loaded")
    manifest["export"] = {"source_run": str(run), "formats": {"onnx": {"file": "model.onnx", "status": "verified",
                                                                       "sha256": sha256_of(export_dir / "model.onnx")}}}
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    (export_dir / "labels.txt").write_text("a\nb\n")
    return export_dir


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_the_crafted_run_is_hostile_when_trusted(hostile, hostile_run):
    """The control: with the opt-in, the loader builds the model from the handle and calling it writes the file."""
    _, marker = hostile
    model = load_run_model(hostile_run, trust_hub=True)
    model(np.zeros((1, 8, 8, 3), np.float32))
    assert marker.read_text() == "this graph ran"


def test_export_refuses_the_crafted_hub_run(hostile, hostile_run, capsys):
    _, marker = hostile
    artifacts = hostile_run.parent.parent
    assert main(["export", str(hostile_run)]) == 2
    _one_line_error(capsys, "hub layer 'hub_backbone' embeds no copy of its module", "--trust-hub-handle")
    assert main(["export", str(hostile_run), "--out", str(artifacts / "x" / "y")]) == 2
    assert not marker.exists()
    assert sorted(p.name for p in artifacts.iterdir()) == ["runs"]  # no exports/, no x/, no staging directory


def test_evaluate_refuses_the_crafted_hub_run(hostile, hostile_run, capsys):
    _, marker = hostile
    with pytest.raises(UserError, match="outside the run directory; pass --trust-hub-handle"):
        reevaluate(hostile_run)
    assert main(["evaluate", str(hostile_run)]) == 2
    _one_line_error(capsys, "embeds no copy of its module")
    assert not marker.exists() and not (hostile_run / "evaluation.json").exists()


def test_compare_latency_refuses_the_crafted_hub_run(hostile, hostile_run):
    _, marker = hostile
    with pytest.raises(UserError, match="embeds no copy of its module"):
        measure_latency(hostile_run / "model.keras", [8, 8, 3], runs=1, warmup=1)
    assert not marker.exists()


def test_verify_refuses_the_crafted_hub_run_named_by_an_export(hostile, hostile_run, tmp_path, capsys):
    _, marker = hostile
    export_dir = _export_manifest(tmp_path / "export", hostile_run)
    before = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    assert main(["verify", str(export_dir)]) == 2
    _one_line_error(capsys, "embeds no copy of its module", "--trust-hub-handle")
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in export_dir.iterdir()} == before  # nothing written


def test_a_hub_module_embedded_in_the_run_with_file_ops_is_refused(hostile, tmp_path, capsys):
    """Embedding the hostile module (its hash recorded, as training would) does not make it data: its graph writes
    files, so every loader refuses it too."""
    module, marker = hostile
    run = craft_hub_run(tmp_path / "runs" / "embedded", module, embed=True)
    with pytest.raises(UserError, match=r"runs ops that reach outside the model \(WriteFile\)"):
        load_run_model(run)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "WriteFile", "--trust-hub-handle")
    with pytest.raises(UserError, match="WriteFile"):
        measure_latency(run / "model.keras", [8, 8, 3], runs=1, warmup=1)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_embedded_module_that_was_changed_is_refused(tmp_path):
    import zipfile

    benign = save_hub_module(tmp_path / "benign", with_variable_lists=True)
    run = craft_hub_run(tmp_path / "runs" / "changed", benign, embed=True)
    archive = run / "model.keras"
    changed = run / "changed.keras"
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(changed, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data + b"\0" if item.filename.endswith("module/saved_model.pb") else data)
    changed.replace(archive)
    with pytest.raises(UserError, match="embeds a module whose sha256 differs from the one recorded"):
        load_run_model(run)


def test_a_lambda_layer_is_one_line_and_export_writes_nothing(tmp_path, capsys):
    import keras

    run = craft_run(tmp_path / "artifacts" / "runs" / "lambda", keras.layers.Lambda(lambda x: x[:, 0, 0, :] * 2))
    assert main(["export", str(run), "--formats", "onnx"]) == 2
    _one_line_error(capsys, "cannot be loaded safely", "Lambda")
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["runs"]
    assert main(["evaluate", str(run)]) == 2
    _one_line_error(capsys, "cannot be loaded safely")


def test_a_model_keras_that_is_not_an_archive_is_one_line(tmp_path):
    run = craft_run(tmp_path / "runs" / "junk", __import__("keras").layers.Flatten())
    (run / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="is not a readable Keras model archive"):
        load_run_model(run)
    (run / "model.keras").unlink()
    with pytest.raises(UserError, match="does not exist"):
        load_run_model(run)


def test_the_op_scan_finds_file_and_python_ops_and_passes_a_plain_network(tmp_path):
    import tensorflow as tf

    from transfer.layers import unsafe_ops

    class PrintsAndCallsPython(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            tf.print("seen", output_stream=f"file://{tmp_path / 'printed'}")
            return tf.numpy_function(lambda a: a.mean(axis=(1, 2)), [images], tf.float32)

    tf.saved_model.save(PrintsAndCallsPython(), str(tmp_path / "sneaky"))
    assert unsafe_ops(tmp_path / "sneaky") == {"PrintV2", "PyFunc"}
    assert unsafe_ops(save_hub_module(tmp_path / "benign", with_variable_lists=False)) == set()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "saved_model.pb").write_bytes(b"\xff not a protobuf")
    assert unsafe_ops(tmp_path / "garbage") == {"<unreadable graph>"}
