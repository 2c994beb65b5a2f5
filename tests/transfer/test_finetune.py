"""`transfer finetune` end to end: run directory, frozen/unfrozen weights, resume after kill -9, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from transfer.cli import main

TINY = ["--synthetic-train", "160", "--synthetic-test", "60", "--batch-size", "32", "--no-tensorboard"]


def _run(tmp_path, *args):
    return main(["finetune", *args, "--artifacts", str(tmp_path), *TINY])


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A 'pretrained' ResNet50 weights file: random weights with non-trivial BatchNorm statistics."""
    path = tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5"
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype("float32"))
    source.save_weights(path)
    return path


def test_finetune_writes_a_complete_run_and_freezes_exactly_what_it_should(tmp_path, resnet_weights, capsys):
    code = _run(tmp_path, "--backbone", "resnet50", "--weights", str(resnet_weights), "--image-size", "32",
                "--unfreeze", "4", "--head-epochs", "0", "--epochs", "1", "--lr", "0.01", "--fine-tune-lr", "0.01",
                "--name", "r50")
    assert code == 0
    out = capsys.readouterr().out
    assert "1 backbone layers trainable [conv5_block3_3_conv]" in out
    run = tmp_path / "runs" / "r50"
    for name in ("model.keras", "manifest.json", "evaluation.json", "history.csv", "config.json",
                 "plots/accuracy.png", "plots/loss.png", "plots/confusion.png", "checkpoints/state.json"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["trainable_layers"] == ["conv5_block3_3_conv"]
    assert manifest["model"]["unfreeze"] == "4" and manifest["model"]["backbone"] == "resnet50"
    assert manifest["input"]["shape"] == [32, 32, 3] and manifest["input"]["range"] == [0.0, 255.0]
    assert len(manifest["classes"]) == 10 and manifest["versions"]["tensorflow"]
    assert [p["phase"] for p in manifest["phases"]] == ["fine-tune"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["accuracy"] == manifest["metrics"]["test_accuracy"]
    assert "top5_accuracy" in evaluation and set(evaluation["per_class"]) == set(manifest["classes"])
    assert [row["phase"] for row in _history(run)] == ["fine-tune"]

    trained = keras.models.load_model(run / "model.keras").get_layer("resnet50")
    original = keras.applications.ResNet50(include_top=False, weights=str(resnet_weights), input_shape=(32, 32, 3))
    changed = set()
    for layer, before in zip(trained.layers, original.layers, strict=True):
        for w_after, w_before in zip(layer.weights, before.weights, strict=True):
            if not np.array_equal(np.asarray(w_after), np.asarray(w_before)):
                changed.add(layer.name)
    # Only the unfrozen conv moved; every other weight, BatchNorm statistics included, is bit-identical.
    assert changed == {"conv5_block3_3_conv"}


VGG_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--unfreeze", "blocks:1",
            "--head-epochs", "1", "--epochs", "1", "--name", "v"]


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory) -> Path:
    """A complete vgg16 run (caffe preprocessing: the RGB->BGR flip in-graph), trained once for the module."""
    artifacts = tmp_path_factory.mktemp("vgg")
    assert _run(artifacts, *VGG_ARGS) == 0
    return artifacts / "runs" / "v"


def test_rerunning_a_complete_run_trains_nothing_and_evaluate_agrees(vgg_run, capsys):
    tmp_path, args, run = vgg_run.parent.parent, VGG_ARGS, vgg_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["unfreeze"] == "blocks:1" and manifest["model"]["unfreeze_layers"] == 4
    assert [p["phase"] for p in manifest["phases"]] == ["head", "fine-tune"]
    assert manifest["phases"][0]["trainable_backbone_layers"] == []
    assert manifest["phases"][1]["trainable_backbone_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert manifest["phases"][1]["trainable_params"] > manifest["phases"][0]["trainable_params"]
    assert [row["phase"] for row in _history(run)] == ["head", "fine-tune"]
    stamp = (run / "model.keras").stat().st_mtime_ns
    capsys.readouterr()
    assert _run(tmp_path, *args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "model.keras").stat().st_mtime_ns == stamp
    before = json.loads((run / "evaluation.json").read_text())
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {before['accuracy']:.4f}" in out
    assert f"balanced accuracy {before['balanced_accuracy']:.4f}, macro-F1 {before['macro_f1']:.4f}" in out
    # a different config under the same name is refused, nothing is touched
    assert _run(tmp_path, *args[:-1], "v", "--lr", "0.5") == 2
    assert "different config (train.lr: 0.001 -> 0.5)" in capsys.readouterr().err
    assert (run / "model.keras").stat().st_mtime_ns == stamp


def test_a_runs_model_loads_with_plain_keras_and_predicts_identically(vgg_run, tmp_path, plain_keras_predict):
    """model.keras is self-contained: a fresh Python that never imports this project loads it with
    keras.saving.load_model, and its predictions are identical."""
    model = keras.saving.load_model(vgg_run / "model.keras")
    assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {"keras"}  # built-in layers only
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    fresh = plain_keras_predict(vgg_run / "model.keras", x, tmp_path)
    np.testing.assert_array_equal(fresh, model.predict(x, verbose=0))


@pytest.mark.slow
def test_synthetic_set_is_learned_well_above_chance(tmp_path):
    code = main(["finetune", "--backbone", "resnet50v2", "--weights", "none", "--image-size", "32", "--unfreeze", "all",
                 "--head-epochs", "0", "--epochs", "2", "--fine-tune-lr", "1e-3", "--synthetic-train", "800",
                 "--synthetic-test", "200", "--augment", "none", "--no-tensorboard", "--artifacts", str(tmp_path),
                 "--name", "learn"])
    assert code == 0
    accuracy = json.loads((tmp_path / "runs" / "learn" / "evaluation.json").read_text())["accuracy"]
    assert accuracy > 0.4, accuracy  # chance is 0.1


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_epoch(tmp_path):
    args = [sys.executable, "-m", "transfer", "finetune", "--backbone", "mobilenetv2", "--weights", "none",
            "--image-size", "32", "--unfreeze", "all", "--head-epochs", "2", "--epochs", "4", "--patience", "50",
            "--artifacts", str(tmp_path), "--name", "resume", *TINY]
    run = tmp_path / "runs" / "resume"
    state = run / "checkpoints" / "state.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 3:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["epoch"]
    assert 3 <= done < 6
    assert not (run / "manifest.json").exists()  # a killed run never looks complete
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoint: {done} epochs done" in result.stdout
    epochs = [int(row["epoch"]) for row in _history(run)]
    assert epochs == [1, 2, 3, 4, 5, 6]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["epochs_run"] == 6


def _corrupt_folder(root: Path) -> Path:
    from PIL import Image

    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((12, 12, 3), i * 20, np.uint8)).save(root / cls / f"{i}.png")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "mobilenet2"], "unknown backbone 'mobilenet2'; did you mean 'mobilenetv2'?"),
        (["--dataset", "cifar1"], "unknown dataset 'cifar1'; did you mean 'cifar10'?"),
        (["--dataset", "folder:/nonexistent/photos"], "/nonexistent/photos"),
        (["--backbone", "vgg16", "--image-size", "16"], "--image-size 16 is below vgg16's minimum of 32"),
        (["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--unfreeze", "40"],
         "--unfreeze 40 exceeds vgg16's 18 layers"),
        (["--unfreeze", "some"], "--unfreeze 'some' is not 0"),
        (["--unfreeze", "blocks:0"], "blocks:N needs a number of blocks N >= 1"),
        (["--unfreeze", "²"], "--unfreeze '²' is not 0"),  # a digit to str.isdigit, not to int()
        (["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--unfreeze", "blocks:6"],
         "--unfreeze blocks:6 exceeds vgg16's 5 blocks"),
        (["--head", "gap,dense"], "--head token 'dense'"),
        (["--weights", "/nonexistent/w.h5"], "--weights '/nonexistent/w.h5' is not a file"),
        (["--augment", "medium"], "medium"),
        (["--lr", "-1"], "--lr -1.0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    code = _run(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_empty_class_folder_is_refused(tmp_path, capsys):
    folder = _corrupt_folder(tmp_path / "photos")
    assert _run(tmp_path, "--dataset", f"folder:{folder}", "--backbone", "vgg16", "--weights", "none") == 2
    err = capsys.readouterr().err
    assert "empty" in err and err.count("\n") == 1


def test_unwritable_artifacts_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["finetune", "--backbone", "vgg16", "--weights", "none", "--image-size", "32",
                 "--artifacts", str(blocker / "sub"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and str(blocker) in err and "--artifacts" in err and err.count("\n") == 1


def test_offline_dataset_download_is_one_line(tmp_path, capsys, monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert _run(tmp_path, "--dataset", "cifar10") == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and "https://" in err and "--data-dir" in err and err.count("\n") == 1


def test_subprocess_error_output_is_exactly_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "transfer", "finetune", "--backbone", "resnet5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "did you mean 'resnet50'?" in result.stderr


def test_backbones_command_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0", "hub:"):
        assert name in out
    assert "14,714,688" in out


def test_scratch_backbone_exports_with_inference_batchnorm(tmp_path):
    """A from-scratch backbone's BatchNorm trains, but the saved model must not depend on the batch once exported."""
    import tensorflow as tf

    code = _run(tmp_path, "--backbone", "mobilenetv2", "--weights", "none", "--image-size", "48", "--unfreeze", "all",
                "--head-epochs", "0", "--epochs", "1", "--fine-tune-lr", "1e-2", "--name", "scratch")
    assert code == 0
    model = keras.models.load_model(tmp_path / "runs" / "scratch" / "model.keras")
    bn = [layer for layer in model.get_layer("mobilenetv2_1.00_48").layers
          if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "sm"))
    serve = exported.serve
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    reference = model.predict(x, verbose=0)
    np.testing.assert_allclose(serve(x).numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(serve(x[:1]).numpy(), reference[:1], atol=1e-5)  # no batch statistics


def _colour_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes of 48 px JPEGs, red and blue with grain: a folder any model separates."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for name, hue in (("blue", (30, 40, 220)), ("red", (220, 40, 30))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(hue) + rng.integers(-40, 41, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def test_finetune_on_a_folder_trains_at_the_model_size_and_its_export_verifies(tmp_path, capsys):
    """Files are decoded at the backbone's --image-size (no --folder-image-size): the run's input, model.keras and
    the manifest are that size; evaluate and export (int8 calibration and verification decode the folder again)
    work on the streamed splits."""
    from export.contract import FAILED_EXPORT, VERIFIED
    from export.exporter import ExportConfig, run_export
    from transfer.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from transfer.recipes import finetune_recipe
    from transfer.runner import execute, reevaluate

    folder = _colour_folder(tmp_path / "photos")
    data = DataConfig(dataset=f"folder:{folder}", folder_image_size=None, val_split=0.2, test_split=0.2)
    train = TrainConfig(batch_size=8, epochs=1, head_epochs=0, tensorboard=False)
    model_cfg = ModelConfig(backbone="mobilenetv2", weights="none", image_size=40, unfreeze="0")
    recipe = finetune_recipe(model_cfg, data.dataset, train.seed)
    run = execute(recipe, data, AugmentConfig(), train, RunConfig(artifacts=str(tmp_path), name="photos"))
    assert "files decoded at 40x40 (the model's input size; cache none)" in capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [40, 40, 3] and manifest["model"]["image_size"] == 40
    assert manifest["dataset"]["sizes"] == {"train": 14, "val": 5, "test": 5}
    info = json.loads((run / "dataset.json").read_text())["info"]
    assert info["decode"] == {"size": 40, "chosen_by": "the model's input size", "cache": "none"}
    model = keras.models.load_model(run / "model.keras")
    assert model.input_shape == (None, 40, 40, 3)
    assert "resize" not in [layer.name for layer in model.layers]  # decoded at the size the backbone sees

    assert reevaluate(run)["accuracy"] == manifest["metrics"]["test_accuracy"]
    result = run_export(ExportConfig(run_dir=str(run), formats="tflite", quantize="int8", out=str(tmp_path / "exp")))
    formats = result.manifest["export"]["formats"]
    assert formats["tflite"]["status"] == VERIFIED, formats["tflite"]
    assert formats["tflite_int8"]["status"] != FAILED_EXPORT, formats["tflite_int8"]  # calibrated on the folder
