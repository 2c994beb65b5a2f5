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


class WritesAFile(tf.Module):
    """A hostile "feature extractor": calling it writes ``marker`` (a path outside any run directory)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, images):
        tf.io.write_file(self.marker, "this graph ran")
        return tf.reduce_mean(images, axis=[1, 2])


def save_hostile_module(path, marker) -> str:
    """A SavedModel whose call writes ``marker``; returns its path."""
    tf.saved_model.save(WritesAFile(str(marker)), str(path))
    return str(path)


RUN_MANIFEST = {"manifest_version": 1, "status": "complete", "kind": "finetune", "name": "crafted",
                "classes": ["a", "b"], "input": {"name": "image", "shape": [8, 8, 3], "dtype": "float32",
                                                 "layout": "NHWC", "color": "RGB"},
                "dataset": {"name": "synthetic", "fingerprint": "0"},
                "config": {"data": {"dataset": "synthetic"}, "train": {"batch_size": 8, "seed": 0}}}


def craft_run(run_dir, layer, *, embed: bool = True):
    """A complete-looking run directory whose model.keras is ``8x8x3 pixels -> layer -> softmax over 2``.

    ``embed=False`` strips the assets a Hub layer embeds, as a crafted archive that only names a handle would be.
    Building the model calls ``layer`` only symbolically: nothing of a hostile module runs here.
    """
    import json
    import zipfile
    from pathlib import Path

    import keras

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(layer(inputs)))
    model.save(run_dir / "model.keras")
    if not embed:
        source = run_dir / "model.keras"
        stripped = run_dir / "stripped.keras"
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(stripped, "w") as zout:
            for item in zin.infolist():
                if not item.filename.startswith("assets/"):
                    zout.writestr(item, zin.read(item.filename))
        stripped.replace(source)
    (run_dir / "config.json").write_text(json.dumps(RUN_MANIFEST["config"]))
    (run_dir / "manifest.json").write_text(json.dumps({**RUN_MANIFEST, "name": run_dir.name}))
    return run_dir


def craft_hub_run(run_dir, module_dir, *, embed: bool = False):
    """A run whose model.keras holds the registered Hub layer naming ``module_dir`` (embedded or not)."""
    from transfer.layers import HubFeatureExtractor

    return craft_run(run_dir, HubFeatureExtractor(str(module_dir), output_dim=3, name="hub_backbone"), embed=embed)
