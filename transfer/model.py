"""Build models that keep the contract: raw 0..255 RGB at native size in, class probabilities out."""

from __future__ import annotations

import os
from dataclasses import dataclass

from transfer.backbones import Backbone, HubBackbone, cached_weights_path, check_image_size, get_backbone
from transfer.errors import UserError
from transfer.heads import HeadSpec

INPUT_NAME = "image"
HUB_LAYER = "hub_backbone"


@dataclass
class BuiltModel:
    """A built model and the facts the run manifest records about it."""

    model: object
    backbone: object  # the backbone layer inside ``model``
    spec: Backbone | HubBackbone
    image_size: int
    pretrained: bool


def _load_keras_backbone(spec: Backbone, size: int, weights: str):
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    if weights == "none":
        weights_arg = None
    elif weights == "imagenet":
        weights_arg = "imagenet"
    else:
        if not os.path.isfile(weights):
            raise UserError(
                f"--weights '{weights}' is not a file; pass imagenet, none or a weights file path"
            )
        weights_arg = weights
    try:
        return constructor(include_top=False, weights=weights_arg, input_shape=(size, size, 3), **spec.kwargs)
    except ValueError as exc:
        if weights_arg not in (None, "imagenet"):
            raise UserError(
                f"--weights '{weights}' does not fit {spec.name} (include_top=False): "
                f"{str(exc).splitlines()[0][:160]}"
            ) from exc
        raise
    except Exception as exc:
        # keras.utils.get_file raises a bare Exception("URL fetch failure on ...") when offline.
        if weights_arg == "imagenet" and "fetch failure" in str(exc):
            raise UserError(
                f"cannot download ImageNet weights for {spec.name} (offline?); place "
                f"{spec.weights_filename(size)} at {cached_weights_path(spec, size)}, or pass "
                "--weights PATH (a weights file) or --weights none"
            ) from exc
        raise


def _hub_backbone(spec: HubBackbone, size: int, weights: str):
    import numpy as np

    from transfer.layers import HubFeatureExtractor

    if weights not in ("imagenet", "none"):
        raise UserError(f"--weights '{weights}' does not apply to hub backbones: their weights live in the module")
    layer = HubFeatureExtractor(spec.handle, name=HUB_LAYER)
    try:
        probe = layer(np.zeros((1, size, size, 3), dtype="float32"))
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"hub model '{spec.handle}' does not take {size}x{size} RGB images; pass the size it expects "
            f"with --image-size ({str(exc).splitlines()[0][:120]})"
        ) from exc
    if len(probe.shape) != 2:
        raise UserError(
            f"hub model '{spec.handle}' returns shape {tuple(probe.shape)}; need an image feature-vector "
            "model returning (batch, features)"
        )
    layer.output_dim = int(probe.shape[-1])
    return layer


SCRATCH_BN_MOMENTUM = 0.5


def _speed_up_batchnorm(backbone) -> None:
    """Let BatchNorm statistics of a from-scratch backbone settle within a few dozen steps.

    Keras Applications use momentum 0.99-0.999, tuned for ImageNet-length training; with it the moving
    statistics of a randomly initialised backbone lag so far behind that validation accuracy sits at
    chance for many epochs.
    """
    import keras

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = SCRATCH_BN_MOMENTUM


def build_model(
    backbone: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    head: HeadSpec,
    image_size: int | None = None,
    weights: str = "imagenet",
    name: str = "classifier",
) -> BuiltModel:
    """Build ``raw pixels -> resize -> preprocess -> backbone(training=False) -> head -> softmax``."""
    import keras

    from transfer.layers import Preprocess

    spec = get_backbone(backbone)
    size = image_size or spec.default_size
    check_image_size(spec, size)
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME, dtype="float32")
    x = inputs
    if tuple(input_shape[:2]) != (size, size):
        x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)
    x = Preprocess(spec.preprocessing, name="preprocess")(x)
    if spec.is_hub:
        base = _hub_backbone(spec, size, weights)
        features = base(x)
    else:
        base = _load_keras_backbone(spec, size, weights)
        # Pretrained BatchNorm statistics must never move (inference mode); a backbone trained from
        # scratch (--weights none) has no statistics worth keeping, so its BatchNorm follows training.
        if weights == "none":
            _speed_up_batchnorm(base)
            features = base(x)
        else:
            features = base(x, training=False)
    outputs = head.build(features, num_classes)
    model = keras.Model(inputs, outputs, name=name)
    pretrained = spec.is_hub or weights != "none"
    return BuiltModel(model=model, backbone=base, spec=spec, image_size=size, pretrained=pretrained)
