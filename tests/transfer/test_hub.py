"""TF Hub backbones: a locally built Hub-format SavedModel trains through hub:PATH, frozen and ``all``; model.keras
embeds the module (the run never needs its handle again) and loads only through transfer.runmodel.load_run_model;
modules fetched from a URL are pinned by sha256."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from hub_fixtures import craft_hub_run, save_hub_module

from export.contract import sha256_of
from transfer.cli import main
from transfer.errors import UserError
from transfer.heads import parse_head
from transfer.model import build_model
from transfer.runmodel import load_run_model


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
    assert manifest["model"]["hub_module_sha256"] == sha256_of(hub_dir)
    model = load_run_model(run)
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


def test_a_hub_run_embeds_its_module_and_never_needs_the_handle_again(tmp_path):
    import shutil

    module = save_hub_module(tmp_path / "module", with_variable_lists=True)
    built = build_model(f"hub:{module}", input_shape=(16, 16, 3), num_classes=3, head=parse_head("gap"),
                        image_size=24)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    built.model.save(run / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected = built.model.predict(x, verbose=0)
    shutil.rmtree(module)  # the handle is gone: the run loads the copy inside model.keras
    np.testing.assert_allclose(load_run_model(run).predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match=r"loads only through transfer\.runmodel\.load_run_model"):
        keras.saving.load_model(run / "model.keras")  # plain Keras cannot check the module: refused


def test_a_run_without_an_embedded_module_loads_its_handle_only_when_trusted(hub_dir, tmp_path):
    """What a run written before modules were embedded looks like: the handle only, honoured on --trust-hub-handle."""
    run = craft_hub_run(tmp_path / "runs" / "old", hub_dir, embed=False)
    with pytest.raises(UserError, match=r"embeds no copy of its module, so it would load .* from outside the run "
                                        r"directory; pass --trust-hub-handle"):
        load_run_model(run)
    model = load_run_model(run, trust_hub=True)
    assert model.get_layer("hub_backbone").module_sha256 == sha256_of(hub_dir)


def test_a_module_fetched_from_a_url_is_pinned_by_sha256(hub_dir, tmp_path, monkeypatch):
    import shutil

    import tensorflow_hub as hub

    from transfer.layers import hub_module_dir

    cache = tmp_path / "cache" / "0123abcd"
    shutil.copytree(hub_dir, cache)
    fetched = []
    monkeypatch.setattr(hub, "resolve", lambda url: fetched.append(url) or str(cache))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    url = "https://example.com/models/tiny/1"
    assert hub_module_dir(url) == cache  # first fetch: pinned
    pins = json.loads((tmp_path / "keras" / "hub_pins.json").read_text())
    assert pins == {url: sha256_of(hub_dir)}
    assert hub_module_dir(url) == cache and fetched == [url, url]  # reuse, unchanged
    with open(cache / "variables" / "variables.data-00000-of-00001", "ab") as handle:
        handle.write(b"\0")  # the cached copy changed behind our back
    with pytest.raises(UserError, match=r"hub model 'https://example.com/models/tiny/1' changed since it was first "
                                        r"fetched .*remove the cached copy"):
        hub_module_dir(url)
