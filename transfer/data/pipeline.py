"""tf.data pipelines and augmentation: the one module of transfer.data that imports TensorFlow."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from transfer.config import AugmentConfig
from transfer.data.folders import CACHE_MEMORY, file_decoder
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
) -> tf.data.Dataset:
    """A tf.data pipeline of (float32 0..255 NHWC images, int64 labels) batches; the last batch is kept.

    Training: seeded shuffle reshuffled every epoch, batch, augment, prefetch. Evaluation: batch, prefetch, in order
    and unaugmented. ``shuffle`` overrides the default (on for training only). A split of pixel arrays is cached
    as uint8 first; a split of files (:class:`transfer.data.folders.FileSplit`) is decoded as it is read (see
    :func:`_file_elements`).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size={batch_size} must be > 0")
    augmenter = build_augmenter(augment, seed) if training and augment is not None else None
    shuffled = training if shuffle is None else shuffle
    if split.streamed:
        ds = _file_elements(split, shuffled, seed)
    else:
        ds = tf.data.Dataset.from_tensor_slices((split.x, split.y.astype(np.int64))).cache()
        if shuffled:
            ds = ds.shuffle(max(len(split), 1), seed=seed, reshuffle_each_iteration=True)

    def to_float(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(x, tf.float32)  # after batching: the cache and shuffle buffer hold uint8
        return (x if augmenter is None else augmenter(x, training=True)), y

    # Keras' random layers draw from seed-generator state that every call advances: batches augmented side by side
    # would advance it in whatever order the threads run, so the same seed gave other augmentations (and another
    # history) on every run. Augmenting one batch at a time keeps the draws in batch order; prefetch still overlaps
    # it with training, and each batch's ops use TensorFlow's intra-op threads.
    parallel = tf.data.AUTOTUNE if augmenter is None else None
    ds = ds.batch(batch_size)
    if split.streamed:
        # Decoded batches queue up before the one-at-a-time augmentation, so it never waits for a batch to be
        # decoded: two uint8 batches, whatever the number of files.
        ds = ds.prefetch(2)
    return ds.map(to_float, num_parallel_calls=parallel).prefetch(tf.data.AUTOTUNE)


def _file_elements(split, shuffled: bool, seed: int) -> tf.data.Dataset:
    """(uint8 image, int64 label) elements of a split of files, decoded by our Pillow decoder in parallel.

    Memory does not grow with the number of files: the shuffle buffer holds file indices, not pixels, and only the
    images in flight are decoded (``--cache memory`` is the exception asked for: decoded images are kept after the
    first epoch). The order is deterministic (decoding runs in parallel, results come out in order), and the same
    with or without a cache: with ``memory`` the cache is filled in file order and shuffled after it with the same
    seed and buffer size, which draws the same permutation. A ``--cache DIR`` is read and written per file by the
    decoder itself, so it keeps the shuffle over file indices (a tf.data file cache could only be shuffled through a
    buffer of pixels) and is shared by runs at the same size.
    """
    decode = file_decoder(split)
    size = split.size

    def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(decode, [index], [tf.uint8, tf.int64], stateful=False)
        image.set_shape((size, size, 3))
        label.set_shape(())
        return image, label

    ds = tf.data.Dataset.from_tensor_slices(np.arange(len(split), dtype=np.int64))  # labels come with the pixels
    if split.cache == CACHE_MEMORY:
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
        return ds.shuffle(max(len(split), 1), seed=seed, reshuffle_each_iteration=True) if shuffled else ds
    if shuffled:
        ds = ds.shuffle(max(len(split), 1), seed=seed, reshuffle_each_iteration=True)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
