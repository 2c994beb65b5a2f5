"""Scratch baselines: registry, published parameter counts, model contract, protocols, the ``baseline`` command."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from transfer import baselines
from transfer.baselines import AUG_87, AUG_SEEDS, BASELINES, build_baseline, get_baseline, param_counts
from transfer.cli import main
from transfer.config import TrainConfig
from transfer.errors import UserError
from transfer.freezing import Unfreeze, parse_unfreeze
from transfer.train import plan_phases

TINY = ["--synthetic-train", "200", "--synthetic-test", "60", "--limit-train", "64", "--epochs", "1",
        "--batch-size", "32", "--no-tensorboard"]

PUBLISHED = {  # seed 000 exercise #2, on 32x32x3
    "vgg1": (1_060_138, 0), "vgg2": (591_274, 0), "vgg3": (550_570, 0), "vgg3-dropout": (550_570, 0),
    "vgg3-l2": (550_570, 0), "vgg3-aug": (550_570, 0), "vgg3-dropout-l2": (550_570, 0),
    "vgg3-dropout-l2-aug": (550_570, 0), "vgg3-dropout-bn": (552_874, 1_152), "vgg3-dropout-l2-bn": (552_874, 1_152),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    total, non_trainable = PUBLISHED[name]
    counts = param_counts(name, (32, 32, 3), 10)
    assert counts["params"] == total == BASELINES[name].published_params
    assert counts["non_trainable_params"] == non_trainable


def test_registry_has_every_seed_model():
    expected = set(PUBLISHED) | {"cifar-aug-87", "lenet5", "lenet5-dropout", "lenet5-bn", "lenet5-aug",
                                 "vgg16-like", "vgg19-like", "fashion-mnist-cnn", "mnist-cnn"}
    assert expected <= set(BASELINES)


def test_regularisers_compose_on_one_spec():
    plain, both = get_baseline("vgg3"), get_baseline("vgg3-dropout-l2-aug")
    strip = [op for op in both.layers if op.kind != "dropout"]
    assert strip == list(plain.layers)
    assert both.l2 == 0.001 and both.augment == AUG_SEEDS and plain.l2 is None and plain.augment is None
    rates = [op.size for op in get_baseline("vgg3-dropout-bn").layers if op.kind == "dropout"]
    assert rates == [0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_builds_under_the_model_contract(name):
    row = get_baseline(name)
    shapes = [(32, 32, 3)] + ([(28, 28, 3)] if row.min_size() <= 28 else [])
    for shape in shapes:
        model = build_baseline(name, shape, num_classes=10)
        assert tuple(model.input_shape) == (None, *shape)
        preprocess = model.layers[1]  # built-in Keras layers only: model.keras loads without this project
        assert isinstance(preprocess, keras.layers.Rescaling) and preprocess.scale == [1 / 255] * 3
        assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {"keras"}
        # Augmentation lives in the tf.data pipeline, never in the saved model (it would break export).
        assert not any(type(layer).__name__.startswith("Random") for layer in model.layers)
        if name in ("vgg1", "lenet5", "mnist-cnn", "fashion-mnist-cnn"):
            out = model(np.random.default_rng(0).uniform(0, 255, (2, *shape)).astype("float32"), training=False)
            np.testing.assert_allclose(np.sum(out, axis=1), 1.0, rtol=1e-5)
    if row.min_size() > 28:
        with pytest.raises(UserError, match=f"at least {row.min_size()}px"):
            build_baseline(name, (28, 28, 3))


def test_l2_reaches_every_hidden_kernel_but_not_the_output():
    model = build_baseline("vgg3-l2")
    regularised = [layer.name for layer in model.layers if getattr(layer, "kernel_regularizer", None) is not None]
    assert len(regularised) == 7 and "predictions" not in regularised


def test_unknown_baseline_names_the_closest_match():
    with pytest.raises(UserError, match="did you mean 'vgg3-dropout'"):
        get_baseline("vgg3-drop")


def test_no_backbone_means_one_phase_and_finetune_plans_are_unchanged():
    cfg = TrainConfig(epochs=4, head_epochs=2, lr=1e-3, fine_tune_lr=1e-4)
    (phase,) = plan_phases(cfg, Unfreeze(None, "all"), has_backbone=False)
    assert (phase.name, phase.start_epoch, phase.end_epoch, phase.lr) == ("train", 0, 4, 1e-3)
    assert [p.name for p in plan_phases(cfg, parse_unfreeze("all"))] == ["head", "fine-tune"]
    assert [(p.name, p.end_epoch) for p in plan_phases(cfg, parse_unfreeze("0"))] == [("head", 4)]


def _resolved(monkeypatch, argv) -> tuple[TrainConfig, object]:
    """The training and augmentation configs ``transfer baseline ARGV`` would run with (nothing trains)."""
    seen = {}
    monkeypatch.setattr("transfer.runner.execute",
                        lambda recipe, data, augment, train, run: seen.update(train=train, augment=augment))
    assert main(["baseline", *argv]) == 0
    return seen["train"], seen["augment"]


def test_protocols_fill_only_what_the_user_did_not_give(monkeypatch):
    train, augment = _resolved(monkeypatch, ["--model", "vgg3"])
    assert (train.batch_size, train.epochs, train.patience, augment.resolved()["flip"]) == (64, 100, 5, False)
    assert train.head_epochs == 0
    _, augment = _resolved(monkeypatch, ["--model", "vgg3-aug"])
    assert augment.resolved() == AUG_SEEDS.resolved()
    train, augment = _resolved(monkeypatch, ["--model", "vgg3", "--protocol", "aug87", "--batch-size", "32",
                                             "--shift", "0.05"])
    assert (train.batch_size, train.optimizer, train.epochs) == (32, "adam", 250)
    assert augment.resolved() == {**AUG_87.resolved(), "shift": 0.05}
    _, augment = _resolved(monkeypatch, ["--model", "vgg3-aug", "--augment", "none"])
    assert augment.resolved()["flip"] is False


def test_baseline_recipe_builds_a_model_without_backbone_that_trains_whole(tiny_synthetic):
    from transfer.baselines import BaselineConfig, baseline_recipe

    recipe = baseline_recipe(BaselineConfig("lenet5"), "synthetic", seed=3)
    assert (recipe.kind, recipe.default_name, recipe.model_config) == ("baseline", "lenet5_synthetic_s3",
                                                                        BaselineConfig("lenet5"))
    built = recipe.build(tiny_synthetic)
    assert built.set_trainable is None and built.unfreeze == Unfreeze(None, "all")
    assert built.described["unfreeze"] == "all" and built.model.output_shape == (None, 10)


def test_baseline_cli_writes_a_complete_run(tmp_path, capsys, plain_keras_predict):
    argv = ["baseline", "--model", "vgg3-dropout-bn", *TINY, "--artifacts", str(tmp_path)]
    assert main(argv) == 0
    run = tmp_path / "runs" / "vgg3-dropout-bn_synthetic"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "baseline" and manifest["status"] == "complete"
    model = manifest["model"]
    assert (model["baseline"], model["params"], model["trainable_params"]) == ("vgg3-dropout-bn", 552_874, 551_722)
    assert model["unfreeze"] == "all" and model["backbone"] is None and model["image_size"] == 32
    assert [p["phase"] for p in manifest["phases"]] == ["train"]
    assert manifest["config"]["train"]["batch_size"] == 32 and manifest["config"]["augment"]["preset"] == "none"
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert manifest["metrics"]["test_accuracy"] == evaluation["accuracy"]
    loaded = keras.models.load_model(run / "model.keras")
    assert loaded.count_params() == 552_874
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    fresh = plain_keras_predict(run / "model.keras", x, tmp_path / "plain")
    np.testing.assert_array_equal(fresh, loaded.predict(x, verbose=0))
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--model", "vgg3-dropuot"], "did you mean 'vgg3-dropout'"),
    (["--model", "vgg3", "--protocol", "seed"], "unknown protocol 'seed'"),
    (["--model", "vgg3", "--rotation", "3"], "rotation=3.0 is out of range"),
])
def test_bad_baseline_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert main(["baseline", *argv, *TINY, "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_baselines_command_lists_counts(capsys):
    assert main(["baselines", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vgg1"]["params"] == 1_060_138 and rows["cifar-aug-87"]["augment"].startswith("flip")
    assert set(rows) == set(BASELINES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_trains_one_step_through_the_cli(tmp_path, name):
    argv = ["baseline", "--model", name, *TINY, "--limit-train", "32", "--artifacts", str(tmp_path)]
    assert main(argv) == 0
    run = next((tmp_path / "runs").iterdir())
    manifest = json.loads(Path(run / "manifest.json").read_text())
    assert manifest["model"]["baseline"] == name and manifest["metrics"]["epochs_run"] == 1
    assert manifest["model"]["params"] == param_counts(name)["params"]


def test_spatial_check_matches_keras():
    # The size arithmetic used for min_size agrees with the shapes Keras computes.
    for name in ("lenet5", "mnist-cnn", "fashion-mnist-cnn"):
        row = get_baseline(name)
        model = build_baseline(name, (row.min_size(), row.min_size(), 3))
        assert model.output_shape == (None, 10)
        assert baselines._spatial(row.layers, row.min_size() - 1) < 1
