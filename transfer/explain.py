"""``transfer explain RUN_DIR IMAGE...``: Grad-CAM overlays on the last convolutional feature map of a run's model.

The model is loaded by the one safe loader (:func:`transfer.runmodel.load_run_model`) and the images decoded by the one
decoder (:func:`transfer.images.decode_image`) at the run's input size (manifest ``input``), so explain sees what
``transfer predict`` sees. The feature map is the last 4-D tensor before the classifier, trailing pooling and dropout
skipped: a Keras Applications backbone's output (``include_top=False``), a scratch baseline's last conv layer, or the
last 4-D map inside a nested sub-model whose own output is not 4-D. A TF Hub backbone is one opaque layer with no inner
feature map: such a run is refused with one line.

Grad-CAM (Selvaraju et al.): the gradient of the explained class's pre-softmax score with respect to the map, averaged
over space, weighs the map's channels; their ReLU'd sum, normalised to [0, 1], is upsampled onto the image. The same
computation draws ``plots/gradcam.png`` at the end of a run (:func:`report_gradcam`).

TensorFlow and Keras are imported only when a model is explained.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer import rundir
from transfer.errors import UserError, unknown

OUT_DIR = "explain"  # default: <RUN_DIR>/explain/
GRADCAM_PLOT = "gradcam.png"  # in a run's plots/
MIN_SIDE = 224  # overlays of small inputs are scaled up (whole pixels) until their longer side reaches this
ALPHA = 0.45  # weight of the heat map over the image
COLORMAP = "jet"
HUB_REFUSAL = ("{run} has a TF Hub backbone: the Hub module is one opaque layer that exposes no inner feature map, "
               "so Grad-CAM has nothing to explain (it works for Keras Applications backbones and the scratch "
               "baselines)")
# Layers that keep an image 4-D without computing features from it: a map they output is still the input.
_INPUT_SIDE = ("InputLayer", "Resizing", "Rescaling", "Normalization", "Identity", "Preprocess", "CenterCrop")
_INPUT_SIDE_NAMES = ("preprocess", "resize")  # the caffe preprocessing is a frozen 1x1 Conv2D named "preprocess"
# Layers after the last conv that only pool or pass the map through: the map before them is finer and the same evidence.
_PASS_THROUGH = ("MaxPooling2D", "AveragePooling2D", "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout",
                 "AlphaDropout", "ActivityRegularization")


def register(subparsers) -> None:
    """Add ``transfer explain``."""
    p = subparsers.add_parser(
        "explain", help="Grad-CAM overlays (PNG) showing where a run's model looks in each image",
        description="Grad-CAM on the last convolutional feature map of a run's model: one PNG per image, "
        "<out>/<image stem>-<class>.png, and one line per image (predicted class, probability, explained class). "
        "Keras Applications backbones and scratch baselines; TF Hub backbones have no inner feature map.")
    p.add_argument("run_dir", help="a complete run directory")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (decoded like `transfer predict`)")
    p.add_argument("--out", help=f"folder of the overlays (default: RUN_DIR/{OUT_DIR}/)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class instead of each image's top prediction")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    if not args.images:
        raise UserError("transfer explain needs at least one IMAGE after RUN_DIR")
    results = explain_files(args.run_dir, args.images, out=args.out, class_name=args.class_name)
    for item in results:
        print(f"{item.image}: predicted {item.predicted} ({item.probability:.3f}), explained {item.explained}"
              f" -> {item.path}")
    if results[0].cam.shape == (1, 1):
        print("note: the feature map is 1x1 at this run's input size, so each overlay is one flat colour (a larger "
              "--image-size gives a map with room to point somewhere)")
    return 0


@dataclass(frozen=True)
class Explained:
    """One explained image: what the model predicted, which class the overlay explains, where it was written."""

    image: str
    predicted: str
    probability: float
    explained: str
    path: Path
    cam: np.ndarray  # (h, w) in [0, 1], at the feature map's resolution


def explain_files(run_dir: str | os.PathLike, images: list[str], *, out: str | os.PathLike | None = None,
                  class_name: str | None = None) -> list[Explained]:
    """Write one Grad-CAM overlay per image and return what each shows.

    Everything that can be refused is checked before anything is written: the run, ``class_name``, a Hub backbone,
    every image (missing or undecodable), the output folder's writability and the model's feature map.
    """
    from transfer.images import DECODE_ERRORS, decode_image

    run_dir = Path(run_dir)
    manifest = rundir.load_complete(run_dir)
    classes = [str(c) for c in manifest["classes"]]
    index = None
    if class_name is not None:
        if class_name not in classes:
            raise unknown("--class", class_name, classes)
        index = classes.index(class_name)
    refuse_hub(run_dir)
    size = tuple(int(d) for d in manifest["input"]["shape"][:2])
    pixels = []
    for f in images:
        try:
            pixels.append(decode_image(f, size))
        except FileNotFoundError as exc:
            raise UserError(f"{f}: no such file") from exc
        except DECODE_ERRORS as exc:
            raise UserError(f"{f} could not be decoded as an image: {exc}") from exc
    out_dir = Path(out) if out is not None else run_dir / OUT_DIR
    rundir.check_writable(out_dir, "--out")
    batch = np.stack(pixels)

    from transfer.runmodel import load_run_model

    cam = GradCam(load_run_model(run_dir))
    probs, cams, explained = cam(batch, index)
    names = [f"{rundir.slug(Path(f).stem)}-{rundir.slug(classes[e])}.png" for f, e in zip(images, explained,
                                                                                         strict=True)]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two images would both be written as {out_dir / twice}; explain them separately or rename")
    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, image, p, c, e, name in zip(images, batch, probs, cams, explained, names, strict=True):
        path = out_dir / name
        write_png(path, overlay(image, c))
        top = int(np.argmax(p))
        results.append(Explained(str(f), classes[top], float(p[top]), classes[e], path, c))
    return results


def refuse_hub(run_dir: Path) -> None:
    """A one-line :class:`UserError` when the run's model holds a TF Hub layer (read from the archive's config, before
    any graph is loaded)."""
    import json
    import zipfile

    from transfer.runmodel import _hub_layers

    path = run_dir / rundir.MODEL
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return  # the loader refuses it with its own line
    if next(_hub_layers(config), None) is not None:
        raise UserError(HUB_REFUSAL.format(run=run_dir))


# ----------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------


def _rank(tensor) -> int:
    return len(tensor.shape)


def _is_model(op) -> bool:
    return hasattr(op, "_nodes_by_depth") and hasattr(op, "_run_through_graph")


def _feature_path(model) -> list:
    """The ops leading to the last 4-D feature map (before any trailing pooling or dropout): ``[op]`` for an op of
    ``model`` itself, ``[sub_model, ...]`` for a map inside a nested model whose own output is not 4-D; empty when
    there is none."""
    for depth in sorted(model._nodes_by_depth):  # 0: the output; deeper: towards the input
        for node in model._nodes_by_depth[depth]:
            op = node.operation
            if op is None or node.is_input:
                continue
            if type(op).__name__ == "HubFeatureExtractor":
                raise UserError(HUB_REFUSAL.format(run="the model"))
            if _is_model(op) and _rank(node.outputs[0]) != 4:
                inner = _feature_path(op)
                if inner:
                    return [op, *inner]
                continue
            if _rank(node.outputs[0]) == 4:
                if type(op).__name__ in _PASS_THROUGH:
                    continue
                input_side = type(op).__name__ in _INPUT_SIDE or op.name in _INPUT_SIDE_NAMES
                return [] if input_side else [op]
    return []


def feature_layer_name(model) -> str:
    """Where Grad-CAM taps ``model``: the feature-map layer's name (``outer/inner`` inside nested models)."""
    path = _feature_path(model)
    if not path:
        raise UserError(f"model '{model.name}' has no convolutional feature map (no 4-D layer output past its "
                        "preprocessing) for Grad-CAM")
    return "/".join(op.name for op in path)


def _grad_model(model):
    """A Keras model: the run model's input -> (feature map, class scores before the softmax, probabilities).

    The graph is rebuilt from the model's own layers (weights shared, nothing copied): the feature map is captured
    where its op runs, inside nested models too, and a final softmax ``Dense`` (or ``Activation``) yields its logits.
    """
    import keras

    path = _feature_path(model)
    if not path:
        feature_layer_name(model)  # raises the one-line error
    captured = []
    final = {node.operation for node in model._nodes_by_depth[0]}

    def operation_fn(target: list, top: bool):
        def wrap(op):
            if target and op is target[0]:
                if len(target) == 1:
                    return lambda *args, **kwargs: captured.append(op(*args, **kwargs)) or captured[-1]
                inner = operation_fn(target[1:], top=False)
                return lambda *args, **kwargs: _single(op._run_through_graph(args[0], operation_fn=inner))
            if top and op in final:
                return _logits_of(op)
            return op
        return wrap

    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype, name="image")
    logits = _single(model._run_through_graph(inputs, operation_fn=operation_fn(path, top=True)))
    return keras.Model(inputs, [captured[0], logits, keras.ops.softmax(logits, axis=-1)], name="gradcam")


def _single(outputs):
    return outputs[0] if isinstance(outputs, list | tuple) else outputs


def _logits_of(op):
    """A call of the final layer that stops before its softmax (the scores Grad-CAM differentiates)."""
    import keras

    activation = getattr(op, "activation", None)
    softmax = getattr(activation, "__name__", "") == "softmax"
    if type(op).__name__ == "Dense" and softmax:
        def dense_logits(x, **_):
            y = keras.ops.matmul(keras.ops.cast(x, op.kernel.dtype), op.kernel)
            return y + op.bias if op.use_bias else y
        return dense_logits
    if type(op).__name__ == "Activation" and softmax:
        return lambda x, **_: x
    if type(op).__name__ == "Softmax":
        return lambda x, **_: x
    # anything else: the probabilities' log, whose gradient is the softmax-free score up to a shared term
    return lambda *args, **kwargs: keras.ops.log(keras.ops.maximum(op(*args, **kwargs), 1e-12))


class GradCam:
    """Grad-CAM of a loaded run model: ``cam(pixels, class_index)`` -> (probabilities, maps, explained classes)."""

    def __init__(self, model):
        self.layer = feature_layer_name(model)
        self.model = _grad_model(model)

    def predict(self, pixels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, classes), without gradients."""
        return np.concatenate([np.asarray(self.model(np.asarray(pixels[i:i + batch_size], np.float32),
                                                     training=False)[2]) for i in range(0, len(pixels), batch_size)])

    def __call__(self, pixels: np.ndarray, class_index: int | None = None, *, batch_size: int = 32):
        """``pixels``: uint8 or float (N, H, W, 3) at the model's input size. Returns probabilities (N, classes), maps
        (N, h, w) in [0, 1] at the feature map's resolution, and the explained class of each image (the top
        prediction unless ``class_index``)."""
        import tensorflow as tf

        probs, cams, explained = [], [], []
        for start in range(0, len(pixels), batch_size):
            x = tf.convert_to_tensor(np.asarray(pixels[start:start + batch_size], np.float32))
            with tf.GradientTape() as tape:
                tape.watch(x)  # records every op, frozen backbones included
                fmap, logits, p = self.model(x, training=False)
                chosen = (tf.argmax(p, axis=-1, output_type=tf.int32) if class_index is None
                          else tf.fill([tf.shape(x)[0]], tf.constant(class_index, tf.int32)))
                score = tf.reduce_sum(tf.gather(logits, chosen, batch_dims=1))
            grads = tape.gradient(score, fmap)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel and image
            cam = tf.nn.relu(tf.reduce_sum(fmap * weights, axis=-1)).numpy()
            peak = cam.max(axis=(1, 2), keepdims=True)
            cams.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
            probs.append(p.numpy())
            explained.append(chosen.numpy())
        return np.concatenate(probs), np.concatenate(cams), [int(c) for c in np.concatenate(explained)]


# ----------------------------------------------------------------------------------------------
# Overlays and files
# ----------------------------------------------------------------------------------------------


def display_scale(height: int, width: int) -> int:
    """Whole-pixel factor an image of this size is shown at: 1, or enough for its longer side to reach MIN_SIDE."""
    return max(1, math.ceil(MIN_SIDE / max(height, width)))


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3 uint8, what the model saw) scaled by :func:`display_scale` (nearest: its pixels stay
    visible) under ``cam`` upsampled bilinearly and coloured; uint8 RGB."""
    import matplotlib
    from PIL import Image

    height, width = image.shape[:2]
    k = display_scale(height, width)
    size = (width * k, height * k)
    shown = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(size, Image.Resampling.NEAREST),
                       np.float32)
    heat = np.asarray(Image.fromarray(np.asarray(cam, np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    colours = matplotlib.colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255
    return np.clip((1 - ALPHA) * shown + ALPHA * colours, 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A PNG written as rundir writes JSON: a temporary file beside it, readable by others, then renamed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(pixels).save(handle, format="PNG")
        os.chmod(tmp, rundir.file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# The run report: plots/gradcam.png
# ----------------------------------------------------------------------------------------------


def report_gradcam(model, split, classes: list[str], out_path: Path, title: str, *, per_class: int = 2,
                   max_classes: int = 10, candidates: int = 16) -> Path | None:
    """``plots/gradcam.png``: Grad-CAM of ``per_class`` test images of each of the first ``max_classes`` classes,
    misclassified ones first (among the first ``candidates`` of each class). Returns None, after one note, where the
    model has no feature map (a Hub backbone); a few images only, so it costs seconds."""
    from transfer.plots import plot_gradcam_grid

    try:
        cam = GradCam(model)
    except UserError as exc:
        print(f"note: no {GRADCAM_PLOT} ({str(exc).split(':', 1)[-1].strip()})")
        return None
    labels = np.asarray(split.y)
    pool = np.concatenate([np.flatnonzero(labels == c)[:candidates] for c in range(min(len(classes), max_classes))])
    if pool.size == 0:
        return None
    pool = np.sort(pool)
    predicted = cam.predict(split.images(pool)).argmax(axis=1)
    chosen = []
    for c in range(min(len(classes), max_classes)):
        mine = [i for i in range(len(pool)) if labels[pool[i]] == c]
        mine.sort(key=lambda i: predicted[i] == c)  # stable: misclassified first, in test order
        chosen += mine[:per_class]
    pixels = split.images(pool[chosen])
    probs, cams, explained = cam(pixels)
    tiles = []
    for image, p, c, e, i in zip(pixels, probs, cams, explained, chosen, strict=True):
        true = classes[labels[pool[i]]]
        tiles.append((overlay(image, c), f"true {true}\npred {classes[e]} {p[e]:.2f}", classes[e] != true))
    return plot_gradcam_grid(tiles, 2 * per_class, out_path, f"{title}: Grad-CAM ({cam.layer}), misclassified first")
