"""A tiny TF Hub image feature-vector module saved on the fly (no download): shared by the Hub and export tests."""

from __future__ import annotations

import tensorflow as tf


class TinyFeatureVector(tf.Module):
    """The reusable SavedModel API of Hub image feature-vector models: ``__call__(images, training)``
    on [0, 1] float images, plus ``variables``, ``trainable_variables`` and ``regularization_losses``."""

    def __init__(self):
        super().__init__()
        rng = tf.random.Generator.from_seed(1)
        self.kernel = tf.Variable(rng.normal([3, 3, 3, 16]) * 0.3, name="conv/kernel")
        self.bias = tf.Variable(tf.zeros([16]), name="conv/bias")
        self.dense = tf.Variable(rng.normal([16, 12]) * 0.3, name="proj/kernel")
        self.moving_mean = tf.Variable(tf.zeros([16]), trainable=False, name="bn/moving_mean")
        self.regularization_losses = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def _features(self, images):
        x = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 1, "SAME") + self.bias - self.moving_mean)
        return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), self.dense)

    @tf.function
    def __call__(self, images, training=False):
        return self._features(images)


def save_hub_module(path, with_variable_lists: bool):
    """Save a TinyFeatureVector as Hub tooling does (``variables`` lists as attributes) or as a bare module."""
    module = TinyFeatureVector()
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    for training in (False, True):
        module.__call__.get_concrete_function(spec, training=training)
    root = module
    if with_variable_lists:
        root = tf.train.Checkpoint()
        root.module = module
        root.__call__ = module.__call__
        root.variables = [module.kernel, module.bias, module.dense, module.moving_mean]
        root.trainable_variables = [module.kernel, module.bias, module.dense]
        root.regularization_losses = []
    tf.saved_model.save(root, str(path))
    return path
