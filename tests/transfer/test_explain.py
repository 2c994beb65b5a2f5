"""`transfer explain`: Grad-CAM overlays of a run's model, for scratch baselines, Keras Applications backbones and
nested feature maps; Hub runs refused; plots/gradcam.png at the end of a run."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from transfer.cli import main
from transfer.errors import UserError
from transfer.explain import GRADCAM_PLOT, GradCam, explain_files, report_gradcam

TINY = ["--dataset", "synthetic", "--synthetic-train", "100", "--synthetic-test", "30", "--epochs", "1",
        "--no-tensorboard"]


def _square(path, corner: str):
    """A black 32x32 image with a bright 10x10 square in its top-left ("tl") or bottom-right ("br") corner."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    rows = slice(2, 12) if corner == "tl" else slice(20, 30)
    pixels[rows, rows] = 255
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny vgg1 run and a tiny MobileNetV2 run (random weights, 64 px: a 2x2 final map), and two images."""
    root = tmp_path_factory.mktemp("explain")
    art = root / "artifacts"
    assert main(["baseline", "--model", "vgg1", *TINY, "--artifacts", str(art), "--name", "vgg1"]) == 0
    assert main(["finetune", "--backbone", "mobilenetv2", "--weights", "none", "--image-size", "64",
                 "--head-epochs", "0", *TINY, "--artifacts", str(art), "--name", "mnv2"]) == 0
    return {"root": root, "baseline": art / "runs" / "vgg1", "backbone": art / "runs" / "mnv2",
            "tl": _square(root / "tl.png", "tl"), "br": _square(root / "br.png", "br")}


def _quadrant_masses(cam: np.ndarray) -> dict[str, float]:
    h, w = cam.shape[0] // 2, cam.shape[1] // 2
    return {"tl": cam[:h, :w].sum(), "tr": cam[:h, w:].sum(), "bl": cam[h:, :w].sum(), "br": cam[h:, w:].sum()}


def test_overlays_are_written_and_point_at_the_object(world, capsys):
    out = world["root"] / "out"
    assert main(["explain", str(world["baseline"]), str(world["tl"]), str(world["br"]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("predicted" in line and "explained" in line for line in lines), lines
    written = sorted(out.glob("*.png"))
    assert [p.name.split("-")[0] for p in written] == ["br", "tl"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (224, 224) and image.mode == "RGB"  # 32 px shown at 7x
        assert os.stat(path).st_mode & 0o044 == 0o044  # readable by others
    assert not list(out.glob(".*"))  # no temporary files left

    results = explain_files(world["baseline"], [str(world["tl"]), str(world["br"])], out=out)
    for item, corner in zip(results, ("tl", "br"), strict=True):
        cam = item.cam
        assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0) and cam.min() < 0.5  # not constant
        masses = _quadrant_masses(cam)
        assert max(masses, key=masses.get) == corner, masses
    assert not np.allclose(results[0].cam, results[1].cam)

    from transfer.runmodel import load_run_model

    model = load_run_model(world["baseline"])
    convs = [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert GradCam(model).layer == convs[-1]  # the last conv, before the last pooling


def test_class_option_explains_that_class(world, capsys):
    out = world["root"] / "by-class"
    top = explain_files(world["baseline"], [str(world["tl"])], out=out)[0]
    other = next(c for c in ("circle", "square") if c != top.predicted)
    assert main(["explain", str(world["baseline"]), str(world["tl"]), "--class", other, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert f"predicted {top.predicted}" in line and f"explained {other}" in line, line
    assert (out / f"tl-{other}.png").is_file() and (out / f"tl-{top.predicted}.png").is_file()
    chosen = explain_files(world["baseline"], [str(world["tl"])], out=out, class_name=other)[0]
    assert chosen.explained == other and chosen.predicted == top.predicted
    assert not np.allclose(chosen.cam, top.cam)


def test_default_out_is_the_run_explain_folder(world):
    results = explain_files(world["baseline"], [str(world["br"])])
    assert results[0].path.parent == world["baseline"] / "explain" and results[0].path.is_file()


def test_a_keras_applications_backbone_is_explained_at_its_output_map(world):
    model_dir = world["backbone"]
    results = explain_files(model_dir, [str(world["tl"])], out=world["root"] / "mnv2")
    assert results[0].cam.shape == (2, 2)
    with Image.open(results[0].path) as image:
        assert image.size == (224, 224)  # the run's input is the data's 32 px (the model resizes to 64 in-graph)

    from transfer.runmodel import load_run_model

    model = load_run_model(model_dir)
    cam = GradCam(model)
    assert cam.layer.startswith("mobilenetv2")  # the backbone sub-model's output: its last conv map
    pixels = np.stack([np.asarray(Image.open(world["tl"]))] * 2)
    np.testing.assert_allclose(cam.predict(pixels), model.predict(pixels, verbose=0), atol=1e-5)


def test_every_run_plots_gradcam(world):
    for run in (world["baseline"], world["backbone"]):
        with Image.open(run / "plots" / GRADCAM_PLOT) as image:
            assert image.size[0] > 200 and image.size[1] > 200


def _nested_model():
    """image -> [sub-model: conv -> conv -> GAP] -> softmax: the last 4-D map is inside a model whose output is 2-D."""
    import keras

    inner_in = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(inner_in)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_last")(x)
    sub = keras.Model(inner_in, keras.layers.GlobalAveragePooling2D()(x), name="sub")
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="predictions")(sub(x)))


def test_a_map_inside_a_nested_model_is_found():
    model = _nested_model()
    cam = GradCam(model)
    assert cam.layer == "sub/conv_last"
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.float32)
    probs, cams, explained = cam(pixels, 2)
    assert cams.shape == (3, 16, 16) and explained == [2, 2, 2]
    np.testing.assert_allclose(probs, model.predict(pixels, verbose=0), atol=1e-5)


def test_a_model_without_a_feature_map_is_refused():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x)))
    with pytest.raises(UserError, match="no convolutional feature map"):
        GradCam(model)


def test_hub_runs_are_refused_and_their_report_skips_gradcam(tmp_path, capsys):
    from hub_fixtures import craft_hub_run, save_hub_module

    from transfer.data import Split
    from transfer.runmodel import load_run_model

    run = craft_hub_run(tmp_path / "runs" / "hub", save_hub_module(tmp_path / "module", True), embed=True)
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    image.save(tmp_path / "red.png")
    with pytest.raises(UserError, match="Hub module is one opaque layer"):
        explain_files(run, [str(tmp_path / "red.png")])
    assert not (run / "explain").exists()

    model = load_run_model(run)
    split = Split(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]))
    assert report_gradcam(model, split, ["a", "b"], tmp_path / GRADCAM_PLOT, "hub") is None
    assert "note: no gradcam.png" in capsys.readouterr().out
    assert not (tmp_path / GRADCAM_PLOT).exists()


def test_two_images_with_one_output_name_are_refused(world, tmp_path):
    (tmp_path / "a").mkdir()
    twin = _square(tmp_path / "a" / "tl.png", "tl")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="both be written"):
        explain_files(world["baseline"], [str(world["tl"]), str(twin)], out=out)
    assert not out.exists()
