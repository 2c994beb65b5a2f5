"""Backbone registry, model contract, heads and partial unfreezing (build-only, no training)."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from transfer.backbones import BACKBONES, PREPROCESSING, HubBackbone, get_backbone
from transfer.errors import UserError
from transfer.freezing import backbone_layers, parse_unfreeze
from transfer.heads import parse_head
from transfer.layers import Preprocess, preprocessing_layer
from transfer.model import build_model


def set_trainable(built, value: str) -> list[str]:
    return built.set_trainable(parse_unfreeze(value))


def resolve(built, value: str):
    return built.spec.resolve_unfreeze(built.backbone, parse_unfreeze(value))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_builds_small_with_published_param_count(name):
    spec = BACKBONES[name]
    size = max(spec.min_size, 32)
    built = build_model(name, input_shape=(size, size, 3), num_classes=3, head=parse_head("gap"),
                        image_size=size, weights="none")
    assert built.backbone.count_params() == spec.params
    out = built.model(np.zeros((2, size, size, 3), "float32"))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-5)
    layers = backbone_layers(built.backbone)
    blocks = {spec.block_of(layer.name) for layer in layers} - {None}
    assert len(blocks) >= 4, f"{name}: block pattern found only {blocks}"
    # blocks:1 is the top block and what lies above it: some weights, far fewer layers than the backbone has,
    # and the layer counts grow with N.
    counts = [resolve(built, f"blocks:{n}").count for n in (1, 2, len(blocks))]
    assert 0 < counts[0] < counts[1] < counts[2] <= len(layers) and counts[0] < len(layers) / 2, (name, counts)
    assert any(layer.weights for layer in layers[len(layers) - counts[0]:]), name


def test_model_contract_raw_pixels_at_native_size_resize_inside():
    built = build_model("mobilenetv2", input_shape=(28, 28, 3), num_classes=4, head=parse_head("default"),
                        image_size=48, weights="none")
    model = built.model
    assert tuple(model.input.shape) == (None, 28, 28, 3)
    assert model.get_layer("resize").output.shape[1:3] == (48, 48)
    preprocess = model.get_layer("preprocess")
    assert isinstance(preprocess, keras.layers.Rescaling) and preprocess.scale == [1 / 127.5] * 3  # "tf" mode
    same = build_model("vgg16", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                       image_size=32, weights="none")
    assert "resize" not in [layer.name for layer in same.model.layers]


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
    ],
)
def test_preprocess_layer_matches_keras_preprocess_input(mode, reference):
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    ours = np.asarray(preprocessing_layer(mode)(x))
    np.testing.assert_allclose(ours, np.asarray(reference(x.copy())), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", sorted(PREPROCESSING))
def test_built_in_preprocessing_is_exactly_the_legacy_layer_and_has_nothing_to_train(mode):
    """Old run directories hold the custom Preprocess layer; new models compute the very same numbers."""
    x = np.random.default_rng(1).uniform(0, 255, (4, 6, 6, 3)).astype("float32")
    x[0, 0, 0] = (0.0, 255.0, 127.5)
    layer = preprocessing_layer(mode)
    model = keras.Sequential([keras.Input((6, 6, 3)), layer])
    legacy = np.asarray(Preprocess(mode)(x))
    np.testing.assert_array_equal(np.asarray(layer(x)), legacy)
    np.testing.assert_array_equal(model.predict(x, verbose=0), legacy)
    assert layer.name == "preprocess" and model.trainable_weights == []
    assert type(layer).__module__.startswith("keras.")  # a built-in layer: no custom object to register


def test_old_runs_with_the_custom_preprocess_layer_still_load(tmp_path):
    old = keras.Sequential([keras.Input((4, 4, 3)), Preprocess("caffe", name="preprocess"), keras.layers.Flatten(),
                            keras.layers.Dense(2)])
    old.save(tmp_path / "old.keras")
    loaded = keras.saving.load_model(tmp_path / "old.keras")  # transfer.layers is imported: Preprocess is registered
    x = np.random.default_rng(2).uniform(0, 255, (3, 4, 4, 3)).astype("float32")
    assert type(loaded.get_layer("preprocess")) is Preprocess
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), old.predict(x, verbose=0))


def test_finetune_recipe_returns_resolved_values(tmp_path):
    from transfer.config import ModelConfig
    from transfer.recipes import finetune_recipe

    recipe = finetune_recipe(ModelConfig(backbone="vgg16", unfreeze=" ALL", head="seeds"), "synthetic", seed=2)
    assert (recipe.model_config.image_size, recipe.model_config.unfreeze) == (224, "all")
    assert recipe.model_config.head == "flatten,dense256-bn" and recipe.default_name == "vgg16_synthetic_224px_uall_s2"
    assert finetune_recipe(ModelConfig(backbone="xception", unfreeze="blocks:02"), "x").model_config.unfreeze == \
        "blocks:2"
    hub = tmp_path / "module"
    hub.mkdir()
    for cfg, message in ((ModelConfig(backbone=f"hub:{hub}", unfreeze="blocks:1"), "hub modules take 0 or all"),
                         (ModelConfig(backbone=f"hub:{hub}", weights=str(hub)), "does not apply to hub backbones"),
                         (ModelConfig(backbone="vgg16", weights=str(hub / "w.h5")), "is not a file"),
                         (ModelConfig(backbone="vgg16", image_size=16), "below vgg16's minimum of 32")):
        with pytest.raises(UserError, match=message):  # refused before any data is loaded or model built
            finetune_recipe(cfg, "synthetic")


def test_unknown_backbone_names_closest_match():
    with pytest.raises(UserError, match=r"did you mean 'mobilenetv2'"):
        get_backbone("mobilenet2")


def test_image_size_below_minimum_is_refused():
    with pytest.raises(UserError, match=r"--image-size 50 is below inceptionv3's minimum of 75"):
        build_model("inceptionv3", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                    image_size=50, weights="none")


def test_every_kind_resolves_its_image_size_in_one_place():
    assert get_backbone("vgg16").resolve_size(None) == 224 and get_backbone("xception").resolve_size(None) == 299
    assert get_backbone("efficientnetb1").resolve_size(None) == 240 and get_backbone("vgg16").resolve_size(32) == 32
    assert get_backbone("hub:some/where").resolve_size(None) == 224 and get_backbone("hub:x").resolve_size(8) == 8
    with pytest.raises(UserError, match="--image-size 0 is below vgg16's minimum of 32"):
        get_backbone("vgg16").resolve_size(0)
    with pytest.raises(UserError, match="--image-size 0 is below hub:x's minimum of 1"):
        get_backbone("hub:x").resolve_size(0)


def test_weights_are_checked_by_the_backbone_kind(tmp_path):
    vgg, hub = get_backbone("vgg16"), get_backbone("hub:/some/module")
    assert isinstance(hub, HubBackbone) and hub.pretrained("none") and not vgg.pretrained("none")
    for weights in ("imagenet", "none"):
        vgg.check_weights(weights)
        hub.check_weights(weights)
    (tmp_path / "w.h5").write_bytes(b"")
    vgg.check_weights(str(tmp_path / "w.h5"))
    with pytest.raises(UserError, match="is not a file"):
        vgg.check_weights(str(tmp_path / "missing.h5"))
    with pytest.raises(UserError, match="does not apply to hub backbones"):
        hub.check_weights(str(tmp_path / "w.h5"))
    assert hub.weights_cached() is None and vgg.weights_cached() in (True, False)
    with pytest.raises(UserError, match="empty hub handle"):
        get_backbone("hub:")


def test_seeds_head_is_flatten_dense256_bn_relu_softmax():
    built = build_model("vgg16", input_shape=(32, 32, 3), num_classes=10, head=parse_head("seeds"),
                        image_size=32, weights="none")
    head = [layer for layer in built.model.layers if layer.name.startswith("head_") or layer.name == "predictions"]
    kinds = [type(layer).__name__ for layer in head]
    assert kinds == ["Flatten", "Dense", "BatchNormalization", "ReLU", "Dense"]
    assert head[1].units == 256 and head[1].activation.__name__ == "linear"
    assert head[-1].units == 10 and head[-1].activation.__name__ == "softmax"


@pytest.mark.parametrize("bad", ["foo", "gap,dense", "gap,dropout1.5", "gap,dense0", ""])
def test_malformed_head_is_a_user_error(bad):
    with pytest.raises(UserError, match="--head"):
        parse_head(bad)


def test_unfreeze_4_on_vgg16_means_the_last_four_layers_as_in_the_seeds():
    built = build_model("vgg16", input_shape=(32, 32, 3), num_classes=10, head=parse_head("seeds"),
                        image_size=32, weights="none")
    names = set_trainable(built, "4")
    assert names == ["block5_conv1", "block5_conv2", "block5_conv3"]
    seeds_way = [layer.name for layer in built.backbone.layers[-4:]]
    assert seeds_way == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    trainable = {layer.name for layer in built.backbone.layers if layer.trainable and layer.weights}
    assert trainable == set(names)


def test_unfreeze_keeps_batchnorm_frozen_and_all_unfreezes_the_rest():
    built = build_model("resnet50", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                        image_size=32, weights="none")
    built.pretrained = True  # as if ImageNet weights were loaded: BatchNorm stays frozen
    names = set_trainable(built, "4")
    assert names == ["conv5_block3_3_conv"]
    assert not built.backbone.get_layer("conv5_block3_3_bn").trainable
    set_trainable(built, "all")
    bn = [layer for layer in backbone_layers(built.backbone) if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    convs = [layer for layer in backbone_layers(built.backbone) if isinstance(layer, keras.layers.Conv2D)]
    assert all(layer.trainable for layer in convs)
    set_trainable(built, "0")
    assert built.backbone.trainable_weights == []
    built.pretrained = False  # a backbone trained from scratch trains its BatchNorm too
    assert "conv5_block3_3_bn" in set_trainable(built, "4")


def _blocks(name: str, value: str) -> tuple[list[str], int]:
    """Trainable weight-bearing layers of ``name`` after ``--unfreeze value`` (resolved), and its layer count."""
    size = max(get_backbone(name).min_size, 32)
    built = build_model(name, input_shape=(size, size, 3), num_classes=2, head=parse_head("gap"), image_size=size,
                        weights="none")
    built.pretrained = True  # BatchNorm stays frozen, as for ImageNet weights
    resolved = resolve(built, value)
    return built.set_trainable(resolved), resolved.count


def test_unfreeze_blocks_counts_architectural_blocks():
    names, count = _blocks("vgg16", "blocks:1")
    assert names == ["block5_conv1", "block5_conv2", "block5_conv3"] and count == 4  # the same as --unfreeze 4
    names, count = _blocks("vgg16", "blocks:2")
    assert names == [f"block{b}_conv{c}" for b in (4, 5) for c in (1, 2, 3)] and count == 8
    names, _ = _blocks("resnet50", "blocks:1")
    assert names and all(n.startswith("conv5_block3_") for n in names) and "conv5_block3_3_conv" in names
    names, _ = _blocks("mobilenetv2", "blocks:1")  # block_16 and the 1x1 Conv_1 above it; BatchNorm stays frozen
    assert {"block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"} == set(names)
    names, _ = _blocks("inceptionv3", "blocks:1")  # its pattern names only each module's last layer (mixedN)
    assert len(names) >= 9 and all(n.startswith("conv2d_") for n in names)


@pytest.mark.parametrize(("name", "blocks", "layers"), [
    ("vgg16", 1, 4), ("resnet50", 3, 32), ("mobilenetv2", 2, 20), ("efficientnetb0", 1, 16)])
def test_layer_counts_of_the_reference_config_are_whole_blocks(name, blocks, layers):
    """configs/cifar10.toml unfreezes these layer counts and says which blocks they are."""
    assert _blocks(name, f"blocks:{blocks}")[1] == layers
    text = (Path(__file__).resolve().parents[2] / "configs" / "cifar10.toml").read_text()
    assert re.search(rf'backbones = \["{name}"\]\n.*\nunfreeze = \[0, {layers}, "all"\] .*\(= blocks:{blocks}\)', text)


@pytest.mark.parametrize(("value", "message"), [
    ("blocks:0", "blocks:N needs"), ("blocks:x", "blocks:N needs"), ("blocks:", "blocks:N needs"),
    ("blocks:6", "exceeds vgg16's 5 blocks"),
])
def test_unfreeze_blocks_out_of_range_or_malformed(value, message):
    with pytest.raises(UserError, match=message):
        _blocks("vgg16", value)


@pytest.mark.parametrize("value", ["blocks:1", "3"])
def test_partial_unfreeze_of_a_hub_backbone_is_refused(value):
    hub = get_backbone("hub:x")
    with pytest.raises(UserError, match="hub modules take 0 or all"):
        hub.check_unfreeze(parse_unfreeze(value))
    with pytest.raises(UserError, match="hub modules take 0 or all"):
        hub.resolve_unfreeze(None, parse_unfreeze(value))
    for ok in ("0", "all"):
        assert hub.resolve_unfreeze(None, parse_unfreeze(ok)) == parse_unfreeze(ok)


@pytest.mark.parametrize(("value", "message"), [("-1", "is not 0"), ("two", "is not 0"), ("19", "exceeds vgg16's 18")])
def test_unfreeze_out_of_range_or_malformed(value, message):
    built = build_model("vgg16", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                        image_size=32, weights="none")
    with pytest.raises(UserError, match=message):
        resolve(built, value)


def test_weights_file_round_trips_through_weights_path(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    for variable in source.weights:  # distinct, recognisable values
        variable.assign(np.random.default_rng(len(variable.path)).normal(size=variable.shape).astype("float32"))
    path = tmp_path / "mobilenetv2_notop.weights.h5"
    source.save_weights(path)
    built = build_model("mobilenetv2", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                        image_size=32, weights=str(path))
    for ours, theirs in zip(built.backbone.weights, source.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_weights_file_of_another_architecture_is_a_user_error(tmp_path):
    other = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg.weights.h5"
    other.save_weights(path)
    with pytest.raises(UserError, match="does not fit mobilenetv2"):
        build_model("mobilenetv2", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                    image_size=32, weights=str(path))


def test_offline_imagenet_weights_give_one_line_with_the_way_out(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(UserError) as info:
        build_model("vgg16", input_shape=(32, 32, 3), num_classes=2, head=parse_head("gap"),
                    image_size=32, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "--weights PATH" in message and "--weights none" in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message and "models" in message
