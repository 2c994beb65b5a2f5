"""Datasets for training runs: sources (one registry), seeded stratified splits, tf.data pipelines.

- :mod:`transfer.data.sources`: the registry of dataset sources (Keras datasets, ``synthetic``, ``folder:PATH``),
  ``load_dataset`` and ``load_run_dataset``
- :mod:`transfer.data.splits`: ``Split``/``Dataset``, stratified picks, carving, ``limit_train``, fingerprints
- :mod:`transfer.data.folders`, :mod:`transfer.data.copies`, :mod:`transfer.data.synthetic`: what the sources read;
  a folder's splits are ``FileSplit``s (files, decoded on demand at the model's size), the others hold pixel arrays
- :mod:`transfer.data.pipeline`: tf.data pipelines and augmentation, the only module here that imports TensorFlow

Importing this package imports neither TensorFlow nor Keras; ``make_pipeline`` and ``build_augmenter`` load
:mod:`transfer.data.pipeline` on first use.
"""

from __future__ import annotations

import importlib

from transfer.config import AugmentConfig, DataConfig
from transfer.data.folders import FOLDER_PREFIX, IMAGE_EXTENSIONS, FileSplit
from transfer.data.sources import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    SOURCES,
    DatasetSource,
    dataset_names,
    get_source,
    load_dataset,
    load_run_dataset,
)
from transfer.data.splits import Dataset, Split, stratified_pick
from transfer.data.synthetic import SYNTHETIC_CLASSES, synthetic_images

_LAZY = {"make_pipeline": "transfer.data.pipeline", "build_augmenter": "transfer.data.pipeline"}

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FOLDER_PREFIX",
    "IMAGE_EXTENSIONS",
    "MNIST_CLASSES",
    "SOURCES",
    "SYNTHETIC_CLASSES",
    "AugmentConfig",
    "DataConfig",
    "Dataset",
    "DatasetSource",
    "FileSplit",
    "Split",
    "build_augmenter",
    "dataset_names",
    "get_source",
    "load_dataset",
    "load_run_dataset",
    "make_pipeline",
    "stratified_pick",
    "synthetic_images",
]


def __getattr__(name: str):
    """The TensorFlow-backed names, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
