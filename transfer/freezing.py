"""Partial unfreezing: which backbone layers train in the fine-tuning phase.

``--unfreeze N`` means what the seed documents mean by ``for layer in base.layers[:-N]: layer.trainable
= False``: the last N layers of the backbone (input layer excluded) train, everything below stays frozen.
On VGG16, ``4`` unfreezes block5_conv1..3 and block5_pool. BatchNormalization layers of a pretrained
backbone stay frozen everywhere, and the backbone is called with ``training=False``, so their statistics
never move. A backbone trained from scratch (``--weights none``) trains its BatchNorm layers too.
"""

from __future__ import annotations

from dataclasses import dataclass

from transfer.errors import UserError


@dataclass(frozen=True)
class Unfreeze:
    """A parsed ``--unfreeze`` value: ``count`` layers from the top, or every layer (``all``)."""

    count: int | None  # None means all
    text: str

    @property
    def frozen_backbone(self) -> bool:
        return self.count == 0

    @property
    def all(self) -> bool:
        return self.count is None


def parse_unfreeze(text: str | int) -> Unfreeze:
    """Parse ``0``, ``N`` or ``all``; anything else is a one-line :class:`UserError`."""
    text = str(text).strip().lower()
    if text == "all":
        return Unfreeze(None, "all")
    if not text.isdigit():
        raise UserError(f"--unfreeze '{text}' is not 0, a positive number of layers, or 'all'")
    return Unfreeze(int(text), str(int(text)))


def backbone_layers(backbone) -> list:
    """The backbone's layers in order, without the input layer."""
    import keras

    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def validate_unfreeze(backbone, unfreeze: Unfreeze, name: str, hub: bool = False) -> None:
    """Refuse an unfreeze value the backbone cannot honour, before anything is written."""
    if hub:
        if unfreeze.count not in (0, None):
            raise UserError(
                f"--unfreeze {unfreeze.text} on hub backbone '{name}': hub modules take 0 or all"
            )
        return
    total = len(backbone_layers(backbone))
    if unfreeze.count is not None and unfreeze.count > total:
        raise UserError(
            f"--unfreeze {unfreeze.count} exceeds {name}'s {total} layers; use 0..{total} or all"
        )


def set_trainable(backbone, unfreeze: Unfreeze, hub: bool = False, freeze_bn: bool = True) -> list[str]:
    """Make the top layers of ``backbone`` trainable (BatchNorm excluded unless ``freeze_bn`` is off,
    as for a backbone trained from scratch); return the names of the trainable weight-bearing layers.

    The caller must recompile the model afterwards for the change to take effect.
    """
    if unfreeze.frozen_backbone:
        backbone.trainable = False
        return []
    backbone.trainable = True
    if hub:
        return [backbone.name]
    layers = backbone_layers(backbone)
    top = layers if unfreeze.all else layers[len(layers) - unfreeze.count:]
    top_ids = {id(layer) for layer in top}
    trainable = []
    for layer in layers:
        layer.trainable = id(layer) in top_ids and not (freeze_bn and is_batchnorm(layer))
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def count_params(weights) -> int:
    """Number of scalars in a list of variables."""
    import numpy as np

    return int(sum(np.prod(w.shape) for w in weights))


def freeze_batchnorm(model) -> int:
    """After training: every BatchNormalization layer, nested models included, stops training for good.

    A backbone trained from scratch is called without ``training=False`` so its BatchNorm could learn; once
    training is over its statistics must never move again, and exporters (Keras ``model.export``) would otherwise
    trace such a nested BatchNorm with batch statistics, making exported predictions depend on the batch.
    Returns how many layers were frozen.
    """
    import keras

    frozen = 0
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            layer.trainable = False
            frozen += 1
        stack.extend(getattr(layer, "layers", []))
    return frozen
