"""``--precision`` and ``--jit-compile``: mixed-precision training on what the machine supports, a float32 model.keras
and float32 exports, no dtype policy leaking out of a run, and one-line refusals where the device cannot do it."""

from __future__ import annotations

import csv
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from transfer import precision
from transfer.cli import main
from transfer.errors import UserError

TINY = ["--dataset", "digits", "--epochs", "2", "--no-tensorboard"]


def _policy() -> str:
    import keras

    return keras.mixed_precision.dtype_policy().name


def _bf16_trainable() -> str | None:
    """Why a mixed_bfloat16 run cannot train here (None: it can)."""
    try:
        precision.check_device("mixed_bfloat16")
    except UserError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name, gpus, flags, needle", [
    ("mixed_float16", [], {"avx512_bf16"}, "needs a GPU (compute capability >= 7.0); use mixed_bfloat16"),
    ("mixed_float16", [(6, 1)], set(), "compute capability >= 7.0, this one has 6.1"),
    ("mixed_bfloat16", [], {"avx2", "avx512f"}, "avx512_bf16 or amx_bf16 (this CPU has neither)"),
    ("mixed_bfloat16", [(7, 5)], {"avx512_bf16"}, "compute capability >= 8.0, this one has 7.5; use mixed_float16"),
    ("mixed_bfloat16", [(8, 0), (6, 0)], set(), "this one has 6.0"),  # the weakest GPU decides
])
def test_a_precision_the_device_cannot_do_is_one_line(name, gpus, flags, needle):
    with pytest.raises(UserError) as info:
        precision.check_device(name, gpus=gpus, flags=flags)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, gpus, flags, device", [
    ("float32", [], set(), "CPU"),
    ("mixed_float16", [(7, 0)], set(), "1 GPU (compute capability 7.0)"),
    ("mixed_bfloat16", [(9, 0), (9, 0)], set(), "2 GPUs (compute capability 9.0)"),
    ("mixed_bfloat16", [], {"fpu", "amx_bf16"}, "CPU (amx_bf16)"),
])
def test_a_precision_the_device_can_do_names_it(name, gpus, flags, device):
    assert precision.check_device(name, gpus=gpus, flags=flags) == device


def test_the_policy_is_scoped_to_the_build_and_restored_on_errors():
    assert _policy() == "float32"
    with pytest.raises(RuntimeError), precision.dtype_policy("mixed_bfloat16"):
        assert _policy() == "mixed_bfloat16"
        raise RuntimeError("build failed")
    assert _policy() == "float32"


def test_mixed_float16_compiles_with_loss_scaling_and_a_float32_softmax():
    """Keras wraps the optimizer itself when the model was built under mixed_float16 (compile only: no CPU
    training in float16)."""
    import keras

    from transfer.baselines import build_baseline
    from transfer.config import TrainConfig
    from transfer.train import compile_model

    with precision.dtype_policy("mixed_float16"):
        model = build_baseline("vgg1", (8, 8, 3), 10)
    assert _policy() == "float32"
    compile_model(model, TrainConfig(precision="mixed_float16"), 1e-3, 10, 10)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) and precision.loss_scaling(model)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "float16" for layer in convs)
    assert str(model.output.dtype) == "float32" and model.get_layer("predictions").compute_dtype == "float32"
    assert precision.variable_dtypes(model) == ["float32"]
    assert precision.to_float32(model) > 0 and precision.compute_dtypes(model) == {"float32": len(
        list(model._flatten_layers(include_self=True, recursive=True)))}

    float32 = build_baseline("vgg1", (8, 8, 3), 10)
    compile_model(float32, TrainConfig(), 1e-3, 10, 10)
    assert not isinstance(float32.optimizer, keras.optimizers.LossScaleOptimizer)


def test_bad_precision_in_a_config_is_one_line():
    from transfer.config import TrainConfig

    with pytest.raises(UserError, match="--precision 'fp8'"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(_bf16_trainable() is not None, reason=f"no bf16 training here: {_bf16_trainable()}")
def test_bfloat16_baseline_trains_saves_float32_and_exports_verified(tmp_path, capsys):
    import keras
    import onnx

    from transfer.baselines import build_baseline
    from transfer.data import load_run_dataset
    from transfer.runmodel import load_run_model

    art = tmp_path / "art"
    assert main(["baseline", "--model", "vgg1", *TINY, "--precision", "mixed_bfloat16", "--artifacts", str(art)]) == 0
    assert _policy() == "float32"  # nothing leaks into the rest of the process
    run = art / "runs" / "vgg1_digits_bf16"  # a mixed run's default name says so
    manifest = json.loads((run / "manifest.json").read_text())
    record = manifest["precision"]
    assert record["policy"] == "mixed_bfloat16" and record["device"].startswith(("CPU (", "1 GPU"))
    assert record["training_compute_dtypes"].get("bfloat16", 0) >= 5  # convs, pooling, dense computed in bf16
    assert record["output_dtype"] == "float32" and record["variable_dtypes"] == ["float32"]
    assert set(record["saved_compute_dtypes"]) == {"float32"} and record["loss_scaling"] is False
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "mixed_bfloat16"  # its identity
    assert "jit_compile" not in json.loads((run / "config.json").read_text())["train"]
    with open(run / "history.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]

    # model.keras computes in float32: every layer, every variable, and the weights moved from their initial values
    model = load_run_model(run)
    assert precision.compute_dtypes(model) == {"float32": len(list(model._flatten_layers(True, True)))}
    assert precision.variable_dtypes(model) == ["float32"]
    keras.utils.set_random_seed(0)
    with precision.dtype_policy("mixed_bfloat16"):
        initial = build_baseline("vgg1", (8, 8, 3), 10)
    assert _policy() == "float32"
    moved = [float(np.abs(a - b).max()) for a, b in zip(initial.get_weights(), model.get_weights(), strict=True)]
    assert min(moved[0::2]) > 1e-3  # every kernel trained

    # its float32 outputs give evaluation.json, and stay close to the same weights computing in bfloat16
    dataset = load_run_dataset(manifest, run)
    probs = model.predict(dataset.test.x.astype("float32"), verbose=0)
    assert probs.dtype == np.float32
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert float((probs.argmax(1) == dataset.test.y).mean()) == pytest.approx(evaluation["accuracy"])
    bf16 = load_run_model(run)
    for layer in bf16._flatten_layers(True, True):
        if layer.name != "predictions":
            layer.dtype_policy = "mixed_bfloat16"
    in_bf16 = bf16.predict(dataset.test.x.astype("float32"), verbose=0)
    assert np.abs(in_bf16 - probs).max() < 0.2 and (in_bf16.argmax(1) == probs.argmax(1)).mean() >= 0.9
    assert abs(record["test_accuracy_in_training_precision"] - evaluation["accuracy"]) <= 0.05

    # exported float32: onnx and tflite verified against the float32 Keras model, float32 in and out, no 16-bit ops
    out = tmp_path / "export"
    assert main(["export", str(run), "--formats", "onnx,tflite", "--out", str(out)]) == 0
    formats = json.loads((out / "manifest.json").read_text())["export"]["formats"]
    assert {name: row["status"] for name, row in formats.items()} == {"onnx": "verified", "tflite": "verified"}
    graph = onnx.load(str(out / "model.onnx")).graph
    sixteen = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    assert {t.type.tensor_type.elem_type for t in [*graph.input, *graph.output]} == {onnx.TensorProto.FLOAT}
    assert not [t.name for t in graph.initializer if t.data_type in sixteen]
    assert not [n for n in graph.node for a in n.attribute if a.name == "to" and a.i in sixteen]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out / "model.tflite"))
    assert {d["dtype"] for d in [*interpreter.get_input_details(), *interpreter.get_output_details()]} == {np.float32}
    assert not {d["dtype"] for d in interpreter.get_tensor_details()} & {np.float16, getattr(np, "bfloat16", None)}
    assert _policy() == "float32"
    capsys.readouterr()


def test_jit_compile_run_trains_with_xla_and_is_not_part_of_the_identity(tmp_path, capsys):
    art = tmp_path / "art"
    argv = ["baseline", "--model", "vgg1", "--dataset", "digits", "--epochs", "1", "--limit-train", "300",
            "--no-tensorboard", "--artifacts", str(art)]
    assert main([*argv, "--jit-compile"]) == 0
    run = art / "runs" / "vgg1_digits"
    record = json.loads((run / "manifest.json").read_text())["precision"]
    assert record["jit_compile"] is True and record["jit_compile_requested"] is True
    assert record["policy"] == "float32" and set(record["training_compute_dtypes"]) == {"float32"}
    config = json.loads((run / "config.json").read_text())["train"]
    assert "jit_compile" not in config and "precision" not in config  # float32 runs keep their old identity
    capsys.readouterr()
    assert main(argv) == 0  # the same run without XLA: already complete, nothing trains
    assert "already complete" in capsys.readouterr().out


def test_jit_compile_failures_are_one_line(monkeypatch):
    """A model Keras cannot XLA-compile, and an XLA compilation error in the training step, are one-line errors."""
    import tensorflow as tf

    from transfer.baselines import build_baseline
    from transfer.config import TrainConfig
    from transfer.train import _fit, compile_model

    cfg = TrainConfig(jit_compile=True)
    model = build_baseline("vgg1", (8, 8, 3), 10)
    model.layers[-1].supports_jit = False
    with pytest.raises(UserError, match="--jit-compile: Keras cannot XLA-compile this model"):
        compile_model(model, cfg, 1e-3, 10, 10)

    def fails(**kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "Detected unsupported operations when trying to compile\nmore")

    monkeypatch.setattr(model, "fit", fails)
    with pytest.raises(UserError, match=r"XLA could not compile the training step \(InvalidArgumentError: "
                                        r"Detected unsupported operations when trying to compile\)") as info:
        _fit(model, cfg, x=None)
    assert "\n" not in str(info.value)
    with pytest.raises(tf.errors.InvalidArgumentError):  # without --jit-compile the error is not XLA's: untouched
        _fit(model, TrainConfig(), x=None)
