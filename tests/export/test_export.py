"""export/: every format of the table round-trips a tiny trained run and passes parity verification; the directory
it writes is what export.contract.ExportDir reads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from export.contract import ExportDir, export_is_current, sha256_of
from export.exporter import calibration_images
from export.formats import FORMATS, ExportContext, read_embedded_labels
from export.verify import verify
from transfer.cli import main
from transfer.data import Split
from transfer.errors import UserError

TINY = ["--image-size", "32", "--head-epochs", "0", "--epochs", "1", "--synthetic-train", "200",
        "--synthetic-test", "60", "--no-tensorboard"]


def _train(artifacts, name, *extra):
    code = main(["finetune", *TINY, *extra, "--artifacts", str(artifacts), "--name", name])
    assert code == 0
    return artifacts / "runs" / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    return _train(artifacts, "tiny", "--backbone", "mobilenetv2", "--weights", "none", "--unfreeze", "all")


@pytest.fixture(scope="module")
def tiny_export(tiny_run):
    code = main(["export", str(tiny_run), "--int8-io", "--calibration-samples", "64"])
    assert code == 0
    out = tiny_run.parent.parent / "exports" / "tiny"
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def held_out_split(tiny_run):
    from transfer.data import load_run_dataset

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    dataset = load_run_dataset(manifest, tiny_run)
    return dataset.test.x.astype(np.float32), dataset.test.y


@pytest.fixture(scope="module")
def keras_probs(tiny_run, held_out_split):
    import keras

    import transfer.layers  # noqa: F401

    return keras.models.load_model(tiny_run / "model.keras").predict(held_out_split[0], verbose=0)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_round_trips_and_verifies(tiny_export, held_out_split, keras_probs, name):
    out, manifest = tiny_export
    row = FORMATS[name]
    entry = manifest["export"]["formats"][name]
    assert entry["status"] == "verified", entry
    assert entry["file"] == row.file and (out / row.file).exists()
    assert entry["sha256"] == sha256_of(out / row.file) and entry["size_bytes"] > 0
    assert entry["inputs"][0]["shape"] == [None, 32, 32, 3] and entry["outputs"][0]["shape"] == [None, 10]
    verified = json.loads((out / "verify.json").read_text())
    report = verified["formats"][name]
    # every image but the 64 int8 calibration ones: 60 test (labelled), 20 validation, 180 - 64 training
    assert verified["images"] == {"test": 60, "val": 20, "train": 116}
    assert report["passed"] and report["samples"] == 196 and report["test_samples"] == 60
    assert report["agreement_ci95"][0] <= report["top1_agreement"] <= report["agreement_ci95"][1]
    assert entry["verification"]["top1_agreement"] == report["top1_agreement"]
    # the artifact loads in its own runtime and agrees with Keras, checked by the same function export uses
    predictor = row.load(out / row.file)
    again = verify(keras_probs, predictor, held_out_split[0], held_out_split[1], row.thresholds)
    assert again["passed"], again["failures"]
    assert again["max_abs_diff"] <= report["max_abs_diff"] + 1e-6  # the test images are among the verified ones
    assert again["accuracy"] == pytest.approx(report["accuracy"])


def test_export_writes_labels_and_source(tiny_export, tiny_run):
    out, manifest = tiny_export
    classes = manifest["classes"]
    assert (out / "labels.txt").read_text().splitlines() == classes
    assert manifest["export"]["source_run"] == str(tiny_run.resolve())
    assert manifest["input"]["shape"] == [32, 32, 3] and manifest["status"] == "complete"
    for name in ("tflite", "tflite_int8"):
        assert read_embedded_labels(out / FORMATS[name].file) == classes


def test_the_contract_reads_what_the_exporter_writes(tiny_export, tiny_run):
    out, manifest = tiny_export
    export = ExportDir.open(out)
    assert export.name == "tiny" and list(export.classes) == manifest["classes"] and export.input_shape == (32, 32, 3)
    assert export.exported_at == manifest["export"]["exported_at"] is not None
    assert export.source_run == tiny_run.resolve() and export.source_run_name == "tiny"
    assert set(export.formats()) == set(FORMATS)
    for name, row in FORMATS.items():
        assert export.path_of(name) == (out / row.file).resolve() and export.sha256_matches(name)
        assert export.check_sha256(name) == manifest["export"]["formats"][name]["sha256"]
    assert set(export.verification()) == set(FORMATS)
    run_manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert export_is_current(out, tiny_run, run_manifest, list(FORMATS))
    assert not export_is_current(out, tiny_run.parent, run_manifest, list(FORMATS))


def test_a_bare_onnxruntime_user_gets_labels_input_facts_and_a_named_output(tiny_export):
    """Only onnxruntime and the file: the labels, the input the graph takes and what comes out, in its metadata."""
    import onnxruntime

    out, manifest = tiny_export
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == manifest["classes"]
    assert json.loads(meta["input_shape"]) == ["batch", 32, 32, 3] and meta["input_layout"] == "NHWC"
    assert json.loads(meta["input_pixel_range"]) == [0, 255] and meta["input_color"] == "RGB"
    assert "32x32" in meta["preprocessing"]
    assert [o.name for o in session.get_outputs()] == [meta["output_name"]] == ["probabilities"]
    assert [i.name for i in session.get_inputs()] == [meta["input_name"]]
    pixels = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    (probs,) = session.run(["probabilities"], {meta["input_name"]: pixels})
    np.testing.assert_allclose(probs, FORMATS["onnx"].load(out / "model.onnx")(pixels), atol=1e-6)
    assert manifest["export"]["formats"]["onnx"]["labels"]["metadata_props"] == sorted(meta)


def test_onnx_int8_is_a_static_qdq_quantization_of_model_onnx(tiny_export, held_out_split):
    """onnx_int8: QuantizeLinear/DequantizeLinear around int8 weights (smaller than float), calibrated on the same
    training images as tflite_int8, and what a bare ONNX Runtime user needs kept through quantization."""
    import onnx
    import onnxruntime

    out, manifest = tiny_export
    entries = manifest["export"]["formats"]
    entry = entries["onnx_int8"]
    model = onnx.load(str(out / "model_int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert entry["quantization"]["nodes"] == {"QuantizeLinear": ops.count("QuantizeLinear"),
                                              "DequantizeLinear": ops.count("DequantizeLinear")}
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(i.dims) for i in int8) > 100_000  # the conv and dense weights, per channel
    assert entry["size_bytes"] < entries["onnx"]["size_bytes"] / 2
    assert entry["calibration_samples"] == entries["tflite_int8"]["calibration_samples"] == 64
    assert entry["opset"] == entries["onnx"]["opset"] == 15
    session = onnxruntime.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == manifest["classes"] and json.loads(meta["input_shape"])[1:] == [32, 32, 3]
    assert [o.name for o in session.get_outputs()] == [meta["output_name"]] == ["probabilities"]
    assert entry["labels"]["metadata_props"] == entries["onnx"]["labels"]["metadata_props"]
    assert entry["inputs"][0]["dtype"] == "float32"  # raw pixels in, as model.onnx takes them
    x = held_out_split[0][:16]
    (probs,) = session.run(["probabilities"], {meta["input_name"]: x})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # the final Softmax stays float


def test_calibration_uses_the_same_images_for_every_int8_format(tiny_run, tmp_path, monkeypatch):
    """tflite_int8 and onnx_int8 are calibrated on the very same training images (ExportContext.calibration), and the
    float ONNX model is exported once for onnx and onnx_int8."""
    from export import formats

    seen, made = [], []
    calibration, make_onnx = ExportContext.calibration, formats._make_onnx

    def recording(self, n):
        images = calibration(self, n)
        seen.append(images.copy())
        return images

    def counting(ctx, dest, opset):
        made.append(opset)
        return make_onnx(ctx, dest, opset)

    monkeypatch.setattr(ExportContext, "calibration", recording)
    monkeypatch.setattr(formats, "_make_onnx", counting)
    assert main(["export", str(tiny_run), "--formats", "onnx,tflite_int8,onnx_int8", "--no-verify",
                 "--calibration-samples", "8", "--out", str(tmp_path / "x")]) == 0
    assert len(seen) == 2 and seen[0].shape == (8, 32, 32, 3) and np.array_equal(seen[0], seen[1])
    assert made == [15]


def test_onnx_has_a_dynamic_batch(tiny_export):
    import onnx

    out, manifest = tiny_export
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert manifest["export"]["formats"]["onnx"]["opset"] == 15
    predictor = FORMATS["onnx"].load(out / "model.onnx")
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        probs = predictor(rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32))
        assert probs.shape == (batch, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_int8_quantization_parameters_are_in_the_manifest(tiny_export):
    _, manifest = tiny_export
    entry = manifest["export"]["formats"]["tflite_int8"]
    assert entry["int8_io"] is True and entry["calibration_samples"] == 64
    assert entry["inputs"][0]["dtype"] == "int8" and entry["outputs"][0]["dtype"] == "int8"
    for side in ("input", "output"):
        q = entry["quantization"][side]
        assert len(q["scale"]) == 1 and q["scale"][0] > 0
        assert -128 <= q["zero_point"][0] <= 127


def test_bench_reports_every_format(tiny_export, capsys):
    out, manifest = tiny_export
    assert main(["bench", str(out), "--iterations", "2", "--warmup", "1", "--threads", "1"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["threads"] == 1
    assert set(report["formats"]) == set(manifest["export"]["formats"])
    for result in report["formats"].values():
        assert result["status"] == "verified" and result["accuracy"] is not None
        assert {"p50_ms", "p90_ms", "p99_ms", "throughput_ips"} <= set(result["batch32"])
    assert "tflite_int8" in capsys.readouterr().out


def test_a_broken_artifact_is_kept_marked_and_explained(tiny_run, tmp_path, monkeypatch, capsys):
    """An artifact that is not the model (its outputs permuted, as a label mix-up would) fails verification; export
    writes every artifact all the same, marks the broken one, and says in one line which, why and what to do."""
    import keras

    real = FORMATS["tflite"].export

    def permuted(ctx, dest, options):
        head = keras.layers.Dense(10, use_bias=False, trainable=False, name="permute")
        outputs = head(ctx.model.outputs[0])
        head.set_weights([np.roll(np.eye(10, dtype=np.float32), 1, axis=1)])  # output i + 1 = probability i
        wrong = keras.Model(ctx.model.inputs[0], outputs)
        return real(ExportContext(wrong, ctx.work_dir / "permuted"), dest, options)

    monkeypatch.setitem(FORMATS, "tflite", dataclasses.replace(FORMATS["tflite"], export=permuted))
    out = tmp_path / "x"
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--formats", "savedmodel,tflite", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "transfer export: 1 of 2 formats failed: tflite: failed-verification (" in err
    assert f"kept in {out}, marked failed-verification" in err and f"`transfer verify {out} --verify-samples" in err
    formats = json.loads((out / "manifest.json").read_text())["export"]["formats"]
    assert formats["tflite"]["status"] == "failed-verification" and formats["savedmodel"]["status"] == "verified"
    assert formats["tflite"]["sha256"] == sha256_of(out / "model.tflite")  # written and listed, marked
    # the 1-epoch model barely decides anything: its permuted copy fails on |diff| (and agreement, where it decides)
    assert formats["tflite"]["verification"]["top1_agreement"] < 0.2 and formats["tflite"]["verification"]["failures"]
    monkeypatch.undo()
    assert main(["verify", str(out), "--verify-samples", "50"]) == 1  # still broken when checked again
    assert "tflite: failed-verification" in capsys.readouterr().err


def test_tampered_artifact_fails_verification_unloaded(tiny_export, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "copy"
    shutil.copytree(tiny_export[0], out)
    model = onnx.load(str(out / "model.onnx"))
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32 and values.size > 100:
            init.CopyFrom(numpy_helper.from_array(values * 1.5 + 0.1, init.name))
    onnx.save(model, str(out / "model.onnx"))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "onnx: failed-verification" in err and "tflite" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_entry = manifest["export"]["formats"]["onnx"]
    assert onnx_entry["status"] == "failed-verification" and onnx_entry["sha256_matches"] is False
    assert onnx_entry["error"] == ("not loaded: model.onnx does not match the sha256 in manifest.json "
                                   "(corrupt or replaced)")
    assert manifest["export"]["formats"]["tflite"]["status"] == "verified"
    assert not json.loads((out / "verify.json").read_text())["formats"]["onnx"]["passed"]
    assert main(["bench", str(out), "--iterations", "1", "--warmup", "0", "--threads", "1"]) == 0
    assert "bench: onnx not loaded: model.onnx does not match the sha256" in capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())["formats"]
    assert "batch1" not in report["onnx"] and "batch1" in report["tflite"]


def test_verify_never_loads_an_artifact_the_manifest_does_not_list(tiny_export, tmp_path, capsys):
    out = tmp_path / "unlisted"
    shutil.copytree(tiny_export[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["export"]["formats"]["savedmodel"]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out), "--verify-samples", "8"]) == 1
    assert "savedmodel: failed-verification" in capsys.readouterr().err
    entry = json.loads((out / "manifest.json").read_text())["export"]["formats"]["savedmodel"]
    assert entry["error"] == "not loaded: manifest.json lists no sha256 for saved_model"


def test_a_failing_format_is_recorded_and_the_rest_of_the_export_is_kept(tiny_export, tmp_path, monkeypatch, capsys):
    out = tmp_path / "partial"
    shutil.copytree(tiny_export[0], out)
    before = sha256_of(out / "model.tflite")

    def broken(ctx, dest, options):
        dest.write_bytes(b"half a file")
        raise RuntimeError("converter exploded\nwith a long traceback")

    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(FORMATS["onnx"], export=broken))
    assert main(["export", tiny_export[1]["export"]["source_run"], "--formats", "onnx", "--out", str(out),
                 "--no-verify"]) == 1
    assert "onnx: failed-export" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()  # the directory holds exactly what the manifest lists
    formats = json.loads((out / "manifest.json").read_text())["export"]["formats"]
    trace = formats["onnx"].pop("traceback")  # kept whole, so a bug in an exporter is not flattened to one line
    assert trace.startswith("Traceback") and "converter exploded\nwith a long traceback" in trace
    assert formats["onnx"] == {"file": "model.onnx", "status": "failed-export",
                               "error": "RuntimeError: converter exploded"}
    assert formats["tflite"]["status"] == "verified"  # formats of the earlier export of this run are kept
    assert sha256_of(out / "model.tflite") == before and ExportDir.open(out).sha256_matches("tflite")
    assert json.loads((out / "verify.json").read_text())["formats"]["tflite"]["passed"]  # and their reports
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_exports_of_two_runs_never_mix(tiny_run, tmp_path, capsys):
    """Re-exporting a run adds formats; another run's export is refused (one line naming --overwrite) and with
    --overwrite replaces the directory whole; killed exports' temporaries are cleaned on the way."""
    import subprocess
    import sys

    from export.exporter import _HOST

    run_b = tmp_path / "runs" / "other"
    shutil.copytree(tiny_run, run_b)
    manifest_b = json.loads((run_b / "manifest.json").read_text())
    (run_b / "manifest.json").write_text(json.dumps({**manifest_b, "created": "2000-01-01T00:00:00+00:00"}))
    out = tmp_path / "x"
    assert main(["export", str(tiny_run), "--formats", "tflite", "--out", str(out), "--verify-samples", "8"]) == 0

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".work-{dead.pid}").mkdir()  # what killed exports of earlier versions left inside the directory
    (out / f".model.onnx.tmp-{dead.pid}").write_bytes(b"x" * 1000)
    (tmp_path / f".x.export-{_HOST}-{dead.pid}").mkdir()  # and what a killed export leaves now
    assert main(["export", str(tiny_run), "--formats", "savedmodel", "--out", str(out), "--verify-samples", "8"]) == 0
    formats = json.loads((out / "manifest.json").read_text())["export"]["formats"]
    assert {n: f["status"] for n, f in formats.items()} == {"tflite": "verified", "savedmodel": "verified"}
    assert set(json.loads((out / "verify.json").read_text())["formats"]) == {"tflite", "savedmodel"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "x"]

    listing = _listing(out)
    capsys.readouterr()
    assert main(["export", str(run_b), "--formats", "tflite", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an export of another run" in err and "--overwrite" in err
    assert _listing(out) == listing and sorted(p.name for p in tmp_path.iterdir()) == ["runs", "x"]

    assert main(["export", str(run_b), "--formats", "tflite", "--out", str(out), "--overwrite",
                 "--verify-samples", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["source_run"] == str(run_b.resolve())
    assert list(manifest["export"]["formats"]) == ["tflite"]
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "evaluation.json", "labels.txt", "manifest.json",
                                                     "model.tflite", "verify.json"]
    assert list(json.loads((out / "verify.json").read_text())["formats"]) == ["tflite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "x"]


def test_an_interrupted_export_leaves_the_earlier_one_whole(tiny_export, tmp_path, monkeypatch, capsys):
    out = tmp_path / "kept"
    shutil.copytree(tiny_export[0], out)
    listing = {p: sha256_of(out / p) for p in _listing(out) if (out / p).is_file()}

    def interrupted(ctx, dest, options):
        dest.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setitem(FORMATS, "tflite", dataclasses.replace(FORMATS["tflite"], export=interrupted))
    assert main(["export", tiny_export[1]["export"]["source_run"], "--formats", "savedmodel,tflite", "--out",
                 str(out), "--no-verify"]) == 130
    assert {p: sha256_of(out / p) for p in _listing(out) if (out / p).is_file()} == listing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_a_directory_that_is_not_an_export_is_never_replaced(tiny_run, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(tiny_run), "--formats", "tflite", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not empty and holds no export" in err and "--out" in err
    assert _listing(out) == ["holiday.jpg"] and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_an_out_directory_that_is_not_writable_names_out(tiny_run, capsys):
    assert main(["export", str(tiny_run), "--formats", "tflite", "--out", "/proc/x/y"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export directory '/proc/x/y' is not writable" in err
    assert "pass --out DIR" in err and "--artifacts" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--formats", "onxx"], "unknown export format 'onxx'; did you mean 'onnx'?"),
        (["--quantize", "int4"], "unknown --quantize value 'int4'"),
        (["--formats", "savedmodel,tflite", "--opset", "13"], "--opset applies only to onnx"),
        (["--formats", "tflite", "--quantize", "fp16", "--int8-io"], "--int8-io applies only to tflite_int8"),
        (["--formats", "savedmodel", "--quantize", "int8"], "applies to tflite or onnx, which --formats does not"),
        (["--formats", "onnx", "--quantize", "fp16"], "applies to tflite, which --formats does not include"),
        (["--formats", "onnx_int8", "--opset", "11"], "--opset 11 is too old for onnx_int8, which needs 13"),
        (["--quantize", "int8", "--calibration-samples", "0"], "--calibration-samples 0 must be > 0"),
        (["--verify-samples", "0"], "invalid --verify-samples 0 (must be between 1 and 1,000,000)"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_run, tmp_path, capsys, argv, message):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_or_incomplete_run_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    incomplete = tmp_path / "runs" / "half"
    incomplete.mkdir(parents=True)
    (incomplete / "config.json").write_text("{}")
    (incomplete / "manifest.json").write_text(json.dumps({"status": "training"}))
    assert main(["export", str(incomplete)]) == 2
    assert "is incomplete" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()


def test_no_calibration_data_is_a_user_error():
    with pytest.raises(UserError, match="needs calibration data"):
        calibration_images(Split(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64)), 10)
    pixels = np.arange(20 * 2 * 2 * 3, dtype=np.uint8).reshape(20, 2, 2, 3)
    picked = calibration_images(Split(pixels, np.zeros(20, np.int64)), 5)
    assert picked.shape == (5, 2, 2, 3) and picked.dtype == np.float32


@pytest.mark.slow
def test_hub_backbone_run_exports(tmp_path):
    from hub_fixtures import save_hub_module

    hub = save_hub_module(tmp_path / "hub_module", with_variable_lists=True)
    run = _train(tmp_path, "hub", "--backbone", f"hub:{hub}", "--unfreeze", "0", "--synthetic-train", "100",
                 "--synthetic-test", "30")
    assert main(["export", str(run), "--formats", "savedmodel,tflite,onnx", "--quantize", "fp16"]) == 0
    formats = json.loads((tmp_path / "exports" / "hub" / "manifest.json").read_text())["export"]["formats"]
    assert {n: f["status"] for n, f in formats.items()} == dict.fromkeys(
        ("savedmodel", "tflite", "tflite_fp16", "onnx"), "verified")


@pytest.mark.slow
def test_scratch_baseline_run_exports(tmp_path):
    code = main(["baseline", "--model", "lenet5", "--epochs", "1", "--synthetic-train", "100", "--synthetic-test", "30",
                 "--no-tensorboard", "--artifacts", str(tmp_path), "--name", "scratch"])
    assert code == 0
    run = tmp_path / "runs" / "scratch"
    assert main(["export", str(run), "--formats", "tflite,onnx", "--quantize", "int8"]) == 0
    formats = json.loads((tmp_path / "exports" / "scratch" / "manifest.json").read_text())["export"]["formats"]
    assert {n: f["status"] for n, f in formats.items()} == dict.fromkeys(
        ("tflite", "tflite_int8", "onnx", "onnx_int8"), "verified")  # --quantize int8: each family's int8 variant
    shutil.rmtree(tmp_path / "exports")
