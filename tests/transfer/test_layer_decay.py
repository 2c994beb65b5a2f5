"""--layer-decay (per-block learning rates) and --unfreeze-schedule (more blocks unfreeze as fine-tuning goes on):
the rate math on a tiny model with named blocks, the phases a schedule trains, and resume after a kill mid-schedule
giving the history of an uninterrupted run."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest

from transfer import train as train_module
from transfer.cli import main
from transfer.config import ModelConfig
from transfer.errors import UserError
from transfer.freezing import block_lr_factors, parse_schedule
from transfer.train import with_lr_factors

BLOCK = r"^(block\d+)_"


def _block_of(name: str) -> str | None:
    import re

    match = re.match(BLOCK, name)
    return match.group(1) if match else None


def _tiny():
    """stem -> block1 (2 layers) -> glue (no block) -> block2 -> block3 -> top, and a head outside the backbone."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(6, name="stem_dense")(inputs)
    x = keras.layers.Dense(6, name="block1_a")(x)
    x = keras.layers.Dense(6, name="block1_b")(x)
    x = keras.layers.Dense(6, name="glue_dense")(x)  # outside any block: counts in block2, the block above it
    x = keras.layers.Dense(6, name="block2_a")(x)
    x = keras.layers.Dense(6, name="block3_a")(x)
    x = keras.layers.Dense(6, name="top_dense")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    outer_in = keras.Input((6,))
    model = keras.Model(outer_in, keras.layers.Dense(3, name="head")(backbone(outer_in)))
    return model, backbone


EXPECTED = {"stem_dense": 0.25, "block1_a": 0.25, "block1_b": 0.25, "glue_dense": 0.5, "block2_a": 0.5,
            "block3_a": 1.0, "top_dense": 1.0}


def test_block_factors_follow_the_definition():
    _, backbone = _tiny()
    per_layer, per_block, member = block_lr_factors(backbone, _block_of, 0.5)
    assert per_layer == EXPECTED
    assert list(per_block.items()) == [("block3", 1.0), ("block2", 0.5), ("block1", 0.25)]  # top block first
    assert member["stem_dense"] == "block1" and member["glue_dense"] == "block2" and member["top_dense"] is None


@pytest.mark.parametrize("base", [keras.optimizers.SGD, keras.optimizers.Adam], ids=["SGD", "Adam"])
def test_each_variable_moves_by_its_blocks_factor_of_the_undecayed_step(base):
    """One step from the same weights and batch: with decay F=0.5 a variable two blocks below the top moves by
    exactly F**2 of what it moves with decay off (SGD without momentum, and Adam: the rate, not the gradient, is
    scaled)."""
    keras.utils.set_random_seed(0)
    model, backbone = _tiny()
    start = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    per_layer, _, _ = block_lr_factors(backbone, _block_of, 0.5)
    factors = {id(w): per_layer[layer.name] for layer in backbone.layers for w in layer.weights}

    def step(optimizer):
        model.set_weights(start)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        model.train_on_batch(x, y)
        return {w.path: np.asarray(w) - s for w, s in zip(model.weights, start, strict=True)}

    plain = step(base(0.1))
    decayed = step(with_lr_factors(base, factors)(0.1))
    checked = set()
    for layer in [*backbone.layers[1:], model.get_layer("head")]:
        factor = EXPECTED.get(layer.name, 1.0)
        for w in layer.weights:
            assert np.abs(plain[w.path]).max() > 0
            np.testing.assert_allclose(decayed[w.path], factor * plain[w.path], rtol=1e-4, atol=1e-7)
            checked.add(layer.name)
    assert checked == {*EXPECTED, "head"}


@pytest.mark.parametrize("text, start, message", [
    ("blocks:3@4,blocks:1@2", "0", "blocks:1@2': epochs must be strictly increasing"),
    ("blocks:1@2,blocks:1@3", "0", "blocks:1@3': blocks:1 does not unfreeze more than blocks:1"),
    ("all@2,blocks:3@4", "0", "blocks:3@4': blocks:3 does not unfreeze more than all"),
    ("blocks:2@1", "blocks:3", "blocks:2@1': blocks:2 does not unfreeze more than blocks:3"),
    ("blocks:x@2", "0", "'blocks:x@2': 'blocks:x' is not"),
    ("blocks:1", "0", "'blocks:1': each step is SPEC@EPOCH"),
    ("all@0", "0", "'all@0': the epoch after @ must be"),
])
def test_bad_schedules_are_one_line_errors_naming_the_part(text, start, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_schedule(text, start)


def test_schedule_parses_and_config_checks_decay():
    steps = parse_schedule(" blocks:1@2, blocks:3@4 ,all@8", "0")
    assert [(s.epoch, s.unfreeze.text) for s in steps] == [(2, "blocks:1"), (4, "blocks:3"), (8, "all")]
    assert ModelConfig(layer_decay=0.7, unfreeze="4", unfreeze_schedule="10@1").layer_decay == 0.7
    for bad in (0, -0.5, 1.5):
        with pytest.raises(UserError, match="--layer-decay"):
            ModelConfig(layer_decay=bad)


ARGS = ["finetune", "--backbone", "mobilenetv2", "--weights", "none", "--image-size", "32",
        "--synthetic-train", "64", "--synthetic-test", "16", "--batch-size", "32", "--no-tensorboard",
        "--head-epochs", "1", "--epochs", "4", "--patience", "50", "--unfreeze", "blocks:1",
        "--unfreeze-schedule", "blocks:2@1,blocks:4@3", "--layer-decay", "0.5", "--name", "sched"]
COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")


def _history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


class Killed(Exception):
    pass


def test_schedule_phases_and_resume_after_a_kill_mid_schedule_match_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert main([*ARGS, "--artifacts", str(whole)]) == 0
    run = whole / "runs" / "sched"
    history = _history(run)
    assert [(int(r["epoch"]), r["phase"]) for r in history] == [
        (1, "head"), (2, "fine-tune"), (3, "fine-tune@1"), (4, "fine-tune@1"), (5, "fine-tune@3")]
    manifest = json.loads((run / "manifest.json").read_text())
    phases = manifest["phases"]
    assert [(p["phase"], p["start_epoch"], p["end_epoch"], p["unfreeze"]) for p in phases] == [
        ("head", 0, 1, "0"), ("fine-tune", 1, 2, "blocks:1"), ("fine-tune@1", 2, 4, "blocks:2"),
        ("fine-tune@3", 4, 5, "blocks:4")]
    counts = [p["trainable_layer_count"] for p in phases]
    assert counts[0] == 0 and counts[1] < counts[2] < counts[3]
    assert all(name.startswith(("block_13", "block_14", "block_15", "block_16", "Conv_1"))
               for name in phases[3]["trainable_backbone_layers"])
    assert "lr_per_block" not in phases[0]
    rates = phases[3]["lr_per_block"]  # the head and the top block at the full rate, then 0.5x per block down
    assert [r["block"] for r in rates] == ["(head and above the top block)", "block_16", "block_15", "block_14",
                                           "block_13"]
    assert [r["lr"] for r in rates] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5])
    assert manifest["config"]["model"]["layer_decay"] == 0.5
    assert manifest["config"]["model"]["unfreeze_schedule"] == "blocks:2@1,blocks:4@3"

    # The same run killed right after epoch 3 (checkpointed, in the middle of phase fine-tune@1), then resumed.
    original = train_module.RunCheckpoint.on_epoch_end

    def dies_after_epoch_3(self, epoch, logs=None):
        original(self, epoch, logs)
        if self.state["epoch"] == 3:
            raise Killed

    killed = tmp_path / "killed"
    monkeypatch.setattr(train_module.RunCheckpoint, "on_epoch_end", dies_after_epoch_3)
    with pytest.raises(Killed):
        main([*ARGS, "--artifacts", str(killed)])
    monkeypatch.setattr(train_module.RunCheckpoint, "on_epoch_end", original)
    assert json.loads((killed / "runs" / "sched" / "checkpoints" / "state.json").read_text())["epoch"] == 3
    assert main([*ARGS, "--artifacts", str(killed)]) == 0
    resumed = _history(killed / "runs" / "sched")
    assert [r["phase"] for r in resumed] == [r["phase"] for r in history]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in history]  # each phase's optimizer and rate restored
    # Every row, to the last digit, those trained after the resume included: the weights, the optimizer state and
    # Dropout's generator come from the checkpoint, and epoch e's batches and augmentations are a function of
    # (seed, e) alone (the finetune default augments: "light").
    assert [[r[c] for c in COLUMNS] for r in resumed] == [[r[c] for c in COLUMNS] for r in history]


def test_a_layer_count_against_blocks_is_checked_on_the_built_backbone():
    """``20`` then ``blocks:1`` parses (only the backbone knows how many layers a block has); resolved it is refused."""
    from transfer.freezing import ScheduleStep, Unfreeze, check_resolved_schedule

    steps = parse_schedule("blocks:1@2,all@4", "20")
    resolved = (ScheduleStep(2, Unfreeze(8, "blocks:1", 1)), ScheduleStep(4, Unfreeze(None, "all")))
    assert len(steps) == 2
    with pytest.raises(UserError, match=r"'blocks:1@2': blocks:1 \(8 layers\) does not unfreeze more than 20"):
        check_resolved_schedule(Unfreeze(20, "20"), resolved)
    check_resolved_schedule(Unfreeze(4, "4"), resolved)
