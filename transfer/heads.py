"""Classification heads: a small spec language parsed into data, then built as Keras layers.

A head spec is a comma-separated list: the pooling first (``gap``, ``flatten`` or ``max``), then any of
``dense<N>`` (Dense N + ReLU), ``dense<N>-bn`` (Dense N, BatchNorm, ReLU — the seeds' head),
``bn`` (BatchNormalization) and ``dropout<P>``. A softmax Dense layer for the classes is always added.
Named presets stand for common specs: ``seeds`` = ``flatten,dense256-bn``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transfer.errors import UserError

POOLINGS = ("gap", "flatten", "max")
PRESETS = {
    # BatchNorm on the pooled features: VGG16's are unnormalised (0..~50) and its head learned little without it
    # (benchmarks/transfer_study.py: 10 digits a class, 55 % -> 78 %; Lite0 tied; docs/transfer.md)
    "default": "gap,bn,dropout0.2",
    "seeds": "flatten,dense256-bn",
    "linear": "gap",
    "mlp": "gap,dense256,dropout0.5",
}
_TOKEN = re.compile(
    r"^(?:(?P<dense>dense(?P<units>\d+)(?P<bn>-bn)?)|(?P<bnonly>bn)|dropout(?P<rate>0?\.\d+|0|1(?:\.0)?))$"
)


@dataclass(frozen=True)
class HeadLayer:
    """One head layer: ``kind`` is dense, bn or dropout."""

    kind: str
    units: int = 0
    rate: float = 0.0
    batchnorm: bool = False


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head: pooling and the hidden layers before the softmax classifier."""

    pooling: str
    layers: tuple[HeadLayer, ...]
    text: str

    def build(self, features, num_classes: int):
        """Apply the head to a backbone's feature tensor and return class probabilities."""
        import keras

        x = features
        # by the rank of the features: a feature map (N, H, W, C), or tokens (N, T, C) of a vision transformer,
        # pooled over the sequence; anything else is already a vector
        pooling = {4: {"gap": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D},
                   3: {"gap": keras.layers.GlobalAveragePooling1D, "max": keras.layers.GlobalMaxPooling1D}}
        if len(x.shape) in pooling:
            pool = pooling[len(x.shape)].get(self.pooling, keras.layers.Flatten)
            x = pool(name=f"head_{self.pooling}")(x)
        for i, layer in enumerate(self.layers):
            if layer.kind == "dense":
                activation = None if layer.batchnorm else "relu"
                x = keras.layers.Dense(layer.units, activation=activation, name=f"head_dense_{i}")(x)
                if layer.batchnorm:
                    x = keras.layers.BatchNormalization(name=f"head_bn_{i}")(x)
                    x = keras.layers.ReLU(name=f"head_relu_{i}")(x)
            elif layer.kind == "bn":
                x = keras.layers.BatchNormalization(name=f"head_bn_{i}")(x)
            else:
                x = keras.layers.Dropout(layer.rate, name=f"head_dropout_{i}")(x)
        return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def parse_head(text: str) -> HeadSpec:
    """Parse a head spec or preset name; a malformed spec is a one-line :class:`UserError`."""
    spec = PRESETS.get(text, text)
    tokens = [t.strip().lower() for t in spec.split(",") if t.strip()]
    if not tokens or tokens[0] not in POOLINGS:
        raise UserError(
            f"--head '{text}' must start with a pooling ({', '.join(POOLINGS)}) or be a preset "
            f"({', '.join(PRESETS)}); e.g. --head flatten,dense256-bn"
        )
    layers = []
    for token in tokens[1:]:
        match = _TOKEN.match(token)
        if not match:
            raise UserError(
                f"--head token '{token}' not understood; use dense<N>, dense<N>-bn, bn or dropout<P> "
                "(e.g. dense256-bn, dropout0.5)"
            )
        if match["dense"]:
            units = int(match["units"])
            if units < 1:
                raise UserError(f"--head token '{token}': dense needs at least 1 unit")
            layers.append(HeadLayer("dense", units=units, batchnorm=bool(match["bn"])))
        elif match["bnonly"]:
            layers.append(HeadLayer("bn"))
        else:
            rate = float(match["rate"])
            if not 0 <= rate < 1:
                raise UserError(f"--head token '{token}': dropout rate must be in [0, 1)")
            layers.append(HeadLayer("dropout", rate=rate))
    return HeadSpec(pooling=tokens[0], layers=tuple(layers), text=",".join(tokens))
