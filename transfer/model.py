"""Build models that keep the contract: raw 0..255 RGB at native size in, class probabilities out."""

from __future__ import annotations

from dataclasses import dataclass

from transfer.backbones import Backbone, HubBackbone, KerasHubBackbone, get_backbone
from transfer.heads import HeadSpec

INPUT_NAME = "image"


@dataclass
class BuiltModel:
    """A built model and the facts the run manifest records about it."""

    model: object
    backbone: object  # the backbone layer inside ``model``
    spec: Backbone | HubBackbone | KerasHubBackbone
    image_size: int
    pretrained: bool

    def set_trainable(self, unfreeze) -> list[str]:
        """Apply ``unfreeze`` to the backbone as its kind does (BatchNorm trains only when not pretrained)."""
        return self.spec.set_trainable(self.backbone, unfreeze, freeze_bn=self.pretrained)


def build_model(
    backbone: str | Backbone | HubBackbone | KerasHubBackbone,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    head: HeadSpec,
    image_size: int | None = None,
    weights: str = "imagenet",
    name: str = "classifier",
) -> BuiltModel:
    """Build ``raw pixels -> resize -> preprocess -> backbone -> head -> softmax`` from built-in Keras layers
    (plus the backbone's own layer: a Keras Applications model, a Hub module, or a keras-hub Backbone).

    A pretrained backbone runs with ``training=False`` so its BatchNorm statistics never move; a backbone trained
    from scratch (``--weights none``) has no statistics worth keeping, so its BatchNorm follows training.
    """
    import keras

    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    size = spec.resolve_size(image_size)
    inputs = keras.Input(shape=input_shape, name=INPUT_NAME, dtype="float32")
    x = inputs
    if tuple(input_shape[:2]) != (size, size):
        x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)
    x = spec.preprocess()(x)
    base = spec.build(size, weights)
    pretrained = spec.pretrained(weights)
    features = base(x, training=False) if pretrained else base(x)
    outputs = head.build(features, num_classes)
    model = keras.Model(inputs, outputs, name=name)
    return BuiltModel(model=model, backbone=base, spec=spec, image_size=size, pretrained=pretrained)
