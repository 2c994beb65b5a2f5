"""keras-hub backbones: a tiny ResNet preset saved locally with ``save_to_preset`` (no download) trains through
``--backbone keras_hub:DIR`` like any other backbone: the preset's size and input scaling in-graph, unfreeze by layer
count and by blocks, model.keras through load_run_model, ONNX and TFLite verified, predict and serve agreeing."""

from __future__ import annotations

import json

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from transfer.backbones import KerasHubBackbone, get_backbone, short_name  # noqa: E402
from transfer.cli import main  # noqa: E402
from transfer.errors import UserError  # noqa: E402
from transfer.freezing import parse_unfreeze  # noqa: E402
from transfer.heads import parse_head  # noqa: E402
from transfer.model import build_model  # noqa: E402
from transfer.runmodel import load_run_model  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALE = [1 / (255 * s) for s in STD]
OFFSET = [-m / s for m, s in zip(MEAN, STD, strict=True)]


def save_tiny_preset(folder, image_size: int = 32):
    """A two-stage ResNet backbone (random weights) and a per-channel ImageConverter, as save_to_preset writes them."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(None, None, 3))
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(image_size=(image_size, image_size), scale=SCALE,
                                          offset=OFFSET).save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return save_tiny_preset(tmp_path_factory.mktemp("keras_hub") / "tiny_resnet")


def _fake_preset(folder, class_name: str, converter: bool = True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"module": "keras_hub.src.models", "class_name": class_name, "config": {},
         "registered_name": f"keras_hub>{class_name}"}))
    if converter:
        (folder / "image_converter.json").write_text(json.dumps(
            {"class_name": "ImageConverter", "config": {"image_size": [48, 48], "scale": 0.5, "offset": None}}))
    return folder


def test_the_preset_decides_size_and_scaling(preset):
    spec = get_backbone(f"keras_hub:{preset}")
    assert isinstance(spec, KerasHubBackbone) and spec.resolve_size(None) == 32 and spec.resolve_size(48) == 48
    assert short_name(spec.name) == "tiny_resnet"
    built = build_model(spec, input_shape=(20, 20, 3), num_classes=4, head=parse_head("gap"), image_size=48)
    layer = built.model.get_layer("preprocess")
    np.testing.assert_allclose(layer.scale, SCALE) and np.testing.assert_allclose(layer.offset, OFFSET)
    assert tuple(built.model.output.shape) == (None, 4)
    assert spec.facts(built.backbone)["keras_hub_class"] == "ResNetBackbone"
    # blocks:N counts ResNet residual blocks: blocks:1 is the last one, stack1_block0, and everything above it
    resolved = spec.resolve_unfreeze(built.backbone, parse_unfreeze("blocks:1"))
    names = [layer.name for layer in built.backbone.layers[1:]]
    assert resolved.count == len(names) - names.index("stack1_block0_1_pad")
    with pytest.raises(UserError, match=r"exceeds .* 2 blocks"):
        spec.resolve_unfreeze(built.backbone, parse_unfreeze("blocks:3"))


def test_blocks_refused_where_the_preset_has_none_and_a_preset_needs_its_converter(tmp_path):
    vit = get_backbone(f"keras_hub:{_fake_preset(tmp_path / 'vit', 'ViTBackbone')}")
    assert vit.resolve_size(None) == 48 and vit.scaling() == ((0.5,) * 3, (0.0,) * 3)
    with pytest.raises(UserError, match=r"keras-hub ViTBackbone has no known blocks \(blocks:N works on keras-hub "
                                        r"ResNet, EfficientNet, VGG, DenseNet\); give a layer count"):
        vit.check_unfreeze(parse_unfreeze("blocks:2"))
    vit.check_unfreeze(parse_unfreeze("3"))
    bare = get_backbone(f"keras_hub:{_fake_preset(tmp_path / 'bare', 'ResNetBackbone', converter=False)}")
    with pytest.raises(UserError, match=r"has no image_converter\.json"):
        bare.resolve_size(None)
    with pytest.raises(UserError, match="does not apply to keras-hub backbones"):
        get_backbone(f"keras_hub:{tmp_path / 'vit'}").check_weights("/some/weights.h5")


def _backbone_weights(layer) -> dict[str, list[np.ndarray]]:
    return {sub.name: [np.asarray(w).copy() for w in sub.weights] for sub in layer.layers if sub.weights}


def test_a_keras_hub_run_trains_exports_and_serves(preset, tmp_path):
    art = tmp_path / "art"
    code = main(["finetune", "--backbone", f"keras_hub:{preset}", "--dataset", "synthetic", "--synthetic-train", "100",
                 "--synthetic-test", "30", "--image-size", "32", "--unfreeze", "8", "--head-epochs", "0",
                 "--epochs", "1", "--batch-size", "25", "--fine-tune-lr", "0.05", "--artifacts", str(art),
                 "--name", "kh", "--no-tensorboard"])
    assert code == 0
    run = art / "runs" / "kh"
    manifest = json.loads((run / "manifest.json").read_text())
    described = manifest["model"]
    assert manifest["status"] == "complete" and described["backbone"] == f"keras_hub:{preset}"
    assert described["keras_hub_class"] == "ResNetBackbone" and described["preprocessing"].startswith("keras_hub")

    model = load_run_model(run)  # the preset is never needed again: config and weights are inside model.keras
    backbone = model.get_layer(described["backbone_layer"])
    before = _backbone_weights(keras_hub.models.Backbone.from_preset(str(preset)))
    after = _backbone_weights(backbone)
    top = [layer.name for layer in backbone.layers[1:]][-8:]  # --unfreeze 8: the top 8 layers, BatchNorm excepted
    for name, values in before.items():
        moved = [not np.array_equal(a, b) for a, b in zip(values, after[name], strict=True)]
        if name in top and not name.endswith("_bn"):
            assert all(moved), name
        else:
            assert not any(moved), name
    assert {"stack1_block0_0_conv", "stack1_block0_2_conv"} <= set(top)

    export = art / "exports" / "kh"
    assert main(["export", str(run), "--formats", "onnx,tflite", "--out", str(export),
                 "--verify-samples", "40"]) == 0
    verify = json.loads((export / "verify.json").read_text())
    statuses = {name: row["status"] for name, row in verify["formats"].items()}
    assert statuses == {"onnx": "verified", "tflite": "verified"}, verify

    from PIL import Image

    from transfer.images import decode_image

    image = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    pixels = decode_image(image, 32).astype("float32")[None]
    expected = model.predict(pixels, verbose=0)[0]
    for fmt in ("onnx", "tflite"):
        answers = _predict_json(export, image, fmt)
        np.testing.assert_allclose(answers, expected, atol=1e-5)

    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    with TestClient(create_app(Settings(export_dirs=(str(export),)))) as client:
        answer = client.post(f"/v1/models/{export.name}:predict", json={"instances": pixels.tolist()})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["predictions"][0], expected, atol=1e-5)

    # --weights RUN_DIR: a new run of the same preset starts from this run's fine-tuned backbone, not the preset's.
    again = get_backbone(f"keras_hub:{preset}").build(32, str(run))
    started = _backbone_weights(again)
    assert started.keys() == after.keys()
    assert all(np.array_equal(a, b) for name in after for a, b in zip(started[name], after[name], strict=True))
    assert any(not np.array_equal(a, b)
               for name in top if name in before for a, b in zip(started[name], before[name], strict=True))
    with pytest.raises(UserError, match=r"is a run of keras_hub:.*, not mobilenetv2; pass a run of mobilenetv2"):
        get_backbone("mobilenetv2").check_weights(str(run))


def _predict_json(export, image, fmt: str) -> list[float]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", str(export), str(image), "--format", fmt, "--json"]) == 0
    return json.loads(out.getvalue())["predictions"][0]["probabilities"]


@pytest.mark.parametrize(("handle", "needle"), [
    ("", "empty keras-hub preset"),
    ("{tmp}/missing", "keras-hub preset directory '{tmp}/missing' does not exist"),
    ("{tmp}", "'{tmp}' is not a keras-hub preset directory"),
    ("no_such_preset_anywhere", "keras-hub preset 'no_such_preset_anywhere' cannot be fetched"),
])
def test_bad_presets_are_one_line_with_the_way_out(tmp_path, capsys, handle, needle):
    handle, needle = handle.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    code = main(["finetune", "--backbone", f"keras_hub:{handle}", "--dataset", "synthetic",
                 "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    if handle:
        assert "save_to_preset" in err
    assert not (tmp_path / "art").exists()


def test_backbones_and_doctor_list_keras_hub(capsys):
    from transfer import doctor

    assert main(["backbones"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("keras_hub:<preset name") and f"keras-hub {keras_hub.__version__} installed" in line
    report = doctor.diagnose(network=False)
    assert report["keras_hub"]["installed"] and report["keras_hub"]["version"] == keras_hub.__version__
    assert report["keras_hub"]["handle"].startswith("keras_hub:<preset name")


def test_a_token_backbone_pools_its_tokens_and_keeps_its_fixed_size(tmp_path):
    """A vision transformer returns tokens (the head pools them) and its weights fix its image size."""
    folder = tmp_path / "vit"
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=1, hidden_dim=8,
                                 mlp_dim=8).save_to_preset(str(folder))
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1).save_to_preset(str(folder))
    spec = get_backbone(f"keras_hub:{folder}")
    built = build_model(spec, input_shape=(20, 20, 3), num_classes=3, head=parse_head("gap"))
    assert spec.resolve_size(None) == 32 and tuple(built.model.output.shape) == (None, 3)
    with pytest.raises(UserError, match=r"cannot be built at 48x48 \(its own size is 32; try --image-size 32\)"):
        build_model(spec, input_shape=(20, 20, 3), num_classes=3, head=parse_head("gap"), image_size=48)
