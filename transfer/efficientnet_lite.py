"""EfficientNet-Lite0 in plain Keras layers, and its weights from a PyTorch state dict.

EfficientNet-Lite (Tan & Le, the TensorFlow TPU repository's ``efficientnet/lite``) is EfficientNet-B0's layout made
for phones: ReLU6 instead of swish, no squeeze-and-excitation, the stem and head not scaled. It is MediaPipe Model
Maker's default backbone. The model here uses only built-in Keras layers (Conv2D, DepthwiseConv2D,
BatchNormalization, ReLU(6), Add), so ``model.keras`` loads with safe mode on and every exporter handles it; layer
names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_expand_conv``, ``top_conv``...), so
``--unfreeze blocks:N`` works as it does there. Convolutions use TensorFlow's ``same`` padding, as the original
TensorFlow training did.

Weights come from a state dict in the layout of the PyTorch port (``_conv_stem.weight``, ``_blocks.N._bn1.*``,
``_fc.weight``...), read by :mod:`transfer.torchfile` (NumPy only, no code from the file), or from a Keras
``.weights.h5`` of this same model.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

# (kernel, stride, expansion, input filters, output filters, repeats): EfficientNet-B0's stages, Lite0's too
BLOCKS = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
BN_EPSILON = 1e-3  # the TensorFlow original's (and the PyTorch port's) batch_norm_epsilon
TOP_DROPOUT = 0.2
IMAGENET_CLASSES = 1000


def block_names() -> list[tuple[str, int, int, int, int, int]]:
    """Every block in order: (Keras name prefix, kernel, stride, expansion, in filters, out filters)."""
    names = []
    for stage, (kernel, stride, expand, filters_in, filters_out, repeats) in enumerate(BLOCKS, start=1):
        for i in range(repeats):
            names.append((f"block{stage}{string.ascii_lowercase[i]}_", kernel, stride if i == 0 else 1, expand,
                          filters_in if i == 0 else filters_out, filters_out))
    return names


def EfficientNetLite0(include_top: bool = False, weights=None, input_shape=None, classes: int = IMAGENET_CLASSES,
                      name: str = "efficientnet_lite0", **_):
    """EfficientNet-Lite0 taking inputs already scaled to what it was trained on ((x - 127) / 128).

    ``weights``: None (random), a ``.pth`` state dict in the PyTorch port's layout, or a Keras ``.weights.h5`` of
    this model. Without the top, returns the last feature map (7x7x1280 at 224 px).
    """
    import keras
    from keras import layers

    shape = tuple(input_shape) if input_shape is not None else (None, None, 3)
    inputs = keras.Input(shape=shape, name="input_layer")

    def bn(x, prefix):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=f"{prefix}bn")(x)

    def relu6(x, prefix):
        return layers.ReLU(max_value=6.0, name=f"{prefix}activation")(x)

    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = relu6(bn(x, "stem_"), "stem_")
    for prefix, kernel, stride, expand, filters_in, filters_out in block_names():
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=f"{prefix}expand_conv")(x)
            x = relu6(bn(x, f"{prefix}expand_"), f"{prefix}expand_")
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}dwconv")(x)
        x = relu6(bn(x, prefix), prefix)
        x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{prefix}project_conv")(x)
        x = bn(x, f"{prefix}project_")
        if stride == 1 and filters_in == filters_out:
            x = layers.Add(name=f"{prefix}add")([x, shortcut])
    x = layers.Conv2D(TOP_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = relu6(bn(x, "top_"), "top_")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(TOP_DROPOUT, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        load_weights(model, weights)
    return model


def torch_to_keras(state: dict[str, np.ndarray], include_top: bool) -> dict[str, list[np.ndarray]]:
    """``{Keras layer name: its weights in Keras order}`` from a state dict in the PyTorch port's layout.

    Raises ``KeyError`` naming a missing tensor; shapes are checked when the weights are set.
    """

    def conv(key):
        return [np.transpose(state[key], (2, 3, 1, 0))]  # (out, in, kh, kw) -> (kh, kw, in, out)

    def dwconv(key):
        return [np.transpose(state[key], (2, 3, 0, 1))]  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)

    def batchnorm(prefix):
        return [state[f"{prefix}.{part}"] for part in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": batchnorm("_bn0")}
    for i, (prefix, _, _, expand, _, _) in enumerate(block_names()):
        block = f"_blocks.{i}."
        if expand != 1:
            weights[f"{prefix}expand_conv"] = conv(block + "_expand_conv.weight")
            weights[f"{prefix}expand_bn"] = batchnorm(block + "_bn0")
        weights[f"{prefix}dwconv"] = dwconv(block + "_depthwise_conv.weight")
        weights[f"{prefix}bn"] = batchnorm(block + "_bn1")
        weights[f"{prefix}project_conv"] = conv(block + "_project_conv.weight")
        weights[f"{prefix}project_bn"] = batchnorm(block + "_bn2")
    weights["top_conv"] = conv("_conv_head.weight")
    weights["top_bn"] = batchnorm("_bn1")
    if include_top:
        weights["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return weights


def load_weights(model, weights: str | Path) -> None:
    """Set ``model``'s weights from a ``.pth`` state dict (PyTorch port layout) or a Keras ``.weights.h5``.

    Raises ``ValueError`` with one line when the file does not fit this model (missing tensors, wrong shapes).
    """
    path = Path(weights)
    if path.name.endswith(".h5") or path.name.endswith(".keras"):
        model.load_weights(str(path))
        return
    from transfer import torchfile

    state = torchfile.load(path)
    include_top = any(layer.name == "predictions" for layer in model.layers)
    try:
        mapped = torch_to_keras(state, include_top)
    except KeyError as exc:
        raise ValueError(f"{path.name} is not an EfficientNet-Lite0 state dict: tensor {exc.args[0]} is missing "
                         f"(it has {len(state)} tensors, e.g. {', '.join(list(state)[:3]) or 'none'})") from None
    for name, values in mapped.items():
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise ValueError(f"{path.name} does not fit EfficientNet-Lite0: layer {name} needs shapes {expected}, "
                             f"the file has {got}")
        layer.set_weights([v.astype("float32") for v in values])
