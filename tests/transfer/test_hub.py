"""TF Hub backbones: a locally built Hub-format SavedModel trains through hub:PATH, frozen and ``all``."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from hub_fixtures import save_hub_module

from transfer.cli import main
from transfer.errors import UserError
from transfer.heads import parse_head
from transfer.model import build_model


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    return save_hub_module(tmp_path_factory.mktemp("hub") / "tiny_feature_vector", with_variable_lists=True)


def _module_values(layer):
    return [np.asarray(v).copy() for v in layer.weights]


@pytest.mark.parametrize("with_variable_lists", [True, False])
def test_hub_layer_tracks_the_module_variables(tmp_path, with_variable_lists):
    path = save_hub_module(tmp_path / "m", with_variable_lists)
    built = build_model(f"hub:{path}", input_shape=(16, 16, 3), num_classes=3, head=parse_head("gap"),
                        image_size=24)
    layer = built.backbone
    assert len(layer.weights) == 4
    assert len([w for w in layer.weights if w.trainable]) == 3
    assert tuple(built.model.output.shape) == (None, 3)
    assert built.model.get_layer("preprocess").scale == [1 / 255] * 3  # hub modules take [0, 1] images


@pytest.mark.parametrize(("unfreeze", "moves"), [("0", False), ("all", True)])
def test_hub_backbone_trains_through_the_cli(hub_dir, tmp_path, unfreeze, moves):
    before = _module_values(build_model(f"hub:{hub_dir}", input_shape=(32, 32, 3), num_classes=10,
                                        head=parse_head("gap"), image_size=32).backbone)
    code = main(["finetune", "--backbone", f"hub:{hub_dir}", "--image-size", "32", "--unfreeze", unfreeze,
                 "--head-epochs", "0", "--epochs", "1", "--synthetic-train", "120", "--synthetic-test", "40",
                 "--batch-size", "32", "--lr", "0.01", "--fine-tune-lr", "0.01", "--artifacts", str(tmp_path),
                 "--name", "hub", "--no-tensorboard"])
    assert code == 0
    run = tmp_path / "runs" / "hub"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["backbone"] == f"hub:{hub_dir}"
    model = keras.models.load_model(run / "model.keras")
    after = _module_values(model.get_layer("hub_backbone"))
    trainable_moved = [not np.array_equal(a, b) for a, b in zip(before[:3], after[:3], strict=True)]
    assert all(trainable_moved) if moves else not any(trainable_moved)
    np.testing.assert_array_equal(before[3], after[3])  # the non-trainable statistic never moves


def test_hub_backbone_refuses_partial_unfreeze(hub_dir, tmp_path, capsys):
    code = main(["finetune", "--backbone", f"hub:{hub_dir}", "--unfreeze", "3", "--artifacts", str(tmp_path)])
    assert code == 2
    assert "hub modules take 0 or all" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_hub_handle_that_is_not_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="neither an existing SavedModel directory"):
        build_model("hub:not/a handle", input_shape=(8, 8, 3), num_classes=2, head=parse_head("gap"), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="cannot load"):
        build_model(f"hub:{empty}", input_shape=(8, 8, 3), num_classes=2, head=parse_head("gap"), image_size=8)
