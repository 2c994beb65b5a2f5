"""In-graph preprocessing from Keras' own layers, and the custom layers that cannot be avoided.

A model built here is self-contained: ``keras.saving.load_model("model.keras")`` works in a Python that never
imported this project, because preprocessing is made of built-in layers (:func:`preprocessing_layer`). Two custom
layers remain registered under the ``transfer>`` package:

- :class:`HubFeatureExtractor` wraps a TF Hub module (there is no built-in Keras 3 layer for one): a model with a Hub
  backbone needs ``import transfer.layers`` before it is loaded.
- :class:`Preprocess` is kept only so that run directories written before preprocessing moved to built-in layers
  still load; nothing builds it any more.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import keras
import numpy as np
from keras import ops

from transfer.backbones import PREPROCESSING  # the table (it used to live here; still importable from here)
from transfer.errors import UserError


def preprocessing_layer(mode: str, name: str = "preprocess") -> keras.layers.Layer:
    """A built-in Keras layer mapping raw 0..255 RGB pixels to what a backbone expects (``PREPROCESSING[mode]``).

    ``x * scale + offset`` per channel is a ``Rescaling`` layer; the channel flip of ``caffe`` (RGB -> BGR) is a 1x1
    ``Conv2D`` with the permutation matrix (folded with the scale) as its frozen kernel and the offset as its bias,
    so it computes exactly ``x[..., ::-1] * scale + offset``. ``none`` is an ``Identity``.
    """
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing mode {mode!r}")
    bgr, scale, offset, _ = PREPROCESSING[mode]
    if bgr:
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_channel in range(3):  # output channel k reads input channel 2 - k
            kernel[0, 0, 2 - out_channel, out_channel] = scale[out_channel]
        layer = keras.layers.Conv2D(3, 1, name=name, trainable=False, kernel_initializer="zeros")
        layer.build((None, None, None, 3))
        layer.set_weights([kernel, np.asarray(offset, np.float32)])
        return layer
    if mode == "none":
        return keras.layers.Identity(name=name)
    return keras.layers.Rescaling(scale=list(scale), offset=list(offset), name=name)


@keras.saving.register_keras_serializable(package="transfer")
class Preprocess(keras.layers.Layer):
    """Legacy: the custom preprocessing layer of older run directories, kept registered only so they still load.

    New models use :func:`preprocessing_layer` (built-in Keras layers, loadable without this project).
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode
        self._bgr, scale, offset, _ = PREPROCESSING[mode]
        self._scale = tuple(scale)
        self._offset = tuple(offset)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self._bgr:
            x = ops.flip(x, axis=-1)
        if self.mode == "none":
            return x
        return x * ops.convert_to_tensor(self._scale, x.dtype) + ops.convert_to_tensor(
            self._offset, x.dtype
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


_KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")


def resolve_hub_handle(handle: str) -> str:
    """A local SavedModel dir stays a path; a bare Kaggle handle becomes a Kaggle URL."""
    if os.path.isdir(os.path.expanduser(handle)):
        return str(Path(handle).expanduser().resolve())
    if "://" in handle:
        return handle
    if _KAGGLE_HANDLE.match(handle):
        return "https://www.kaggle.com/models/" + handle
    raise UserError(
        f"hub handle '{handle}' is neither an existing SavedModel directory, a URL nor a Kaggle "
        "handle (owner/model/framework/variation[/version])"
    )


def load_hub_module(handle: str):
    """``hub.load`` with a one-line error for the offline case and for non-Hub directories."""
    import tensorflow as tf
    import tensorflow_hub as hub

    resolved = resolve_hub_handle(handle)
    try:
        return hub.load(resolved)
    except (OSError, ValueError, tf.errors.OpError) as exc:
        if os.path.isdir(resolved):
            raise UserError(
                f"cannot load '{handle}' as a TF Hub SavedModel ({type(exc).__name__}); "
                "pass a directory written by tf.saved_model.save with a callable __call__"
            ) from exc
        raise UserError(
            f"cannot download hub model '{resolved}' (offline?); download it on a connected "
            "machine and pass hub:/path/to/saved_model_dir"
        ) from exc


@keras.saving.register_keras_serializable(package="transfer")
class HubFeatureExtractor(keras.layers.Layer):
    """A TF Hub image feature-vector SavedModel wrapped as a Keras 3 layer (registered: models holding one need
    ``import transfer.layers`` before ``keras.saving.load_model``).

    ``tensorflow_hub.KerasLayer`` is a tf_keras layer and cannot join a Keras 3 model; this layer
    loads the module with ``hub.load`` and tracks its variables as Keras variables (the same
    objects, not copies), so ``trainable=True`` fine-tunes the module's own variables and
    ``model.keras`` saves them. The module always runs in inference mode so its BatchNorm
    statistics never move.
    """

    def __init__(self, handle: str, output_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.handle = handle
        self._module = load_hub_module(handle)
        if not callable(self._module):
            raise UserError(f"hub model '{handle}' is not callable; it must be an image feature-vector model")
        self._has_training_arg = _accepts_training(self._module)
        seen = set()
        for variable in _module_variables(self._module):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            self._track_variable(
                keras.Variable(
                    initializer=variable,
                    trainable=variable.trainable,
                    dtype=variable.dtype,
                    shape=variable.shape,
                    name=variable.name.replace("/", "_").replace(":", "_"),
                )
            )
        self.output_dim = output_dim
        self.built = True

    def call(self, inputs):
        outputs = self._module(inputs, training=False) if self._has_training_arg else self._module(inputs)
        if isinstance(outputs, dict):
            outputs = outputs.get("default", next(iter(outputs.values())))
        return outputs

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {**super().get_config(), "handle": self.handle, "output_dim": self.output_dim}


def _module_variables(module) -> list:
    """The module's variables: its ``variables`` attribute (reusable SavedModel API), else those its
    restored ``__call__`` functions capture."""
    variables = list(getattr(module, "variables", None) or [])
    if variables:
        return variables
    for concrete in getattr(module.__call__, "concrete_functions", []):
        variables.extend(concrete.variables)
    return variables


def _accepts_training(module) -> bool:
    import inspect

    call = module.__call__
    spec = getattr(call, "function_spec", None)
    try:
        params = (
            spec.fullargspec.args + spec.fullargspec.kwonlyargs
            if spec is not None
            else list(inspect.signature(call).parameters)
        )
    except (TypeError, ValueError, AttributeError):
        return False
    return "training" in params
