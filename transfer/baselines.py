"""Scratch baselines from the seed documents: a registry of composable layer specs, built under the model contract."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from transfer.config import AugmentConfig
from transfer.errors import UserError, unknown

L2_SEEDS = 0.001  # the seeds' weight regularisation: L2(0.001) on every hidden conv and dense kernel


# ----------------------------------------------------------------------------------------------
# Layer specs: one small frozen row per layer, so a model is data and regularisers compose
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One layer: ``conv``/``dense`` (size = filters/units), ``pool``, ``dropout`` (size = rate), ``bn``,
    ``relu``, ``flatten``. ``activation`` None on conv/dense leaves it linear (BN-before-activation)."""

    kind: str
    size: float = 0
    kernel: int = 3
    padding: str = "same"
    activation: str | None = "relu"


def conv(filters: int, kernel: int = 3, padding: str = "same", activation: str | None = "relu") -> Op:
    return Op("conv", filters, kernel, padding, activation)


def dense(units: int, activation: str | None = "relu") -> Op:
    return Op("dense", units, activation=activation)


def pool(padding: str = "valid") -> Op:
    return Op("pool", padding=padding)


def drop(rate: float) -> Op:
    return Op("dropout", rate)


BN, RELU, FLAT = Op("bn"), Op("relu"), Op("flatten")


def vgg_blocks(filters: tuple[int, ...], *, dropout: tuple[float, ...] = (), bn: bool = False) -> tuple[Op, ...]:
    """The seeds' "n VGG blocks" model (exercise #2): per block two C-n convs and a pool, then D128.

    ``dropout`` holds one rate per pool plus one after D128 (empty: no dropout); ``bn`` adds
    BatchNormalization after every conv and after D128 (after the activation, as the seed does).
    """
    ops: list[Op] = []
    for i, f in enumerate(filters):
        for _ in range(2):
            ops += [conv(f)] + ([BN] if bn else [])
        ops.append(pool())
        if dropout:
            ops.append(drop(dropout[i]))
    ops += [FLAT, dense(128)] + ([BN] if bn else []) + ([drop(dropout[-1])] if dropout else [])
    return tuple(ops)


def lenet5(*, dropout: float = 0.0, bn: str | None = None) -> tuple[Op, ...]:
    """LeNet-5 as seed 003 builds it; ``bn`` "after" = BN after Flatten and each dense layer,
    "before" = BN between every conv/dense and its ReLU (the placement the seed recommends)."""
    if bn == "before":
        ops = [conv(6, 5, "valid", None), BN, RELU, pool(), conv(16, 5, "valid", None), BN, RELU, pool(), FLAT]
        ops += [drop(dropout)] if dropout else []
        return (*ops, dense(120, None), BN, RELU, dense(84, None), BN, RELU)
    ops = [conv(6, 5, "valid"), pool(), conv(16, 5, "valid"), pool(), FLAT]
    ops += [drop(dropout)] if dropout else []
    ops += [BN] if bn == "after" else []
    for units in (120, 84):
        ops += [dense(units)] + ([BN] if bn == "after" else [])
    return tuple(ops)


def vgg_block(filters: int, n_layers: int) -> tuple[Op, ...]:
    """Seed 003's ``vgg_block``: n x (Conv 3x3 same, BN, ReLU), then max pooling."""
    return (*[op for _ in range(n_layers) for op in (conv(filters, activation=None), BN, RELU)], pool())


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A registry row: a scratch model, its training recipe and where it comes from."""

    name: str
    description: str
    layers: tuple[Op, ...]  # hidden layers; the softmax output is appended by build()
    source: str
    initializer: str = "he_uniform"  # hidden conv/dense kernels; the output layer keeps Keras's default
    l2: float | None = None
    augment: AugmentConfig | None = None  # replaces the run's augmentation (applied in tf.data, not in the model)
    protocol: str = "seeds"  # the protocol it was published with (runs default to "seeds" all the same)
    published_params: int | None = None  # on 32x32x3 input, 10 classes
    published_accuracy: float | None = None

    def min_size(self) -> int:
        """Smallest square input the layer stack accepts."""
        return next(size for size in range(1, 1025) if _spatial(self.layers, size) >= 1)


# The seeds' "3 VGG blocks + data augmentation": ImageDataGenerator(width/height shift 0.1, horizontal flip).
AUG_SEEDS = AugmentConfig(preset="none", flip=True, shift=0.1)
# The 87.21% model: rotation 20 degrees, shear 0.2 (approximated by zoom 0.2: tf.data has no shear), shift 0.2, flip.
AUG_87 = AugmentConfig(preset="none", flip=True, rotation=20 / 360, zoom=0.2, shift=0.2)
# Seed 003's in-model RandomFlip("horizontal"), RandomRotation(0.1), RandomZoom(0.1), moved into the pipeline.
AUG_LENET = AugmentConfig(preset="none", flip=True, rotation=0.1, zoom=0.1)

_SRC_000 = "seed 000, exercise #2 (CIFAR-10 VGG blocks)"
_VGG3 = (32, 64, 128)
_DROPOUT_FLAT, _DROPOUT_RISING = (0.2, 0.2, 0.2, 0.2), (0.2, 0.3, 0.4, 0.5)
_PUBLISHED_VGG = {1: 1_060_138, 2: 591_274, 3: 550_570}


def _vgg_variant(blocks: int, *, dropout: bool = False, l2: bool = False, bn: bool = False,
                 aug: bool = False) -> Baseline:
    """One of the ten VGG-block baselines: regularisers are flags on one builder, never copies."""
    name = "-".join([f"vgg{blocks}"] + [flag for flag, on in (("dropout", dropout), ("l2", l2), ("bn", bn),
                                                              ("aug", aug)) if on])
    rates = (_DROPOUT_RISING if bn else _DROPOUT_FLAT) if dropout else ()
    parts = [f"{blocks} VGG block{'s' if blocks > 1 else ''} (C32x2{' C64x2' if blocks > 1 else ''}"
             f"{' C128x2' if blocks > 2 else ''}), D128"]
    if dropout:
        parts.append("dropout " + ("0.2/0.3/0.4/0.5" if bn else "0.2"))
    if l2:
        parts.append("L2 0.001")
    if bn:
        parts.append("batch norm")
    if aug:
        parts.append("augmentation shift 0.1 + flip")
    published = _PUBLISHED_VGG[blocks] + (2_304 if bn else 0)
    return Baseline(name, ", ".join(parts), vgg_blocks(_VGG3[:blocks], dropout=rates, bn=bn), _SRC_000,
                    l2=L2_SEEDS if l2 else None, augment=AUG_SEEDS if aug else None, published_params=published)


def _lenet_variant(suffix: str, description: str, **kwargs) -> Baseline:
    aug = kwargs.pop("aug", False)
    return Baseline(f"lenet5{suffix}", description, lenet5(**kwargs), "seed 003, 1.1-1.6 (LeNet-5 on CIFAR-10)",
                    initializer="glorot_uniform", augment=AUG_LENET if aug else None)


_CLASSIFIER_16 = (FLAT, dense(4096), dense(4096), dense(1000))
_CLASSIFIER_19 = (FLAT, drop(0.6), dense(4096), BN, dense(4096), BN, dense(1000), BN)

_ROWS = (
    _vgg_variant(1),
    _vgg_variant(2),
    _vgg_variant(3),
    _vgg_variant(3, dropout=True),
    _vgg_variant(3, l2=True),
    _vgg_variant(3, aug=True),
    _vgg_variant(3, dropout=True, l2=True),
    _vgg_variant(3, dropout=True, l2=True, aug=True),
    _vgg_variant(3, dropout=True, bn=True),
    _vgg_variant(3, dropout=True, l2=True, bn=True),
    Baseline(
        "cifar-aug-87",
        "seven convs (C32x2 C64x2 C128 C128 C256) with dropout 0.25/0.5, strong augmentation; published 87.21%",
        (conv(32), conv(32), pool(), drop(0.25), conv(64), conv(64), pool(), drop(0.25), conv(128), pool(),
         drop(0.25), conv(128), pool(), drop(0.25), conv(256), pool(), drop(0.25), FLAT, dense(128), drop(0.5)),
        "seed 001, CIFAR 10 Example2 (Adam, batch 256, 250 epochs, +150% augmented copies)",
        initializer="glorot_uniform", augment=AUG_87, protocol="aug87", published_accuracy=0.8721,
    ),
    _lenet_variant("", "LeNet-5: conv6 5x5, conv16 5x5 (valid), D120, D84"),
    _lenet_variant("-dropout", "LeNet-5 + dropout 0.3 after flatten", dropout=0.3),
    _lenet_variant("-bn", "LeNet-5 + batch norm after flatten and each dense layer", bn="after"),
    _lenet_variant("-bn-pre", "LeNet-5 + batch norm before every ReLU", bn="before"),
    _lenet_variant("-aug", "LeNet-5 + augmentation flip, rotation 0.1, zoom 0.1", aug=True),
    Baseline(
        "vgg16-like",
        "vgg_block 64x2 128x2 256x2 512x2 512x2 (conv-BN-ReLU), D4096 D4096 D1000",
        (*vgg_block(64, 2), *vgg_block(128, 2), *vgg_block(256, 2), *vgg_block(512, 2), *vgg_block(512, 2),
         *_CLASSIFIER_16),
        "seed 003, 1.9 (vgg_block)", initializer="glorot_uniform",
    ),
    Baseline(
        "vgg19-like",
        "vgg_block 64x2 128x2 256x4 512x4 512x4, dropout 0.6 + BN in the classifier",
        (*vgg_block(64, 2), *vgg_block(128, 2), *vgg_block(256, 4), *vgg_block(512, 4), *vgg_block(512, 4),
         *_CLASSIFIER_19),
        "seed 003, 1.9 (vgg19 model)", initializer="glorot_uniform",
    ),
    Baseline(
        "fashion-mnist-cnn",
        "C16 P C32 P C64 P (pool same, stride 2), D64; about 92% on Fashion-MNIST",
        (conv(16), pool("same"), conv(32), pool("same"), conv(64), pool("same"), FLAT, dense(64)),
        "seed 002 (Fashion-MNIST CNN)", initializer="glorot_uniform",
    ),
    Baseline(
        "mnist-cnn",
        "conv32 3x3 valid, P, dropout 0.1, conv64, P, dropout 0.25, D128, dropout 0.5",
        (conv(32, padding="valid"), pool(), drop(0.1), conv(64, padding="valid"), pool(), drop(0.25), FLAT,
         dense(128), drop(0.5)),
        "seed 004 (MNIST CNN)", initializer="glorot_uniform",
    ),
)
BASELINES: dict[str, Baseline] = {row.name: row for row in _ROWS}


def get_baseline(name: str) -> Baseline:
    """The registry row called ``name``; an unknown name gets the closest match and the valid list."""
    if name not in BASELINES:
        raise unknown("baseline", name, BASELINES)
    return BASELINES[name]


# ----------------------------------------------------------------------------------------------
# Protocols: the seeds' training recipes, applied where the user did not give a flag
# ----------------------------------------------------------------------------------------------

PROTOCOLS: dict[str, dict] = {
    # Exercise #2: epochs up to 100, batch 64, early stopping on val_accuracy (patience 5), best weights kept.
    "seeds": {"optimizer": "adam", "batch_size": 64, "epochs": 100, "patience": 5},
    # Seed 001's 87.21% run: Adam, batch 256, 250 epochs without early stopping, its augmentation.
    "aug87": {"optimizer": "adam", "batch_size": 256, "epochs": 250, "patience": 250, "augment": AUG_87},
}


def protocol_settings(name: str, baseline: Baseline) -> dict:
    """Training settings of protocol ``name`` for ``baseline``: the protocol's augmentation if it has one,
    else the baseline's own, else none."""
    if name not in PROTOCOLS:
        raise unknown("protocol", name, PROTOCOLS)
    settings = dict(PROTOCOLS[name])
    settings["augment"] = settings.get("augment") or baseline.augment or AugmentConfig(preset="none")
    return settings


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _spatial(layers: tuple[Op, ...], size: int) -> int:
    """Spatial size after the layer stack (square input of ``size``); < 1 means the stack does not fit."""
    for op in layers:
        if op.kind == "conv" and op.padding == "valid":
            size = size - op.kernel + 1
        elif op.kind == "pool":
            size = size // 2 if op.padding == "valid" else math.ceil(size / 2)
        elif op.kind == "flatten":
            break
        if size < 1:
            return 0
    return size


def check_input(baseline: Baseline, shape: tuple[int, int, int]) -> None:
    """Refuse an input the model cannot take, with the size it needs."""
    side = min(shape[0], shape[1])
    if _spatial(baseline.layers, side) < 1:
        raise UserError(
            f"baseline '{baseline.name}' needs images of at least {baseline.min_size()}px, the data is "
            f"{shape[0]}x{shape[1]}; pick another baseline (see `transfer baselines`)"
        )


def build_baseline(name: str, input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
    """The Keras model of baseline ``name``: raw 0..255 RGB in, scaled to [0, 1] in-graph, softmax out; built-in
    Keras layers only, so ``keras.saving.load_model`` needs nothing from this project."""
    import keras

    from transfer.layers import preprocessing_layer

    baseline = get_baseline(name)
    check_input(baseline, tuple(input_shape))
    reg = (lambda: keras.regularizers.L2(baseline.l2)) if baseline.l2 else (lambda: None)
    x = inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = preprocessing_layer("unit")(x)
    for op in baseline.layers:
        if op.kind == "conv":
            x = keras.layers.Conv2D(int(op.size), op.kernel, padding=op.padding, activation=op.activation,
                                    kernel_initializer=baseline.initializer, kernel_regularizer=reg())(x)
        elif op.kind == "dense":
            x = keras.layers.Dense(int(op.size), activation=op.activation, kernel_initializer=baseline.initializer,
                                   kernel_regularizer=reg())(x)
        elif op.kind == "pool":
            x = keras.layers.MaxPooling2D(2, padding=op.padding)(x)
        elif op.kind == "dropout":
            x = keras.layers.Dropout(op.size)(x)
        elif op.kind == "bn":
            x = keras.layers.BatchNormalization()(x)
        elif op.kind == "relu":
            x = keras.layers.Activation("relu")(x)
        elif op.kind == "flatten":
            x = keras.layers.Flatten()(x)
        else:
            raise ValueError(f"unknown layer kind {op.kind!r} in baseline {baseline.name!r}")
    # float32 softmax whatever the dtype policy (--precision): probabilities and the loss stay float32
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=baseline.name.replace("-", "_"))


def param_counts(name: str, input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10) -> dict:
    """Total, trainable and non-trainable parameters of baseline ``name`` on ``input_shape``."""
    from transfer.freezing import count_params

    model = build_baseline(name, input_shape, num_classes)
    total, trainable = count_params(model.weights), count_params(model.trainable_weights)
    return {"params": total, "trainable_params": trainable, "non_trainable_params": total - trainable}


# ----------------------------------------------------------------------------------------------
# The run recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineConfig:
    """What to build for a baseline run: the registry name and the protocol its defaults came from."""

    baseline: str
    protocol: str = "seeds"


def baseline_recipe(cfg: BaselineConfig, dataset: str, seed: int = 0):
    """Validate a baseline config cheaply (no TensorFlow yet) and return its ``recipes.ModelRecipe``."""
    from transfer.freezing import Unfreeze
    from transfer.recipes import BuiltRun, ModelRecipe, default_run_name

    row = get_baseline(cfg.baseline)
    if cfg.protocol not in PROTOCOLS:
        raise unknown("protocol", cfg.protocol, PROTOCOLS)

    def build(data):
        check_input(row, data.native_shape)
        model = build_baseline(row.name, data.native_shape, len(data.classes))
        described = {
            "baseline": row.name,
            "description": row.description,
            "source": row.source,
            "protocol": cfg.protocol,
            "backbone": None,
            "batchnorm": "trainable (from scratch)" if any(op.kind == "bn" for op in row.layers) else None,
            "weights": "none",
            "image_size": data.native_shape[0],
            "preprocessing": "unit",
            "head": None,
            "unfreeze": "all",
            "l2": row.l2,
            "published_params": row.published_params,
        }
        return BuiltRun(model, described, unfreeze=Unfreeze(None, "all"), set_trainable=None)  # no backbone

    name = default_run_name(row.name, dataset, seed, *([cfg.protocol] if cfg.protocol != "seeds" else []))
    return ModelRecipe("baseline", build, name, cfg)


def table_rows(input_shape: tuple[int, int, int] = (32, 32, 3)) -> list[dict]:
    """One dict per baseline for ``transfer baselines``: counts on ``input_shape`` (None where it does not fit)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    for row in BASELINES.values():
        fits = _spatial(row.layers, min(input_shape[:2])) >= 1
        counts = param_counts(row.name, input_shape) if fits else {}
        rows.append({
            "name": row.name, "params": counts.get("params"), "trainable_params": counts.get("trainable_params"),
            "published_params": row.published_params, "min_size": row.min_size(), "protocol": row.protocol,
            "augment": _describe_augment(row.augment), "description": row.description, "source": row.source,
        })
    return rows


def _describe_augment(augment: AugmentConfig | None) -> str:
    if augment is None:
        return "none"
    ops = augment.resolved()
    return ", ".join(f"{k} {v:.3g}" if not isinstance(v, bool) else k for k, v in ops.items() if v) or "none"
