"""tf.data pipelines and augmentation: the one module of transfer.data that imports TensorFlow."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from transfer.config import AugmentConfig
from transfer.data.folders import file_decoder
from transfer.errors import UserError

# One row per op, in the order they are applied: (option, layer factory taking the value and a seed).
_AUG_LAYERS: tuple[tuple[str, Callable[[float, int], keras.layers.Layer]], ...] = (
    ("flip", lambda value, seed: keras.layers.RandomFlip("horizontal", seed=seed)),
    ("rotation", lambda value, seed: keras.layers.RandomRotation(value, seed=seed)),
    ("zoom", lambda value, seed: keras.layers.RandomZoom(value, seed=seed)),
    ("shift", lambda value, seed: keras.layers.RandomTranslation(value, value, seed=seed)),
    ("contrast", lambda value, seed: keras.layers.RandomContrast(value, seed=seed)),
    ("brightness", lambda value, seed: keras.layers.RandomBrightness(value, value_range=(0, 255), seed=seed)),
)


class _ClipPixels(keras.layers.Layer):
    """Clips pixel values into [0, 255] after augmentation."""

    def call(self, inputs):
        """Return ``inputs`` clipped to [0, 255]."""
        return keras.ops.clip(inputs, 0.0, 255.0)


def build_augmenter(aug: AugmentConfig, seed: int = 0) -> keras.Sequential | None:
    """Keras preprocessing layers for float 0..255 NHWC batches, clipped to [0, 255]; None when no op is on."""
    ops = aug.resolved()
    layers = [make(ops[name], seed + i) for i, (name, make) in enumerate(_AUG_LAYERS) if ops[name]]
    if not layers:
        return None
    return keras.Sequential([*layers, _ClipPixels()], name="augment")


def make_pipeline(
    split,
    *,
    batch_size: int,
    training: bool,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    epoch: int | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline of (float32 0..255 NHWC images, int64 labels) batches; the last batch is kept.

    Training: a seeded shuffle, batch, augment, prefetch. Evaluation: batch, prefetch, in order and unaugmented.
    ``shuffle`` overrides the default (on for training only). ``epoch`` (an int, or a scalar int64 tensor) makes the
    dataset that one epoch: its order and its augmentations are functions of (``seed``, ``epoch``) alone, so the
    same epoch is the same batches in any process (:func:`training_stream`, which resume relies on). Without it
    every pass over the dataset draws a new epoch key from ``seed`` (a new order each pass, seeded).
    A split of pixel arrays is indexed in place; a split of files (:class:`transfer.data.folders.FileSplit`) is
    decoded as it is read (see :func:`_epoch_builder`).
    """
    one_epoch = _epoch_builder(split, batch_size=batch_size, training=training, augment=augment, seed=seed,
                               shuffle=shuffle)
    if epoch is not None:
        ds = one_epoch(tf.cast(epoch, tf.int64))
    elif training if shuffle is None else shuffle:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        ds = keys.flat_map(lambda key: one_epoch(tf.math.abs(key)))
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(split) // batch_size)))  # as one epoch's
    else:
        ds = one_epoch(tf.constant(0, tf.int64))
    return ds.prefetch(tf.data.AUTOTUNE)


def training_stream(
    split,
    *,
    batch_size: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    finish: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
) -> Callable[[int], tf.data.Dataset]:
    """``stream(first_epoch)``: the training batches of epochs ``first_epoch``, ``first_epoch + 1``, ... one after
    another, without end.

    Epoch ``e`` is ``make_pipeline(..., training=True, epoch=e)`` then ``finish`` (per-epoch maps such as one-hot
    labels, or a rebatch that drops the epoch's last partial batch): the stream started at epoch ``e`` is exactly
    the tail of the one started at 0, which is what lets a killed run resume to the same history as an
    uninterrupted one. Fit it with ``steps_per_epoch`` (the epoch's batch count): Keras then keeps one iterator
    across epochs. Every stream of one factory shares the decoder (and its ``--cache memory`` images), the
    augmentation layers and the arrays: a run's phases each start a stream, none copies the data again.
    """
    one_epoch = _epoch_builder(split, batch_size=batch_size, training=True, augment=augment, seed=seed)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        ds = one_epoch(epoch)
        return ds if finish is None else finish(ds)

    def stream(first_epoch: int = 0) -> tf.data.Dataset:
        epochs = tf.data.Dataset.range(int(first_epoch), _NO_END)
        return epochs.flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE)

    return stream


_NO_END = 2**62  # the last epoch a stream counts to: never reached
_EPOCH_SALT = 0x5EED  # keeps the shuffle's key apart from the augmentation's


class _BatchSeed(keras.random.SeedGenerator):
    """The seed of one augmentation layer on one batch: each draw the layer makes gets its own stateless seed, folded
    from the batch's key. No state variable: nothing advances, so batches can be augmented in parallel and in any
    process with the same result (Keras' own generators advance a variable every call, in whatever order threads
    run them, and restart at their seed in a resumed process)."""

    def __init__(self, key: tf.Tensor):  # not SeedGenerator.__init__: that would create a state variable
        self._key, self._draws = key, 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._key, self._draws)


def _augment_function(augmenter: keras.Sequential, seed: int) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """``augment(images, epoch, batch)``: the augmenter's random layers applied with seeds folded from (``seed``,
    ``epoch``, ``batch``, layer), then the clip: a pure function of its arguments."""
    random_layers = [layer for layer in augmenter.layers if not isinstance(layer, _ClipPixels)]

    def augment(images: tf.Tensor, epoch: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        key = tf.random.experimental.stateless_fold_in([seed, 0], epoch)
        key = tf.random.experimental.stateless_fold_in(key, batch)
        for i, layer in enumerate(random_layers):
            draws = _BatchSeed(tf.random.experimental.stateless_fold_in(key, i))
            transformation = layer.get_random_transformation(images, training=True, seed=draws)
            images = layer.transform_images(images, transformation, training=True)
        return tf.clip_by_value(images, 0.0, 255.0)

    return augment


def _epoch_builder(split, *, batch_size: int, training: bool, augment: AugmentConfig | None = None, seed: int = 0,
                   shuffle: bool | None = None) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """``one_epoch(epoch) -> tf.data.Dataset``: one epoch's batches, a pure function of (``seed``, ``epoch``).

    The order is a stateless permutation of sample indices keyed by (``seed``, ``epoch``); batches of indices
    become pixels by a gather from the arrays (a split of arrays: no shuffle buffer, no copy) or by our Pillow
    decoder, in parallel and in order (a split of files: memory does not grow with the number of files; only
    the images in flight are decoded, and ``--cache memory`` keeps decoded images in the decoder after their first
    read). Augmentation is stateless per batch (:func:`_augment_function`), so it runs in parallel too.
    Everything stateful (layers, the decoder and its cache, the arrays as tensors) is made here, once, outside the
    per-epoch function that tf.data may trace.
    """
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} must be > 0")
    augmenter = build_augmenter(augment, seed) if training and augment is not None else None
    augment_batch = _augment_function(augmenter, seed) if augmenter is not None else None
    shuffled = training if shuffle is None else shuffle
    count = len(split)
    if split.streamed:
        decode = file_decoder(split)
        size = split.size

        def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            image, label = tf.numpy_function(decode, [index], [tf.uint8, tf.int64], stateful=False)
            image.set_shape((size, size, 3))
            label.set_shape(())
            return image, label
    else:
        pixels = tf.constant(split.x)
        labels = tf.constant(split.y.astype(np.int64))

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.range(count, dtype=tf.int64)
        if shuffled:
            key = tf.random.experimental.stateless_fold_in([seed, _EPOCH_SALT], epoch)
            order = tf.random.experimental.stateless_shuffle(order, seed=key)
        ds = tf.data.Dataset.from_tensor_slices(order)
        if split.streamed:
            # Decoded images queue up (two uint8 batches ahead) so the float conversion and augmentation never wait.
            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
        else:
            ds = ds.batch(batch_size).map(lambda idx: (tf.gather(pixels, idx), tf.gather(labels, idx)))

        def to_float(batch: tf.Tensor, xy: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
            x = tf.cast(xy[0], tf.float32)  # after batching: what is gathered or decoded stays uint8
            return (x if augment_batch is None else augment_batch(x, epoch, batch)), xy[1]

        return ds.enumerate().map(to_float, num_parallel_calls=tf.data.AUTOTUNE)

    return one_epoch
